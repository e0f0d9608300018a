"""Self-speculation: the target drafts for itself with part of its layers.

What the two self-drafting methods share (their drafters are in
:mod:`genrefine.methods.early_exit_draft` and :mod:`genrefine.methods.swift`). Both drafters run the target's own weights on the target's own cache (``Context.cache``, which
holds the committed prefix): a draft token goes through a subset of the layers, then the final
norm and the output head (optionally over a reduced vocabulary, see :mod:`genrefine.vocab`), and
the draft is the greedy chain of those predictions. Everything a draft appends to the cache is
rolled back before :meth:`propose` returns; the verification forward then runs every layer over
``[root] + draft`` as for any other drafter, so the output is exactly the target's (lossless).

* :class:`EarlyExitDrafter` (method ``early-exit-draft``, LayerSkip's self-speculation): the first
  ``exit_layer`` layers. Their cache slots for the committed prefix are exactly what the draft
  model would have computed itself (the first ``E`` layers of the target *are* the draft model),
  so the draft is self-consistent with no cache of its own.
* :class:`SkipLayerDrafter` (method ``swift``, SWIFT): every layer except a *skip set*, which is
  chosen during generation by a deterministic search (see the class).

Both stop a draft early at the first token whose top draft probability (softmax over the draft
head) is below ``confidence``; that token is still proposed, as in transformers'
``assistant_confidence_threshold``. ``with_adaptive_stop`` replaces the threshold by a
:class:`~genrefine.methods.parts.draft_size.DraftStop` (the methods' default when no confidence is given): drafting
goes on while one more token pays under the target's cost table, a draft token priced by the
weights it reads (:func:`draft_cost`), with the confidence calibrated against what is accepted.

Sampling: the drafts are deterministic (``Draft.probs is None``, a point mass on each greedy
draft token). Speculative sampling accepts such a token with probability ``p(token)`` and
otherwise samples from ``p`` without it, so the output keeps exactly the target's distribution;
it just accepts fewer tokens than a drafter that samples from ``q`` would at high temperatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch
from torch import Tensor

from ...costs import target_costs
from ...errors import ConfigError
from ..base import Context, FixedPolicy, Method, MethodOptions

DEFAULT_CONFIDENCE = 0.5


def default_exit_layer(num_layers: int) -> int:
    """``L - L // 6`` (at least 1): deep, because a model not trained for early exit predicts
    nothing useful from its middle layers (``benchmarks/`` and the README measure the exit
    layers' agreement with the full model)."""
    return max(1, num_layers - max(1, num_layers // 6))


def layer_weights(model) -> list[int]:
    """Weights (parameter count) of each layer of a native model, for cost estimates."""
    out = []
    for lw in model.layers:
        out.append(
            sum(int(t.numel()) for f in fields(lw) if isinstance(t := getattr(lw, f.name), Tensor))
        )
    return out


def draft_cost(
    model, layers: Sequence[int], head_rows: int, per_layer: Sequence[int] | None = None
) -> float:
    """Estimated cost of one draft token relative to one target forward: the weights it reads
    (``layers`` plus a head of ``head_rows`` rows) over all weights a forward reads (every layer,
    the full head). Decoding small batches is memory-bound, so weights read track time; this
    needs no clock and so keeps decisions made from it deterministic. ``per_layer``:
    :func:`layer_weights`, computed when not given."""
    per_layer = layer_weights(model) if per_layer is None else per_layer
    head = model.hidden_size
    total = sum(per_layer) + model.vocab_size * head
    return (sum(per_layer[i] for i in layers) + head_rows * head) / total


def greedy_self_draft(
    model,
    cache,
    root: Tensor,
    budget: int,
    layers: Sequence[int],
    head=None,
    confidence: float = 0.0,
    stop=None,
) -> tuple[Tensor, Tensor]:
    """Draft a greedy chain of at most ``budget`` tokens with ``layers`` of the target.

    root: [1] long, the last decided token (not yet in ``cache``). head: a
    :class:`~genrefine.models.runtime.ReducedHead` or None (full vocabulary). Stops after the
    first token whose top probability is below ``confidence``, or, given ``stop`` (a
    :class:`~genrefine.methods.parts.draft_size.DraftStop`), when it says so. Returns ``(tokens [n] long,
    top_probs [n] float32)`` on the CPU, ``1 <= n <= budget``; ``cache`` is left as it was.
    """
    if stop is not None:
        stop.begin()
    assert root.shape == (1,), root.shape
    tok = root.to(model.device)
    toks: list[Tensor] = []
    tops: list[Tensor] = []
    fed = 0
    try:
        for _ in range(budget):
            logits = model.forward(tok, cache, layers=layers, vocab_subset=head).logits  # [1, v]
            fed += 1
            top_p, top_i = logits.softmax(dim=-1).max(dim=-1)  # [1], [1]
            tok = top_i if head is None else head.ids[top_i]
            toks.append(tok)
            tops.append(top_p)
            if stop is not None:
                if not stop.more(float(top_p)):
                    break
            elif float(top_p) < confidence:  # one host sync per draft token
                break
    finally:
        cache.rollback(fed)
    return torch.cat(toks).cpu(), torch.cat(tops).cpu()


def target_cache(ctx: Context, name: str):
    if ctx.cache is None:
        raise ConfigError(
            f"the {name} drafter runs the target model and needs its cache (Context.cache); "
            "use it through the engine"
        )
    return ctx.cache


def draft_head(model, vocab_ids: Tensor | None):
    if vocab_ids is None:
        return None, model.vocab_size
    ids = torch.as_tensor(vocab_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= model.vocab_size:
        raise ConfigError(
            f"the draft vocabulary must be token ids in [0, {model.vocab_size}), got "
            f"{ids.numel()} ids"
        )
    return model.reduced_head(ids), int(ids.numel())


def check_confidence(confidence: float) -> None:
    if not 0.0 <= confidence <= 1.0:
        raise ConfigError(f"the draft confidence threshold must be in [0, 1], got {confidence}")


def self_draft_kw(opts: MethodOptions) -> dict:
    return {} if opts.draft_confidence is None else {"confidence": opts.draft_confidence}


def self_draft_method(name: str, drafter, model, opts: MethodOptions) -> Method:
    """The :class:`Method` of a self-drafting ``drafter``: draft lengths from a
    :class:`~genrefine.methods.parts.draft_size.DraftStop` over the target's cost table unless
    ``opts.draft_confidence`` sets a threshold; at most ``opts.draft_len`` (default 8) tokens."""
    if opts.draft_confidence is None:
        drafter.with_adaptive_stop(target_costs(model))
    budget = opts.draft_len or 8
    return Method(name, [drafter], FixedPolicy(drafter, budget), budget, opts.acceptance)
