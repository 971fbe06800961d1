"""Autoregressive generation: one loop over the steps of :mod:`gpt2fn.steps`.

:func:`generate` returns a :class:`Stream`: iterate it for each new token as
soon as it is chosen ([B] int64, on the model's device); when it ends, its
``stats`` hold prefill time, decode time and decode tokens/s. Prompts are a
``[B, T]`` tensor or a list of token lists of any lengths (ragged batches):
the same loop serves both, eager or compiled, with or without the KV cache.

Ragged prompts need no padding token and no left padding. Each short row is
padded by repeating its last token at its last position: the repeats compute
exactly what that position computes, so every row's last column is its own
last token, and each row's ``i``-th decode step writes and reads at its own
position ``len_b + i``. Slots a row has not written yet are hidden by the
causal mask. Nothing about a row depends on the others: greedy rows equal
generating each prompt alone. A compiled CPU decode step computes each row's
bits as that row alone computes them; the library products of the prompt's
pass and of the eager steps may round by the row count (see the README,
"Several prompts at once").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch

from gpt2fn.config import GPTConfig
from gpt2fn.device import synchronize
from gpt2fn.errors import GPT2FnError, check_int, check_token_ids
from gpt2fn.model import Tap
from gpt2fn.params import Params, params_device
from gpt2fn.sampling import check_bad_words, check_sampling_args, noise_width, reads_history, uniform_noise
from gpt2fn.speculative import PromptLookup, check_draft, speculative_steps
from gpt2fn.steps import State, Steps, make_steps, window_len

Tensor = torch.Tensor
Prompts = Union[Tensor, list[Union[list[int], Tensor]]]  # [B, T], or B prompts of any lengths (lists or 1-D tensors)


@dataclass(frozen=True)
class GenerationStats:
    n_prompt: int  # prompt tokens per sequence (the longest, in a ragged batch)
    n_new: int  # steps run: new tokens per sequence, at most
    prefill_s: float  # prompt forward pass + choosing the first new token
    decode_s: float  # the timed decode steps, one new token per sequence each
    decode_tokens: int  # how many decode steps decode_s covers
    compile_s: float = 0.0  # compiled steps: the first decode step, which compiles (or loads) the graph
    batch: int = 1  # sequences decoded together
    # speculative decoding only (0 otherwise): rounds run, and over all rows: tokens drafted, drafted tokens
    # the target agreed with, and drafted tokens past the generation's end (verified and dropped: neither accepted nor not)
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_past_end: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (tokens/s of each sequence)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Speculative decoding: the share of drafted tokens the target accepted
        (of those inside the generation)."""
        judged = self.drafted - self.drafted_past_end
        return self.accepted / judged if judged else float("nan")

    @property
    def drafted_per_pass(self) -> float:
        """Speculative decoding: tokens drafted per target pass and row (k, or its mean when adaptive)."""
        return self.drafted / (self.target_passes * self.batch) if self.target_passes else float("nan")

    @property
    def tokens_per_pass(self) -> float:
        """Speculative decoding: tokens emitted per target pass after the prompt's."""
        return (self.n_new - 1) / self.target_passes if self.target_passes else float("nan")


class Stream:
    """One generation, run by iterating it. Each item is the next token of
    every row ([B] int64); after the last, or once :meth:`close` ends it
    early, :attr:`stats` is set (reading it before raises one clear line).
    :meth:`tokens` and :meth:`rows` run it to its end.

    Per step, the loop touches the host only for the stop check (one sync,
    with ``stop_token``); the position advances on the device and the noise is
    drawn on the generator's device. Each call is handed the part of the state
    it touches (``Steps.window``: the cache's first positions, up to the
    highest this call writes, which the loop follows on the host). Timings
    count the steps only, not the caller's work between tokens: on CUDA each
    interval ends when the step is queued, and the final synchronisation is
    added to ``decode_s``.
    """

    def __init__(self, params: Params, steps: Steps, prompts: list[list[int]], limits: list[int],
                 stop_token: Optional[int], noise: Callable[[int, bool], Optional[Tensor]]):  # fmt: skip
        self.params, self.steps, self.prompts, self.limits = params, steps, prompts, limits
        self.stop_token, self.noise = stop_token, noise
        self._stats: Optional[GenerationStats] = None
        self._made: list[Tensor] = []
        self._loop = self._run()

    def __iter__(self) -> Iterator[Tensor]:
        return self._loop

    def close(self) -> None:
        """End the generation here, e.g. at a stop string: no more steps run,
        and :attr:`stats` count the tokens yielded so far. ``with generate(...)
        as stream:`` closes it on leaving the block."""
        self._loop.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> GenerationStats:
        """The generation's timings and counts, once it has run to its end or been closed."""
        if self._stats is None:
            raise GPT2FnError("the stream has not run to its end yet: iterate it, close it, or call .tokens() or "
                              ".rows(), then read its stats")  # fmt: skip
        return self._stats

    def tokens(self) -> Tensor:
        """Run to the end: every step's tokens, [B, n_new] (rows go on past
        their own stop token while others are still running)."""
        for _ in self._loop:
            pass
        if not self._made:
            return torch.empty(len(self.prompts), 0, dtype=torch.long)
        return torch.stack(self._made, dim=1)

    def rows(self) -> list[list[int]]:
        """Run to the end: each row's own new tokens, up to its last (:meth:`is_last`)."""
        return [row[: next((n for n, t in enumerate(row, 1) if self.is_last(i, n, t)), len(row))]
                for i, row in enumerate(self.tokens().tolist())]  # fmt: skip

    def is_last(self, row: int, n: int, token: int) -> bool:
        """Whether ``token``, the ``n``-th new token of ``row`` (from 1), ends
        that row: its stop token (which is kept) or its length limit. Later
        tokens of the row are computed while others run, and mean nothing."""
        return token == self.stop_token or n == self.limits[row]

    def _run(self) -> Iterator[Tensor]:
        """The one decode loop."""
        params, steps, prompts, stop = self.params, self.steps, self.prompts, self.stop_token
        device = params_device(params)
        B, T, n_steps = len(prompts), max(len(p) for p in prompts), max(self.limits)
        if n_steps == 0:
            self._stats = GenerationStats(T, 0, 0.0, 0.0, 0, batch=B)
            return
        length = max(len(p) + n for p, n in zip(prompts, self.limits))  # the cache: the longest row's end
        tokens, pos = ragged_batch(prompts, device)
        limits = torch.tensor(self.limits, device=device)
        state = steps.make_state(params, B, length)
        windows = {}  # n -> the state's first n positions (Steps.window), made once each

        def state_for(end: int) -> State:
            """The state for a call that touches positions < end."""
            if steps.window is None:
                return state
            n = window_len(end, length)
            if n not in windows:
                windows[n] = steps.window(state, n)
            return windows[n]

        warm_up(device)

        start = time.perf_counter()
        with torch.inference_mode():
            token = steps.prefill(params, tokens, pos, state_for(T), self.noise(B, False))
        synchronize(device)
        prefill_s = time.perf_counter() - start
        self._made.append(token)
        pos, decode_s, compile_s = pos[:, -1:], 0.0, 0.0
        n_new, advance, decode_tokens = 1, 1, 0
        try:
            yield token
            done = None if stop is None else (token == stop) | (limits <= 1)
            top = T - 1  # the highest position in pos, on the host
            running = not self._all_stopped(done)  # the stop check: one sync a token, and only with a stop token
            while running and n_new < n_steps:
                start = time.perf_counter()
                with torch.inference_mode():
                    pos = (pos + advance).clamp_(max=length - 1)  # rows past their own end write a slot nobody reads
                    top = min(top + advance, length - 1)
                    new = steps.decode(params, token[:, None], pos, state_for(top + steps.chained), self.noise(B, True))
                compiling = steps.compiled and n_new == 1  # the first compiled step pays for compiling
                if compiling:
                    synchronize(device)
                    compile_s = time.perf_counter() - start
                else:
                    decode_s += time.perf_counter() - start
                new = new[:, None] if new.dim() == 1 else new  # [B, m]: m > 1 for a chain or a speculative round
                advance = new.shape[1]
                for token in new.unbind(1)[: n_steps - n_new]:  # what a chain computes past the end is dropped
                    if done is not None:
                        done = done | (token == stop) | (limits <= n_new + 1)
                    n_new += 1
                    decode_tokens += not compiling
                    self._made.append(token)
                    yield token
                    if self._all_stopped(done):
                        running = False
                        break
        finally:  # the end, or the caller closing the stream early: the stats of the tokens yielded
            start = time.perf_counter()
            synchronize(device)
            decode_s += time.perf_counter() - start
            extra = steps.report(state) if steps.report else {}
            self._stats = GenerationStats(T, n_new, prefill_s, decode_s, decode_tokens, compile_s, B, **extra)

    @staticmethod
    def _all_stopped(done: Optional[Tensor]) -> bool:
        """Whether every row has stopped (a sync), or False without a stop token (no sync)."""
        return done is not None and bool(done.all())


def ragged_batch(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts of any lengths as one batch, tokens [B, T] and their positions
    [B, T] (T the longest): a shorter prompt padded by repeating its last
    token at its last position (see the module docstring)."""
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([p + p[-1:] * (T - len(p)) for p in prompts], device=device)
    pos = torch.tensor([[min(t, len(p) - 1) for t in range(T)] for p in prompts], device=device)
    return tokens, pos


def warm_up(device: torch.device) -> None:
    """Start the device's libraries before anything is timed (on CUDA the
    first matrix product creates the context and the cuBLAS handle)."""
    if device.type == "cuda":
        x = torch.ones(8, 8, device=device)
        (x @ x).sum().item()


def generate(
    params: Params,
    config: GPTConfig,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    bad_words_ids: Optional[list[list[int]]] = None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    attention: str = "auto",
    stop_token: Optional[int] = None,
    compile: bool = False,
    draft: Optional[tuple[Params, GPTConfig] | PromptLookup] = None,
    draft_tokens: int = 4,
    adaptive_draft: bool = False,
    tokens_per_call: int = 1,
    tap: Optional[Tap] = None,
) -> Stream:
    """Generate up to ``max_new_tokens`` per prompt; returns the :class:`Stream`.

    ``prompts``: a [B, T] int64 tensor (prompt + new tokens must fit the
    context, or this raises), or a list of token lists of any lengths (each
    row then also stops when it reaches the context). A row stops at
    ``stop_token`` (which it yields); the stream ends when every row has.
    ``temperature=0`` is greedy; ``top_k``, ``top_p``, ``min_p`` and ``typical_p`` filter
    (:mod:`gpt2fn.sampling`); the draws come from ``generator``. Four rules
    read each row's text so far, its prompt included, greedy too, as
    Hugging Face's do: a ``repetition_penalty`` above 1 makes every token the
    row has had less likely (:func:`~gpt2fn.sampling.penalize_repeats`),
    ``no_repeat_ngram_size`` = n never lets a row repeat an n-gram
    (:func:`~gpt2fn.sampling.repeated_ngrams`). ``bad_words_ids`` (token
    lists) are never completed, as Hugging Face's are
    (:func:`~gpt2fn.sampling.banned_words`; a word that is the stop token
    alone is dropped, as it drops it). ``min_new_tokens`` = m
    keeps ``stop_token`` from being chosen as any row's first m new tokens,
    as Hugging Face's ``min_new_tokens`` does (:func:`~gpt2fn.sampling.hold_stop`).
    The steps then carry each row's tokens and where its new ones start
    (:class:`~gpt2fn.steps.History`); speculative rounds apply the four to
    the draft's choices and the target's, drafted tokens included.
    ``use_cache`` and ``compile`` pick the steps (see :mod:`gpt2fn.steps`);
    ``attention`` is "manual", "sdpa" or "auto"
    (:func:`gpt2fn.steps.resolve_attention`). The first compiled decode step
    is reported as ``compile_s`` and left out of ``decode_s``.

    ``draft`` = (params, config) turns on speculative decoding
    (:mod:`gpt2fn.speculative`; e.g. ``(self_draft(params, "int8"), config)``,
    or a draft over part of the vocabulary, ``(draft_vocab(self_draft(params,
    "int8"), frequent_tokens(text_tokens, 2048, config.vocab_size)), config)``),
    or ``PromptLookup()``, which drafts what followed the last n-gram
    earlier in the text, no model (:class:`gpt2fn.speculative.PromptLookup`:
    Hugging Face's ``prompt_lookup_num_tokens``),
    proposing ``draft_tokens`` tokens per target pass (with ``adaptive_draft``,
    at most that many, adapted to the acceptance: see
    :func:`gpt2fn.speculative.next_k`), cached; the rows of a batch advance
    together, by the fewest drafted tokens any row accepted, plus one
    (:func:`gpt2fn.speculative.speculative_round`).

    ``tokens_per_call`` > 1 (cached, no draft) runs that many decode steps
    per call, each chosen token fed to the next (:func:`gpt2fn.steps.chain`),
    and the stream yields them one by one after the call: the same tokens
    as one step a call (greedy; sampled too on the CPU, which draws the
    same random numbers), for fewer calls. Compiled on CUDA (one CUDA graph
    replay a call), and on the CPU for a model narrower than GPT-2, the
    whole chain is one graph, which pays a step's fixed cost (the call, its
    guards) once a call: worth it where tokens need not appear one at a
    time. Compiled GPT-2 sizes on the CPU run one token a call whatever it
    says (:func:`gpt2fn.steps.compiled_steps`). A generation may compute up to
    ``tokens_per_call - 1`` steps past its end, which it discards.

    ``tap(name, layer, tensor)`` observes and intervenes while generating,
    as in :func:`~gpt2fn.model.forward` (:mod:`gpt2fn.interp`: steering by
    adding to ``resid``, a head zeroed by ``zero_head_tap``, recording):
    it sees the prompt's call ([B, T, ...]; in a ragged batch a shorter
    prompt is padded with its last token at its last position), then each
    new token's ([B, 1, ...]; ``attn_probs``, with ``attention="manual"``,
    over the cache's first positions, a multiple of 16 or all of them,
    those not yet written at probability 0). Taps run in the eager cached steps only: with
    ``compile``, ``use_cache=False`` or a draft it raises.
    Raises :class:`~gpt2fn.errors.GPT2FnError` on bad input, before any work.
    """
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size, min_new_tokens,
                        stop_token, typical_p)  # fmt: skip
    check_int("tokens_per_call", tokens_per_call)
    words = () if bad_words_ids is None else check_bad_words(bad_words_ids, config.vocab_size, stop_token)
    rules = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                 min_new_tokens=min_new_tokens, bad_words_ids=words)  # fmt: skip
    if tokens_per_call > 1 and (draft is not None or not use_cache):
        raise GPT2FnError("tokens_per_call chains cached plain decode steps; drop it, "
                          + ("or the draft (speculative rounds emit several tokens a call already)" if draft is not None
                             else "or keep the KV cache on"))  # fmt: skip
    prompts = prompt_lists(config, prompts, max_new_tokens)
    device = params_device(params)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p)
    if reads_history(**rules):
        sampling.update(rules, **({"stop_token": stop_token} if min_new_tokens else {}))
    width = (noise_width(config.vocab_size, top_k),)  # the random numbers a step needs per row
    if draft is None:
        if adaptive_draft:
            raise GPT2FnError("adaptive_draft adapts speculative decoding; pass a draft too")
        steps = make_steps(config, device, len(prompts), use_cache, compile, attention, tokens_per_call, tap, **sampling)
    else:
        if not use_cache:
            raise GPT2FnError("speculative decoding needs the KV cache; drop the draft or keep the cache on")
        if tap is not None:
            raise GPT2FnError("a tap runs in the eager cached steps, not in speculative rounds; drop the draft to "
                              "generate with it")  # fmt: skip
        for p in prompts:
            check_draft(config, draft, draft_tokens, len(p), min(max_new_tokens, config.n_ctx - len(p)))
        steps = speculative_steps(config, draft, draft_tokens, adaptive=adaptive_draft, device=device,
                                  compile=compile, attention=attention, batch=len(prompts), **sampling)  # fmt: skip
        width = (draft_tokens + 1, 2)  # one block per round, for the largest k (see accept_sampled)

    def noise(batch: int, decode: bool) -> Optional[Tensor]:
        """One call's random numbers: [B, W] for a step, [B, n, W] for a chain
        of n (drawn in the order n steps would draw them), [B, k + 1, 2] for a
        speculative round (its prefill takes [:, 0, 0])."""
        if temperature == 0:
            return None
        at = generator.device if generator else device
        if decode and steps.chained > 1:  # what the steps chain, not what was asked (see compiled_steps)
            return uniform_noise((steps.chained, batch, *width), generator, at).to(device).transpose(0, 1)
        return uniform_noise((batch, *width), generator, at).to(device)

    limits = [min(max_new_tokens, config.n_ctx - len(p)) for p in prompts]
    return Stream(params, steps, prompts, limits, stop_token, noise)


def prompt_lists(config: GPTConfig, prompts: Prompts, max_new_tokens: int) -> list[list[int]]:
    """The prompts as token lists, after one clear line for any that cannot
    run: a [B, T] tensor (each prompt with its new tokens must fit the
    context) or a list of prompts, each a list of ids or a 1-D tensor (each
    row stops at the context), of token ids of the model."""
    check_int("max_tokens", max_new_tokens, low=0)
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or len(prompts) == 0:
            hint = "; for one prompt pass ids[None]" if prompts.dim() == 1 else ""
            raise GPT2FnError(f"a prompt tensor is [B, T] token ids, got shape {list(prompts.shape)}{hint}")
        check_sequence_fits(config, prompts.shape[1], max_new_tokens)
        prompts = prompts.tolist()
    elif not isinstance(prompts, (list, tuple)):
        raise GPT2FnError(f"prompts are a [B, T] tensor or a list of token lists, got {type(prompts).__name__}")
    else:
        prompts = [p.tolist() if isinstance(p, Tensor) and p.dim() == 1 else p for p in prompts]
        odd = next((i for i, p in enumerate(prompts) if not isinstance(p, (list, tuple))), None)
        if odd is not None:
            p = prompts[odd]
            what = (f"a tensor of shape {list(p.shape)} as prompt {odd + 1} (a prompt in a list is 1-D)"
                    if isinstance(p, Tensor) else f"{type(p).__name__} as prompt {odd + 1}")  # fmt: skip
            if all(isinstance(t, int) for t in prompts):
                what = "a list of token ids; for one prompt pass [ids]"
            raise GPT2FnError(f"prompts are a [B, T] tensor or a list of token lists, got {what}")
        check_prompts(config, prompts)
    for i, p in enumerate(prompts):
        check_token_ids(f"prompt {i + 1}", p, config.vocab_size)
    return [list(p) for p in prompts]


def check_sequence_fits(config: GPTConfig, n_prompt: int, max_new_tokens: int) -> None:
    """Raise one clear line if a prompt plus the tokens to generate do not fit."""
    if n_prompt == 0:
        raise GPT2FnError("the prompt is empty; give at least one token of text")
    if n_prompt > config.n_ctx:
        raise GPT2FnError(f"the prompt is {n_prompt} tokens but the context holds {config.n_ctx}; shorten the prompt")
    if n_prompt + max_new_tokens > config.n_ctx:
        raise GPT2FnError(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_new_tokens}) exceeds the {config.n_ctx}-token context; "
            f"use max_tokens <= {config.n_ctx - n_prompt} or a shorter prompt"
        )


def check_prompts(config: GPTConfig, prompts: list[list[int]]) -> None:
    """One clear line for a batch that cannot run."""
    if not prompts:
        raise GPT2FnError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise GPT2FnError(f"prompt {i + 1} is empty; give at least one token of text")
        if len(p) > config.n_ctx:
            raise GPT2FnError(f"prompt {i + 1} is {len(p)} tokens but the context holds {config.n_ctx}; shorten it")


def generate_all(params: Params, config: GPTConfig, prompts: Prompts, max_new_tokens: int, **kwargs) -> tuple[Tensor, GenerationStats]:
    """Run :func:`generate` to the end: (new tokens [B, n_new], stats)."""
    stream = generate(params, config, prompts, max_new_tokens, **kwargs)
    return stream.tokens(), stream.stats
