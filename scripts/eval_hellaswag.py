#!/usr/bin/env python
"""HellaSwag accuracy of a model, scored completion-style (see gpt2fn.hellaswag).

    python scripts/eval_hellaswag.py --model gpt2 --data hellaswag_val.jsonl
    python scripts/eval_hellaswag.py --model gpt2          # the validation split from the Hub
    python scripts/eval_hellaswag.py --model weights/my-model.safetensors --data hellaswag_val.jsonl --limit 500

Prints acc (highest summed log-probability) and acc_norm (highest mean per
token). GPT-2 124M scores acc_norm 0.2955 on the validation set, 1558M 0.4893.
"""

import sys

from gpt2fn.hellaswag import TASK
from gpt2fn.tasks import cli

main = cli(TASK, __doc__)

if __name__ == "__main__":
    sys.exit(main())
