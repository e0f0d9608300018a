"""Self-speculative drafters: the target drafts for itself with part of its layers.

Both drafters run the target's own weights on the target's own cache (``Context.cache``, which
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
``assistant_confidence_threshold`` (:func:`genrefine.policy.confident_prefix_len` with
``inclusive=True`` counts the same tokens). ``with_adaptive_stop`` replaces the threshold by a
:class:`~genrefine.policy.DraftStop` (the methods' default when no confidence is given): drafting
goes on while one more token pays under the target's cost table, a draft token priced by the
weights it reads (:func:`draft_cost`), with the confidence calibrated against what is accepted.

Sampling: the drafts are deterministic (``Draft.probs is None``, a point mass on each greedy
draft token). Speculative sampling accepts such a token with probability ``p(token)`` and
otherwise samples from ``p`` without it, so the output keeps exactly the target's distribution;
it just accepts fewer tokens than a drafter that samples from ``q`` would at high temperatures.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import fields

import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, StepFeedback

DEFAULT_CONFIDENCE = 0.5


def default_exit_layer(num_layers: int) -> int:
    """``L - L // 6`` (at least 1): deep, because a model not trained for early exit predicts
    nothing useful from its middle layers (Gemma 3 270M, 18 layers: exit 9 agrees with the full
    model on about 5% of tokens, exit 15 on about 50%, see the method's measurements)."""
    return max(1, num_layers - max(1, num_layers // 6))


def layer_weights(model) -> list[int]:
    """Weights (parameter count) of each layer of a native model, for cost estimates."""
    out = []
    for lw in model.layers:
        out.append(
            sum(
                int(t.numel())
                for f in fields(lw)
                if isinstance(t := getattr(lw, f.name), Tensor)
            )
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
    :class:`~genrefine.policy.DraftStop`), when it says so. Returns ``(tokens [n] long,
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
                if not stop.add(float(top_p)):
                    break
            elif float(top_p) < confidence:  # one host sync per draft token
                break
    finally:
        cache.rollback(fed)
    return torch.cat(toks).cpu(), torch.cat(tops).cpu()


def _target_cache(ctx: Context, name: str):
    if ctx.cache is None:
        raise ConfigError(
            f"the {name} drafter runs the target model and needs its cache (Context.cache); "
            "use it through the engine"
        )
    return ctx.cache


def _reduced_head(model, vocab_ids: Tensor | None):
    if vocab_ids is None:
        return None, model.vocab_size
    ids = torch.as_tensor(vocab_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= model.vocab_size:
        raise ConfigError(
            f"the draft vocabulary must be token ids in [0, {model.vocab_size}), got "
            f"{ids.numel()} ids"
        )
    return model.reduced_head(ids), int(ids.numel())


def _check_confidence(confidence: float) -> None:
    if not 0.0 <= confidence <= 1.0:
        raise ConfigError(f"the draft confidence threshold must be in [0, 1], got {confidence}")


class EarlyExitDrafter:
    """Drafts with the first ``exit_layer`` layers, the final norm and the (reduced) head.

    ``exit_layer == num_layers`` (allowed with ``vocab_ids`` only) drafts with every layer and
    saves only on the head: for small models with large vocabularies that is the cheapest
    self-draft that stays accurate (FR-Spec's reduced head on the target itself).
    """

    name = "early-exit"

    def __init__(
        self,
        model,
        exit_layer: int,
        vocab_ids: Tensor | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> None:
        L = model.num_layers
        top = L if vocab_ids is not None else L - 1
        if not 1 <= exit_layer <= top:
            raise ConfigError(
                f"the exit layer must be between 1 and {top} (the model has {L} layers; "
                f"exiting after all {L} drafts with the whole model and only makes sense with a "
                f"reduced vocabulary), got {exit_layer}"
            )
        _check_confidence(confidence)
        self.model = model
        self.exit_layer = exit_layer
        self.layers = list(range(exit_layer))
        self.head, self.head_rows = _reduced_head(model, vocab_ids)
        self.confidence = confidence
        self.stop = None

    @property
    def cost(self) -> float:
        """Estimated cost of a draft token relative to a target forward (see :func:`draft_cost`)."""
        return draft_cost(self.model, self.layers, self.head_rows)

    def with_adaptive_stop(self, verify_cost) -> "EarlyExitDrafter":
        """Decide draft lengths with a :class:`~genrefine.policy.DraftStop` instead of the
        confidence threshold: a draft token priced at :attr:`cost` of a one-token target forward
        (``verify_cost(1)``)."""
        from ..policy import DraftStop

        self.stop = DraftStop(verify_cost, self.cost * verify_cost(1))
        return self

    def reset(self) -> None:
        if self.stop is not None:
            self.stop.reset()

    def propose(self, ctx: Context, budget: int) -> Draft:
        cache = _target_cache(ctx, self.name)
        toks, _ = greedy_self_draft(
            self.model, cache, ctx.tokens[-1:], budget, self.layers, self.head, self.confidence,
            self.stop,
        )
        if self.stop is not None:
            toks = toks[: self.stop.keep(cut=False)]  # verified whole: see SkipLayerDrafter
        return Draft.chain(toks)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """The adaptive stop (if any) learns how sure the draft is."""
        if self.stop is not None:
            self.stop.observe(feedback.result.num_accepted)


class SkipLayerDrafter:
    """Drafts with every layer except a skip set that it tunes while it generates (SWIFT).

    The search, deterministic given the same sequence of steps (no clock is read):

    * The first and last layers always run; only *middle* layers ``1 .. L-2`` may be skipped.
      Unless ``skip`` gives the initial set, the search starts on the accurate side and skips
      more while acceptance allows: with a reduced vocabulary from nothing skipped, otherwise
      from the single middle layer ``L // 2``. (SWIFT's regime, skipping about every other layer,
      suits large models: ``skip=range(1, L - 1, 2)``. On Gemma 3 270M it accepts almost
      nothing, and from there no single flip improves the score, so the search stays stuck.)
    * Each verified step is scored as tokens per unit of target time:
      ``(accepted + 1) / (1 + drafted * c(S))`` where ``c(S)`` = :func:`draft_cost` of the layers
      run with skip set ``S`` (a verify forward counts 1; plain decoding therefore scores 1).
      A window's score is the ratio of the sums.
    * After ``probe_every`` steps with the current set (the *incumbent*), the next
      ``trial_steps`` steps draft with a *candidate*: the incumbent with one middle layer flipped.
      The direction follows the incumbent's acceptance rate over its last ``probe_every`` steps
      (accepted / drafted): below ``target_acceptance`` a skipped layer is run again, otherwise
      one more layer is skipped. Which layer: the next one in the direction's round robin over
      ``1 .. L-2`` (a cursor that keeps cycling); when no layer can move in that direction, any
      flip is tried. An empty skip set is allowed only with a reduced vocabulary (otherwise the
      draft would be the target itself).
    * The candidate becomes the incumbent when its trial window scores higher than the
      incumbent's last ``probe_every`` steps.

    ``history`` lists ``(step, skip set)`` for the initial set and every adoption. The search
    state carries over between generations on purpose: it learns about the model, not the text.
    """

    name = "swift"

    def __init__(
        self,
        model,
        skip: Sequence[int] | None = None,
        vocab_ids: Tensor | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
        probe_every: int = 8,
        trial_steps: int = 4,
        target_acceptance: float = 0.6,
    ) -> None:
        L = model.num_layers
        if L < 3:
            raise ConfigError(
                f"layer skipping needs a model with at least 3 layers (first and last always "
                f"run), this one has {L}"
            )
        if probe_every < 1 or trial_steps < 1:
            raise ConfigError(
                f"probe_every and trial_steps must be >= 1, got {probe_every}, {trial_steps}"
            )
        _check_confidence(confidence)
        if not 0.0 <= target_acceptance <= 1.0:
            raise ConfigError(f"target_acceptance must be in [0, 1], got {target_acceptance}")
        self.model = model
        self.middle = list(range(1, L - 1))
        self.head, self.head_rows = _reduced_head(model, vocab_ids)
        self.allow_empty = self.head is not None
        if skip is None:
            initial = frozenset() if self.allow_empty else frozenset({L // 2})
        else:
            initial = frozenset(int(i) for i in skip)
        if not (initial or self.allow_empty) or not initial <= set(self.middle):
            raise ConfigError(
                f"the skip set must be a subset of the middle layers 1..{L - 2}, non-empty "
                f"unless the draft vocabulary is reduced, got {sorted(initial)}"
            )
        self.target_acceptance = target_acceptance
        self.confidence = confidence
        self.probe_every, self.trial_steps = probe_every, trial_steps
        self._weights = layer_weights(model)
        self.skip = initial  # the incumbent
        self.trial: frozenset[int] | None = None  # the candidate being tried, if any
        # per verified step: (accepted, drafted, cost of the step in target forwards)
        self._window: deque[tuple[int, int, float]] = deque(maxlen=probe_every)
        self._trial_window: list[tuple[int, int, float]] = []
        self._since_probe = 0
        self._next_flip = 0  # index into self.middle
        self.steps = 0
        self.history: list[tuple[int, frozenset[int]]] = [(0, initial)]
        self.stop = None
        self._verify_cost = None

    # ------------------------------------------------------------------ cost and score
    def layers_run(self, skip: frozenset[int]) -> list[int]:
        return [i for i in range(self.model.num_layers) if i not in skip]

    def cost(self, skip: frozenset[int]) -> float:
        """Estimated cost of a draft token with ``skip`` relative to a target forward."""
        return draft_cost(self.model, self.layers_run(skip), self.head_rows, self._weights)

    @staticmethod
    def score(window: Sequence[tuple[int, int, float]]) -> float:
        """Tokens per unit of target time over a window of ``(accepted, drafted, cost)`` steps."""
        cost = sum(c for _, _, c in window)
        return sum(a + 1 for a, _, _ in window) / cost if cost > 0 else 0.0

    @property
    def active(self) -> frozenset[int]:
        """The skip set the next draft uses."""
        return self.trial if self.trial is not None else self.skip

    # ------------------------------------------------------------------ drafter
    def with_adaptive_stop(self, verify_cost) -> "SkipLayerDrafter":
        """Decide draft lengths with a :class:`~genrefine.policy.DraftStop` instead of the
        confidence threshold, a draft token priced at :meth:`cost` of the skip set in use times
        ``verify_cost(1)``. Drafts are verified whole (never cut after drafting), so that the
        search's score counts every token drafted."""
        from ..policy import DraftStop

        self._verify_cost = verify_cost
        self.stop = DraftStop(verify_cost, self.cost(self.active) * verify_cost(1))
        return self

    def reset(self) -> None:
        """The search goes on across generations; the adaptive stop's calibration starts over."""
        if self.stop is not None:
            self.stop.reset()

    def propose(self, ctx: Context, budget: int) -> Draft:
        cache = _target_cache(ctx, self.name)
        if self.stop is not None:
            self.stop.draft_cost = self.cost(self.active) * self._verify_cost(1)
        toks, _ = greedy_self_draft(
            self.model,
            cache,
            ctx.tokens[-1:],
            budget,
            self.layers_run(self.active),
            self.head,
            self.confidence,
            self.stop,
        )
        if self.stop is not None:
            toks = toks[: self.stop.keep(cut=False)]
        return Draft.chain(toks)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        if self.stop is not None:
            self.stop.observe(feedback.result.num_accepted)
        self.steps += 1
        n = len(feedback.draft)
        record = (feedback.result.num_accepted, n, 1.0 + n * self.cost(self.active))
        if self.trial is not None:
            self._trial_window.append(record)
            if len(self._trial_window) >= self.trial_steps:
                self._finish_trial()
            return
        self._window.append(record)
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self.trial = self._next_candidate()
            self._trial_window = []

    def _next_candidate(self) -> frozenset[int] | None:
        drafted = sum(n for _, n, _ in self._window)
        accepted = sum(a for a, _, _ in self._window)
        run_again = accepted < self.target_acceptance * drafted  # else skip one more
        for directed in (True, False):
            for _ in range(len(self.middle)):
                layer = self.middle[self._next_flip]
                self._next_flip = (self._next_flip + 1) % len(self.middle)
                if directed and (layer in self.skip) != run_again:
                    continue
                cand = frozenset(self.skip ^ {layer})
                if cand or self.allow_empty:
                    return cand
        return None  # a single middle layer and nothing else to try

    def _finish_trial(self) -> None:
        assert self.trial is not None
        if self.score(self._trial_window) > self.score(self._window):
            self.skip = self.trial
            self._window = deque(self._trial_window, maxlen=self.probe_every)
            self.history.append((self.steps, self.skip))
        self.trial = None
        self._trial_window = []
        self._since_probe = 0
