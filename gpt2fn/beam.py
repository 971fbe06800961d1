"""Beam search: the most likely continuations, as Hugging Face's
``generate(num_beams=K)`` finds them (its vectorised algorithm, step for step).

Each prompt keeps ``K`` running beams, rows of one batch of ``B * K`` over one
preallocated KV cache. A step scores every beam's every next token (the sum
of log-probabilities so far, after :func:`~gpt2fn.sampling.apply_history`'s
rules), keeps the best ``2 K`` candidates, continues the best ``K`` that did
not end, and offers the ending ones among the best ``K`` (at the stop token,
or at ``max_new_tokens``) to the prompt's ``K`` finished hypotheses, scored
``sum of log-probs / length ** length_penalty``. The cache rows of each
beam that continues another row's are then copied from that row, in place
(only those: side by side, 124M, 4 beams, 256 tokens, 1.04x eager fp32 and
1.10x compiled int8 against copying every row). Beam search
ends when no running beam can beat the finished ones (``early_stopping``:
see :func:`beam_search`), or at ``max_new_tokens``.

Ragged prompts run as :mod:`gpt2fn.generation` runs them (per-row positions,
a short prompt padded with its last token at its last position), so each
prompt's beams are those of the prompt alone; the length penalty counts new
tokens. The steps are :func:`~gpt2fn.steps.scoring_steps` (eager, or the
one-token step compiled); the loop synchronises once a step (the stop test).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from tqdm import tqdm

from gpt2fn.cache import cache_len
from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError, check_int, is_real
from gpt2fn.generation import Prompts, check_sequence_fits, prompt_lists, ragged_batch
from gpt2fn.params import Params, params_device
from gpt2fn.sampling import apply_history, check_bad_words, check_sampling_args, reads_history
from gpt2fn.steps import scoring_steps, window_len

Tensor = torch.Tensor
NEVER = -1.0e9  # Hugging Face's score for what may not be chosen (added, not assigned, as it does)


class Beam(NamedTuple):
    tokens: list[int]  # the new tokens, the stop token included where a beam ended at it
    score: float  # their summed log-probability / len(tokens) ** length_penalty


def beam_search(
    params: Params,
    config: GPTConfig,
    prompts: Prompts,
    max_new_tokens: int,
    num_beams: int,
    *,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = False,
    stop_token: Optional[int] = None,
    num_return_sequences: int = 1,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    bad_words_ids: Optional[list[list[int]]] = None,
    attention: str = "auto",
    compile: bool = False,
    progress: bool = False,
) -> list[list[Beam]]:
    """The ``num_return_sequences`` best of each prompt's ``num_beams``
    finished hypotheses, best first: ``[prompt][i]`` a :class:`Beam`.

    ``prompts``: a [B, T] tensor or a list of token lists (each prompt and its
    ``max_new_tokens`` must fit the context). A hypothesis ends at
    ``stop_token`` or after ``max_new_tokens``. ``length_penalty`` is the
    exponent of the length that divides a finished hypothesis' log-probability
    (above 0 favours longer ones). ``early_stopping``: False ends a prompt
    when its best running beam, scored at its current length, cannot beat its
    worst finished one; True as soon as it has ``num_beams`` finished; "never"
    scores the running beam at the longest length it could reach (with a
    positive ``length_penalty``): Hugging Face's three settings. The batch
    runs until every prompt has ended. ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``min_new_tokens`` and ``bad_words_ids``: as in
    :func:`~gpt2fn.generation.generate`, applied to the log-probabilities, as
    Hugging Face's processors are.
    With ``compile`` the one-token steps run compiled
    (:func:`~gpt2fn.steps.scoring_steps`: one graph for every step and length).
    ``progress`` shows a bar of the steps (at most ``max_new_tokens``) on stderr.
    Raises :class:`~gpt2fn.errors.GPT2FnError` on bad input, before any work.
    """
    check_int("num_beams", num_beams)
    check_int("num_return_sequences", num_return_sequences)
    if num_return_sequences > num_beams:
        raise GPT2FnError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams ({num_beams})")
    if not (is_real(length_penalty) and abs(length_penalty) < float("inf")):
        raise GPT2FnError(f"length_penalty must be a finite number (1 = score by mean log-probability), got {length_penalty}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):  # (not 0 or 1: they equal False and True)
        raise GPT2FnError(f"early_stopping is False, True or 'never', got {early_stopping!r}")
    check_sampling_args(0, 0, 1.0, 0.0, repetition_penalty, no_repeat_ngram_size, min_new_tokens, stop_token)
    words = () if bad_words_ids is None else check_bad_words(bad_words_ids, config.vocab_size, stop_token)
    prompts = prompt_lists(config, prompts, max_new_tokens)
    check_int("max_tokens", max_new_tokens)
    for p in prompts:  # every beam runs to the same length: each prompt's whole continuation must fit
        check_sequence_fits(config, len(p), max_new_tokens)

    device, K, N = params_device(params), num_beams, max_new_tokens
    B, T = len(prompts), max(len(p) for p in prompts)
    steps = scoring_steps(config, device, B * K, attention, compile)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # each row's prompt
    tokens, pos = (t[rows] for t in ragged_batch(prompts, device))  # [B K, T]: each prompt K times
    start = torch.tensor([len(p) for p in prompts], device=device)[rows]  # the position of each row's first new token
    cache = steps.make_state(params, B * K, T + N)
    history = torch.zeros(B * K, T + N, dtype=torch.long, device=device).scatter_(1, pos, tokens)  # tokens so far
    rules = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                 min_new_tokens=min_new_tokens, bad_words_ids=words)  # fmt: skip

    running = torch.zeros(B, K, device=device)
    running[:, 1:] = NEVER  # only the first beam's tokens count at the first step: the beams are copies
    new = torch.zeros(B, K, N, dtype=torch.long, device=device)  # each running beam's new tokens
    done_new = torch.zeros(B, K, N, dtype=torch.long, device=device)  # the finished hypotheses
    done_len = torch.zeros(B, K, dtype=torch.long, device=device)
    done_score = torch.full((B, K), NEVER, device=device)
    done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    first_k = torch.arange(2 * K, device=device) < K  # of the 2K candidates, the ones that may finish
    offsets = torch.arange(B, device=device)[:, None] * K
    with torch.inference_mode(), tqdm(total=N, desc="beam search", unit="step", disable=not progress, leave=False) as bar:
        for i in range(N):
            step = steps.prefill if i == 0 else steps.decode
            part = cache if steps.window is None else steps.window(cache, window_len(T + i, cache_len(cache)))
            log_probs = step(params, tokens, pos, part, None)  # [B K, V]
            if reads_history(**rules):
                log_probs = apply_history(log_probs, history, pos[:, -1], **rules, stop_token=stop_token, made=i)
            V = log_probs.shape[-1]
            scores, index = (log_probs.view(B, K, V) + running[:, :, None]).view(B, K * V).topk(2 * K)  # [B, 2K]
            beam, token = index // V, index % V
            candidates = new.gather(1, beam[:, :, None].expand(B, 2 * K, N))
            candidates[:, :, i] = token
            ends = torch.full_like(token, i == N - 1, dtype=torch.bool)  # the last step ends every candidate
            if stop_token is not None:
                ends |= token == stop_token

            # the best K candidates that go on
            go_on = scores + ends.float() * NEVER
            keep = go_on.topk(K).indices  # [B, K]
            running, parent = go_on.gather(1, keep), beam.gather(1, keep)
            new = candidates.gather(1, keep[:, :, None].expand(B, K, N))

            # the ending ones among the best K, offered to the finished hypotheses
            finishing = ends & first_k
            offered = scores / ((i + 1) ** length_penalty)
            offered += (done.all(-1, keepdim=True) & (early_stopping is True)).float() * NEVER
            offered += (~improvable).float() * NEVER
            offered += (~finishing) * NEVER
            merged = torch.cat((done_score, offered), 1).topk(K).indices
            done_score = torch.cat((done_score, offered), 1).gather(1, merged)
            done_new = torch.cat((done_new, candidates), 1).gather(1, merged[:, :, None].expand(B, K, N))
            done_len = torch.cat((done_len, torch.full_like(token, i + 1)), 1).gather(1, merged)
            done = torch.cat((done, finishing), 1).gather(1, merged)

            # can a running beam still beat the finished ones?
            best_len = N if early_stopping == "never" and length_penalty > 0.0 else i + 1
            worst_done = torch.where(done, done_score.min(1, keepdim=True).values, NEVER)
            improvable &= (running[:, :1] / (best_len**length_penalty) > worst_done).any(-1, keepdim=True)
            all_done = done.all() if early_stopping is True else torch.zeros((), dtype=torch.bool, device=device)
            source = (offsets + parent).flatten()  # [B K]: the row each running beam continues
            go_on, *rows_from = torch.cat([(improvable.any() & ~all_done & ~ends.all()).view(1), source]).tolist()
            bar.update()  # (the line above: the step's one sync)
            if i == N - 1 or not go_on:
                break

            # the cache rows and tokens of each beam that continues another row's, copied from that row
            moved = [r for r, f in enumerate(rows_from) if f != r]
            if moved:
                to, origin, n = torch.tensor(moved, device=device), source[moved], T + i  # n: the positions written
                for k, v in cache:
                    k[to, :, :n] = k[origin, :, :n]
                    v[to, :, :n] = v[origin, :, :n]
                history[to] = history[origin]
            pos = start[:, None] + i
            tokens = new[:, :, i].reshape(-1, 1)
            history.scatter_(1, pos, tokens)
    return [[Beam(done_new[b, k, : done_len[b, k]].tolist(), done_score[b, k].item()) for k in range(num_return_sequences)]
            for b in range(B)]  # fmt: skip
