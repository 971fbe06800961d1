#!/usr/bin/env python
"""LAMBADA accuracy and perplexity of a model, scored as lm-evaluation-harness's lambada_openai (see gpt2fn.lambada).

    python scripts/eval_lambada.py --model gpt2 --data lambada_test.jsonl
    python scripts/eval_lambada.py --model gpt2          # the test split from the Hub
    python scripts/eval_lambada.py --model weights/my-model.safetensors --data lambada_test.jsonl --limit 500

Prints acc (the last word is the model's greedy continuation) and ppl (of
the last word). GPT-2 124M scores acc 0.3256, ppl 40.06 on OpenAI's test set.
"""

import sys

from gpt2fn.lambada import TASK
from gpt2fn.tasks import cli

main = cli(TASK, __doc__)

if __name__ == "__main__":
    sys.exit(main())
