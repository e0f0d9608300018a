"""``swift``: self-speculation skipping layers, the skipped set searched while generating (SWIFT).

The target with a subset of its layers skipped drafts (shared KV cache, reduced head, see
:mod:`genrefine.methods.parts.self_draft`); all layers verify. Candidate skip sets are tried in
turn during generation and the one with the best measured acceptance per unit of drafting cost is
kept. The draft length is a :class:`~genrefine.methods.parts.draft_size.DraftStop`'s unless a
draft confidence is given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, Method, MethodOptions, MethodSpec, StepFeedback
from .parts.draft_vocab import reduced_vocab
from .parts.self_draft import (
    DEFAULT_CONFIDENCE,
    check_confidence,
    draft_cost,
    draft_head,
    greedy_self_draft,
    layer_weights,
    self_draft_kw,
    self_draft_method,
    target_cache,
)


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
        check_confidence(confidence)
        if not 0.0 <= target_acceptance <= 1.0:
            raise ConfigError(f"target_acceptance must be in [0, 1], got {target_acceptance}")
        self.model = model
        self.middle = list(range(1, L - 1))
        self.head, self.head_rows = draft_head(model, vocab_ids)
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
        """Decide draft lengths with a :class:`~genrefine.methods.parts.draft_size.DraftStop` instead of the
        confidence threshold, a draft token priced at :meth:`cost` of the skip set in use times
        ``verify_cost(1)``. Drafts are verified whole (never cut after drafting), so that the
        search's score counts every token drafted."""
        from .parts.draft_size import DraftStop

        self._verify_cost = verify_cost
        self.stop = DraftStop(verify_cost, self.cost(self.active) * verify_cost(1))
        return self

    def reset(self) -> None:
        """The search goes on across generations; the adaptive stop's calibration starts over."""
        if self.stop is not None:
            self.stop.reset()

    def propose(self, ctx: Context, budget: int) -> Draft:
        cache = target_cache(ctx, self.name)
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
            toks = toks[: self.stop(whole=True)]
        return Draft.chain(toks)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        if self.stop is not None:
            self.stop.observe(feedback.result.num_accepted, len(feedback.draft))
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


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    ids = reduced_vocab(model, opts, tokenizer, default=True)
    d = SkipLayerDrafter(model, vocab_ids=ids, **self_draft_kw(opts))
    return self_draft_method("swift", d, model, opts)


SPEC = MethodSpec(
    name="swift", lossless=True, build=build, native_only=True, order=6,
    summary="self-speculation skipping layers; the skip set is tuned while generating (SWIFT)",
)
