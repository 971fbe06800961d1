#!/usr/bin/env python
"""Interventions through the one tap mechanism, on the bundled model by
default: a logit lens, zero-ablating attention heads, patching the residual
stream from another prompt, and steering a generation.

    python scripts/interventions.py --prompt "ROMEO: O, she doth teach the torches to burn"
"""

from __future__ import annotations

import sys

import torch

from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_int, run_cli
from gpt2fn.generation import generate_all
from gpt2fn.interp import ablate_head, logit_lens, patch, run_with_cache
from gpt2fn.model import forward
from gpt2fn.tokenizer import check_vocabulary, decode, encode, get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-shakespeare", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--prompt", default="ROMEO: O, she doth teach the torches to burn", help="the text the model reads")
    p.add_argument("--source", default="ROMEO: O, he doth teach the candles to weep",
                   help="the prompt whose residual stream is patched in (same token count as --prompt)")
    p.add_argument("--layer", type=int, default=None, help="layer to ablate / patch (default: the middle one)")
    p.add_argument("--steer_tokens", type=int, default=24, help="tokens of each continuation in the steering example")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    check_int("--steer_tokens", args.steer_tokens)
    device = resolve_device(args.device)
    path = resolve_model(args.model, args.revision)
    tok = get_tokenizer(path)
    ids = torch.tensor([encode(tok, args.prompt)])
    if ids.shape[1] < 2:
        raise GPT2FnError("the prompt needs at least two tokens")
    src = torch.tensor([encode(tok, args.source)])
    if src.shape != ids.shape:
        raise GPT2FnError(f"--source has {src.shape[1]} tokens, --prompt {ids.shape[1]}: patching needs the same length")
    params, config = load_pretrained(path, device=device)
    check_vocabulary(tok, config.vocab_size)
    ids, src = ids.to(device), src.to(device)
    if ids.shape[1] > config.n_ctx:
        raise GPT2FnError(f"the prompt is {ids.shape[1]} tokens; the context holds {config.n_ctx}")
    layer = config.n_layer // 2 if args.layer is None else args.layer
    if not 0 <= layer < config.n_layer:
        raise GPT2FnError(f"--layer must be between 0 and {config.n_layer - 1}, got {layer}")
    show = lambda i: repr(decode(tok, [int(i)]))  # noqa: E731

    logits, cache = run_with_cache(params, config, ids)
    top = int(logits[0, -1].argmax())
    print(f"prompt: {args.prompt!r}\nmodel's next token: {show(top)}\n")

    print("1. Logit lens: each layer's residual stream read through the final LayerNorm and the LM head")
    for i in range(config.n_layer):
        lens = logit_lens(params, config, cache[("resid", i)])[0, -1]
        print(f"   after layer {i}: top {show(lens.argmax())}, log-prob of {show(top)} {lens.log_softmax(-1)[top]:.2f}")

    print(f"\n2. Zero-ablating each head of layer {layer}: change in the log-prob of {show(top)}")
    base = logits[0, -1].log_softmax(-1)[top]
    for h in range(config.n_head):
        ablated = forward(ablate_head(params, layer, h, config.n_head), config, ids)[0, -1].log_softmax(-1)[top]
        print(f"   head {h}: {ablated - base:+.3f}")

    src_logits, src_cache = run_with_cache(params, config, src)
    patched = forward(params, config, ids, tap=patch("resid", layer, src_cache[("resid", layer)]))
    print(f"\n3. Patching layer {layer}'s whole residual stream from {args.source!r}:")
    print(f"   next token {show(logits[0, -1].argmax())} -> {show(patched[0, -1].argmax())} "
          f"(the source run says {show(src_logits[0, -1].argmax())}; max |logit difference| to the source run "
          f"{(patched - src_logits).abs().max():.1e})")  # fmt: skip

    direction = (src_cache[("resid", layer)] - cache[("resid", layer)]).mean(1)[0]  # [D]
    steer = lambda name, i, t: t + direction if (name, i) == ("resid", layer) else t  # noqa: E731
    n = min(args.steer_tokens, config.n_ctx - ids.shape[1])
    print(f"\n4. Steering: greedy continuations, and with the mean difference of the two prompts' layer-{layer} "
          f"residual streams added at every position while generating:")  # fmt: skip
    for name, tap in (("plain", None), ("steered", steer)):
        new = generate_all(params, config, ids, n, temperature=0, tap=tap)[0][0]
        print(f"   {name + ':':9}{decode(tok, new.tolist())!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
