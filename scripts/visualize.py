#!/usr/bin/env python
"""Pictures of a model, as PNG files (needs matplotlib: pip install -e ".[plot]"):

* attention_layer{i}.png: every head's attention pattern for a prompt, tokens on both axes;
* position_embedding.png: a few columns of the learned position embedding against position;
* weight_{name}.png: one weight matrix as an image;
* surprise.png: how surprised the model is by each token of the prompt after
  the ones before it (-log2 p, bits), with what it expected instead.

    python scripts/visualize.py --prompt "ROMEO: But soft, what light" --out viz/
"""

from __future__ import annotations

import math
import sys

import torch

from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_output_dir, parse_int_list, run_cli
from gpt2fn.evaluation import token_logprobs
from gpt2fn.interp import run_with_cache
from gpt2fn.params import flatten_params
from gpt2fn.plotting import require_pyplot, save_figure
from gpt2fn.tokenizer import check_vocabulary, encode, get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-shakespeare", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--prompt", default="ROMEO: But soft, what light through yonder window breaks?",
                   help="the text whose attention patterns are drawn")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--layers", default=None, help="comma-separated layers to draw (default: all)")
    p.add_argument("--columns", default="0,1,2,3,4", help="position-embedding columns to plot")
    p.add_argument("--weight", default="blocks.0.attn.c_attn.w", help="dotted name of the matrix to draw")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    plt = require_pyplot("scripts/visualize.py")
    if not args.prompt:
        raise GPT2FnError("the prompt is empty; pass some text with --prompt")
    layers = None if args.layers is None else parse_int_list("--layers", args.layers, low=0, example="0,5")
    columns = parse_int_list("--columns", args.columns, low=0)
    out = check_output_dir(args.out, "--out directory")
    device = resolve_device(args.device)
    path = resolve_model(args.model, args.revision)
    params, config = load_pretrained(path, device=device)
    tok = get_tokenizer(path)
    check_vocabulary(tok, config.vocab_size)
    ids = encode(tok, args.prompt)
    if len(ids) > config.n_ctx:
        raise GPT2FnError(f"the prompt is {len(ids)} tokens; the context holds {config.n_ctx}")
    layers = range(config.n_layer) if layers is None else layers
    if max(layers) >= config.n_layer:
        raise GPT2FnError(f"--layers must be between 0 and {config.n_layer - 1}, got {args.layers}")
    if max(columns) >= config.n_embd:
        raise GPT2FnError(f"--columns must be between 0 and {config.n_embd - 1}, got {args.columns}")
    flat = flatten_params(params)
    if args.weight not in flat or flat[args.weight].ndim != 2:
        matrices = [n for n, t in flat.items() if t.ndim == 2]
        raise GPT2FnError(f"no matrix named {args.weight!r}; e.g. {', '.join(matrices[:4])}")
    labels = [tok.decode([i]) for i in ids]

    logits, cache = run_with_cache(params, config, torch.tensor([ids], device=device))
    for layer in layers:
        probs = cache[("attn_probs", layer)][0].float().cpu()  # [H, T, T]
        cols = math.ceil(math.sqrt(config.n_head))
        rows = math.ceil(config.n_head / cols)
        size = max(3.0, 0.25 * len(ids))
        fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1, rows * size), squeeze=False, constrained_layout=True)
        for h, ax in enumerate(axes.flat):
            if h >= config.n_head:
                ax.axis("off")
                continue
            image = ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {h}")
            ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(ids)), labels, fontsize=7)
            ax.set_xlabel("key (attended to)")
            ax.set_ylabel("query")
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (each row sums to 1)")
        save_figure(fig, out / f"attention_layer{layer}.png", dpi=100)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    wpe = params["wpe"].float().cpu()
    for c in columns:
        ax.plot(wpe[:, c].numpy(), label=f"column {c}")
    ax.set_xlabel("position")
    ax.set_ylabel("value")
    ax.set_title("learned position embedding (wpe), a few columns")
    ax.legend()
    save_figure(fig, out / "position_embedding.png", dpi=100)

    w = flat[args.weight].float().cpu()
    fig, ax = plt.subplots(figsize=(8, 8 * min(2.0, w.shape[0] / w.shape[1])))
    image = ax.imshow(w.numpy(), cmap="RdBu", aspect="auto", vmin=-w.abs().max(), vmax=w.abs().max())
    fig.colorbar(image, ax=ax)
    ax.set_title(f"{args.weight} {tuple(w.shape)} [out, in]")
    save_figure(fig, out / f"weight_{args.weight.replace('.', '_')}.png", dpi=100)

    if len(ids) >= 2:  # the first token has nothing before it to be predicted from
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=device)
            bits = (-token_logprobs(params, config, tokens)[0] / math.log(2)).cpu()  # [T - 1]
        expected = logits[0, :-1].argmax(-1).tolist()  # the recorded run's first choice after each prefix
        fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(ids)), 4.5), constrained_layout=True)
        ax.bar(range(len(bits)), bits.numpy(), color=plt.cm.magma_r(bits.numpy() / max(1.0, float(bits.max()))))
        for x, (b, guess, got) in enumerate(zip(bits.tolist(), expected, ids[1:])):
            if guess != got:  # what the model expected there instead
                ax.text(x, b, f" {tok.decode([guess])!r}", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(bits)), labels[1:], rotation=90, fontsize=8)
        ax.set_ylim(0, 1.3 * max(1.0, float(bits.max())))  # room for the first choices above the bars
        ax.set_ylabel("surprisal, -log2 p (bits)")
        ax.set_title(f"each token after the ones before it ({bits.mean():.2f} bits on average)\n"
                     "above a bar, in quotes: the model's own first choice there", fontsize=10)  # fmt: skip
        save_figure(fig, out / "surprise.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
