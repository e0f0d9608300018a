"""Confident adaptive language modeling (CALM): per token, stop at an early layer. LOSSY.

Method ``calm``. Unlike every draft-and-verify method this one changes the output: a token whose
early-layer prediction is confident enough is emitted without running the remaining layers, and
nothing checks it against the full model. It is here as the lossy reference point for the
lossless self-speculative drafters of :mod:`genrefine.methods.parts.self_draft`.

Per token (Schuster et al., 2022, with softmax confidence and state propagation):

1. The layers run in groups ending at the *exit points* (layer counts, default every
   ``L // 6`` layers from ``2 L // 3`` on). After each group, the hidden state goes through the
   final norm and the output head (the full vocabulary, or a reduced one from
   :mod:`genrefine.vocab`, which makes each check cheaper).
2. When the top softmax probability there *exceeds* ``threshold``, the token exits: it is the
   argmax (or, when sampling, a sample) of that distribution. A threshold of 1.0 or more never
   exits early, and the output is then exactly plain decoding's.
3. State propagation: the layers after the exit still need keys and values at this position for
   the tokens that come later. The exit layer's hidden state stands in for each skipped layer's
   input and only their key/value projections run (:meth:`NativeModel.write_kv`).

Without an exit the last layer's full-vocabulary logits decide the token, as in plain decoding.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence

import torch
from torch import Tensor

from ..engine import Stats, _truncate, prefill
from ..errors import ConfigError
from ..sampling import make_generator, next_token
from ..types import SamplingParams
from .base import Method, MethodOptions, MethodSpec
from .parts.draft_vocab import reduced_vocab


def default_exit_points(num_layers: int) -> list[int]:
    """Layer counts after which CALM checks its confidence: every ``max(1, L // 6)`` layers
    from ``max(1, 2 L // 3)`` on, below ``L`` (18 layers: 12, 15). Earlier exits are rarely
    right in models not trained for them (Gemma 3 270M: the few tokens confident above 0.9 at
    layer 9 are all wrong), and each check costs an output projection."""
    step = max(1, num_layers // 6)
    return list(range(max(1, 2 * num_layers // 3), num_layers, step))


def calm_generate(
    model,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    threshold: float,
    eos_ids: frozenset[int] = frozenset(),
    stats: Stats | None = None,
    params: SamplingParams | None = None,
    vocab_ids: Tensor | None = None,
    exit_points: Sequence[int] | None = None,
    layers_used: list[int] | None = None,
) -> Generator[list[int], None, str]:
    """Decode with confident early exits; yields lists of new token ids like
    :meth:`Engine.generate` and returns the finish reason ("stop" at EOS, else "length").

    prompt_ids: [L] token ids. threshold: exit when the top probability exceeds it.
    vocab_ids: [v] token ids of a reduced confidence head (None: full vocabulary).
    exit_points: layer counts to check after (default :func:`default_exit_points`).
    layers_used: when given, receives the number of layers each decoded token ran.
    ``stats.steps`` counts decoded tokens (one pass each; the first comes from the prefill).
    """
    L = model.num_layers
    points = (
        default_exit_points(L) if exit_points is None else sorted(set(int(e) for e in exit_points))
    )
    if any(not 1 <= e < L for e in points):
        raise ConfigError(f"CALM exit points must be layer counts in [1, {L - 1}], got {points}")
    if not threshold > 0.0:
        raise ConfigError(
            f"the CALM threshold must be > 0 (1.0 never exits early), got {threshold}"
        )
    params = params or SamplingParams()
    generator = None if params.greedy else make_generator(params, model.device)
    head = None if vocab_ids is None else model.reduced_head(torch.as_tensor(vocab_ids))
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    stats = stats if stats is not None else Stats("calm")
    stats.prompt_tokens = int(prompt.shape[0])
    t_start = time.perf_counter()
    try:
        cache = model.new_cache(min(model.max_context, prompt.shape[0] + max_new_tokens + 1))
        logits = prefill(model, cache, prompt)  # [1, V]
        tok = next_token(logits, params, generator).reshape(1)  # [1]
        stats.time_prefill = time.perf_counter() - t_start
        out, stop = _truncate([int(tok)], max_new_tokens, eos_ids)
        stats.new_tokens = len(out)
        if out:
            yield out
        if stop:
            return "stop"
        while stats.new_tokens < max_new_tokens and cache.length < cache.capacity:
            t0 = time.perf_counter()
            tok, used = _calm_token(model, cache, tok, points, threshold, head, params, generator)
            stats.time_verify += time.perf_counter() - t0
            stats.record_step(0, 0, None)
            if layers_used is not None:
                layers_used.append(used)
            t = int(tok)
            if t in eos_ids:
                return "stop"
            stats.new_tokens += 1
            stats.time_total = time.perf_counter() - t_start
            yield [t]
        return "length"
    finally:
        stats.time_total = time.perf_counter() - t_start


def _calm_token(
    model, cache, tok: Tensor, points: list[int], threshold: float, head, params, generator
) -> tuple[Tensor, int]:
    """Feed ``tok`` ([1] long) with early exits; returns (next token [1] long, layers run)."""
    L = model.num_layers
    start = cache.reserve(1)
    x = model.embed_tokens(tok.to(model.device))  # [1, hidden]
    done = 0
    with torch.inference_mode():
        for e in points:
            x = model.run_layers(x, cache, start, range(done, e))
            done = e
            logits = model.project(x, head)  # [1, v]
            if float(logits.softmax(dim=-1).max()) > threshold:  # exit
                model.write_kv(x, cache, start, range(e, L))
                cache.length = start + 1
                idx = next_token(logits, params, generator)  # [1]
                return (idx if head is None else head.ids[idx]), e
        x = model.run_layers(x, cache, start, range(done, L))
        cache.length = start + 1
        return next_token(model.project(x), params, generator), L


def build(model, opts: MethodOptions, tokenizer=None) -> Method:

    ids = reduced_vocab(model, opts, tokenizer)
    threshold = opts.calm_threshold

    def decode(model, prompt, max_new_tokens, params, eos_ids, stats):
        return calm_generate(
            model, prompt, max_new_tokens, threshold, eos_ids, stats, params=params, vocab_ids=ids
        )

    return Method("calm", decode=decode)


SPEC = MethodSpec(
    name="calm", lossless=False, build=build, native_only=True, order=13,
    summary="LOSSY early exit per token when the top probability passes --calm-threshold (CALM)",
)
