"""Draft-size control: how many drafted nodes are worth verifying on this machine.

One protocol, :class:`DraftSizer`, for the three controls:

* :class:`TreeCut`: scored trees (heads, EAGLE): a node's score is its path probability;
* :class:`ChainCut`: copied chains (prompt lookup, retrieval on chain-only backends): a token's
  score is its *context*, a tuple of features of how the copy came about;
* :class:`DraftStop`: drafters that draft one token per forward of their own (a draft model,
  self-drafting): a token's score is its top draft probability; it also says, while drafting,
  whether one more token pays (:meth:`DraftStop.more`).

Each keeps the prefix (best nodes first) that maximises expected tokens per second under the
target's cost table (:mod:`genrefine.costs`) and learns from what the target accepted
(:meth:`DraftSizer.observe`). None reads a clock, so seeded samples repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ...costs import target_costs
from ...errors import ConfigError
from ..base import MethodOptions


@runtime_checkable
class DraftSizer(Protocol):
    """Draft-size control, the one protocol of the three controls in this module.

    ``sizer(scores)`` returns how many leading nodes of a draft to verify, given one score per
    node (best first, a parent before its children; what a score is depends on the control),
    and remembers the cut; ``observe(accepted, verified)`` tells it what the target accepted of
    the ``verified`` nodes of that cut; ``reset()`` forgets what was learnt.
    """

    def __call__(self, scores: Sequence) -> int: ...

    def observe(self, accepted: int, verified: int) -> None: ...

    def reset(self) -> None: ...


class TreeCut:
    """How many of a tree's best nodes to verify, for drafters that know each node's path
    probability (the product of draft probabilities from the root to it).

    A node's path probability estimates the chance that the target accepts it, and the nodes a
    step accepts form one path, so the sum over the kept nodes estimates the accepted length. The
    cut keeps the ``n`` best nodes maximising ``(1 + c * sum of their probabilities) / cost(n + 1)``,
    the expected tokens per second of the step; ``c`` calibrates the draft's confidence against
    the accepted lengths seen so far in the generation (each sum starts with a step's worth, so
    ``c`` starts at 1). With flat forward times (a GPU) every node is kept; on a CPU, where each
    verified node costs a few percent of a step, trees stay small while the draft is unsure.
    Nothing here reads a clock, so a seeded sample gives the same tokens every time.
    """

    def __init__(self, cost) -> None:
        self.cost = cost  # callable: n new tokens -> seconds of one target forward
        self.reset()

    def reset(self) -> None:
        self.expected, self.got, self._pending = 2.0, 2.0, 0.0

    def size(self, probs: Sequence[float]) -> int:
        """How many of ``probs`` (path probabilities, best first, a parent before its children)
        to keep: at least one."""
        c = self.got / self.expected
        best_n, best_rate, gain = 1, -1.0, 1.0
        for n, p in enumerate(probs, 1):
            gain += c * p
            rate = gain / self.cost(n + 1)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def __call__(self, probs: Sequence[float]) -> int:
        """:meth:`size`, remembering the kept nodes' expected count for :meth:`observe`."""
        n = self.size(probs)
        self._pending = float(sum(probs[:n]))
        return n

    def observe(self, accepted: int, verified: int) -> None:
        """The target accepted ``accepted`` of the ``verified`` nodes of the last cut tree."""
        self.expected += self._pending
        self.got += accepted
        self._pending = 0.0


class DraftStop:
    """Adaptive draft length for a drafter that drafts one token per forward of its own (a draft
    model): when to stop drafting, and how many of the drafted tokens to verify.

    As in :class:`TreeCut`, the path probability ``P_n`` (the product of the top draft
    probabilities of the first ``n`` tokens) estimates the chance that the target accepts them
    all, so ``1 + c * (P_1 + .. + P_n)`` estimates the step's tokens, with ``c`` calibrated
    against the accepted lengths seen so far in the generation. A step that drafts ``n`` tokens
    costs ``n * draft_cost + verify(n + 1)``. After each token, drafting goes on while one more
    token, as sure as the last, would raise the expected tokens per second. A greedy draft is then
    cut to the prefix that maximises it (the drafting already paid); a sampled one is verified
    whole (see :meth:`__call__`). Each decision to draft on reads only the tokens before the next
    one, which keeps speculative sampling exact. Costs come from cached measurements, never a
    clock read during generation, so a seeded sample repeats.
    """

    def __init__(self, verify_cost, draft_cost: float) -> None:
        if not draft_cost >= 0.0:
            raise ConfigError(f"draft_cost must be >= 0 seconds, got {draft_cost}")
        self.verify = verify_cost  # callable: n new tokens -> seconds of one target forward
        self.draft_cost = float(draft_cost)
        self.reset()

    def reset(self) -> None:
        self.expected, self.got, self._pending = 2.0, 2.0, 0.0
        self.begin()

    def begin(self) -> None:
        """A new draft starts."""
        self._paths: list[float] = []
        self._gains = [1.0]

    def more(self, p: float) -> bool:
        """The next drafted token's top draft probability ``p``; returns whether to draft another."""
        c = self.got / self.expected
        path = (self._paths[-1] if self._paths else 1.0) * float(p)
        self._paths.append(path)
        gain = self._gains[-1] + c * path
        self._gains.append(gain)
        n, d = len(self._paths), self.draft_cost
        now = gain / (n * d + self.verify(n + 1))
        more = (gain + c * path * float(p)) / ((n + 1) * d + self.verify(n + 2))
        return more > now

    def __call__(self, probs: Sequence[float] | None = None, whole: bool = False) -> int:
        """How many of the drafted tokens to verify (at least one; all of them when ``whole``),
        remembered for :meth:`observe`. ``probs``: the drafted tokens' top draft probabilities;
        None means those told to :meth:`more` since :meth:`begin`. Sampled drafts must be
        verified whole: whether a token is verified would otherwise depend on the draft
        probabilities after it, so on the token itself, and speculative sampling would no longer
        be exact."""
        if probs is not None:
            self.begin()
            for p in probs:
                self.more(p)
        n = len(self._paths)
        if n == 0:
            return 0
        spent = n * self.draft_cost
        best = n
        if not whole:
            best = max(range(1, n + 1), key=lambda k: self._gains[k] / (spent + self.verify(k + 1)))
        self._pending = float(sum(self._paths[:best]))
        return best

    def observe(self, accepted: int, verified: int) -> None:
        """The target accepted ``accepted`` of the ``verified`` tokens of the last kept draft."""
        self.expected += self._pending
        self.got += accepted
        self._pending = 0.0


class ChainCut:
    """How many tokens of a deterministic chain draft (prompt lookup, retrieval) to verify.

    Copying drafters give no probabilities, but how a copy came about predicts its acceptance
    well: a token that every earlier match agrees on is accepted far more often than one a single
    match proposes, a copy that the previous step accepted in full usually goes on, and longer
    matches copy better. The drafter describes each token by a *context*, a short tuple of such
    features, most telling first. The token's acceptance rate (conditional on the tokens before it
    being accepted) is learned online for its context and depth (from 0, capped at
    :attr:`MAX_DEPTH`), shrunk towards the rate of the context's shorter prefixes at that depth,
    down to the empty one, which is shrunk towards an optimistic ``prior``. Sparse contexts thus
    borrow from coarser ones until they have data of their own.

    The cut keeps the ``n`` leading tokens (``0 <= n <= len``) maximising the expected tokens per
    second of the step, ``(1 + sum_j prod_{i<=j} p_i) / cost(n + 1)``; ``n = 0`` is a plain
    step. Where verifying a row costs a large share of a step (llama.cpp on a CPU) only confident
    copies are drafted; with flat forward times (a GPU) everything the drafter found is kept.
    Two kinds of exploration keep the rates from freezing where nothing is drafted: a cut chain
    gets one token more while the token past its end has been tried fewer than ``explore_tries``
    times in its context, and a chain whose first context the cut has skipped ``explore_every``
    times in a row gets up to ``explore_len`` tokens anyway. No clock is read, so seeded samples
    repeat.
    """

    MAX_DEPTH = 3

    def __init__(
        self,
        cost,
        prior: float = 0.9,
        weight: float = 2.0,
        explore_every: int = 16,
        explore_len: int = 4,
        explore_tries: int = 4,
    ) -> None:
        if not (0.0 < prior < 1.0) or weight <= 0 or explore_every < 1 or explore_len < 1:
            raise ConfigError(
                "need 0 < prior < 1, weight > 0, explore_every >= 1 and explore_len >= 1, got "
                f"{prior}, {weight}, {explore_every}, {explore_len}"
            )
        self.cost = cost  # callable: n new tokens -> seconds of one target forward
        self.prior, self.weight = prior, weight
        self.explore_every, self.explore_len = explore_every, explore_len
        self.explore_tries = explore_tries
        self.reset()

    def reset(self) -> None:
        """Forget every rate learnt."""
        self._stats: dict[tuple, list[float]] = {}  # (context prefix, depth) -> [tries, accepted]
        self._skips: dict[tuple, int] = {}  # first context -> chains skipped in a row
        self._pending: list[tuple] = []  # the kept tokens' contexts of the last cut

    def _tries(self, context: tuple, depth: int) -> float:
        return self._stats.get((context, min(depth, self.MAX_DEPTH)), (0.0, 0.0))[0]

    def rate(self, context: tuple, depth: int) -> float:
        """Estimated acceptance rate of a token in ``context`` at ``depth``, given the tokens
        before it were accepted."""
        d, w, p = min(depth, self.MAX_DEPTH), self.weight, self.prior
        for k in range(len(context) + 1):
            tries, acc = self._stats.get((context[:k], d), (0.0, 0.0))
            p = (acc + w * p) / (tries + w)
        return p

    def rates(self, contexts: Sequence[tuple]) -> list[float]:
        """:meth:`rate` of each token of a chain (token ``j`` at depth ``j``)."""
        return [self.rate(c, j) for j, c in enumerate(contexts)]

    def size(self, contexts: Sequence[tuple]) -> int:
        """How many leading tokens of a chain, given each token's context, to verify (0 to all)."""
        best_n, best_rate = 0, 1.0 / self.cost(1)
        gain, reach = 1.0, 1.0
        for j, p in enumerate(self.rates(contexts), 1):
            reach *= p
            gain += reach
            rate = gain / self.cost(j + 1)
            if rate > best_rate:
                best_n, best_rate = j, rate
        return best_n

    def __call__(self, contexts: Sequence[tuple]) -> int:
        """:meth:`size`, with exploration, remembering the cut for :meth:`observe`."""
        n = len(contexts)
        kept = self.size(contexts)
        if 0 < kept < n and self._tries(contexts[kept], kept) < self.explore_tries:
            kept += 1  # one token deeper while that token's context has few observations
        if n > 0:
            first = contexts[0]
            if kept == 0:
                skips = self._skips.get(first, 0) + 1
                if skips >= self.explore_every:
                    kept, skips = min(n, self.explore_len), 0
                self._skips[first] = skips
            else:
                self._skips[first] = 0
        self._pending = list(contexts[:kept])
        return kept

    def observe(self, accepted: int, verified: int) -> None:
        """The target accepted ``accepted`` of the ``verified`` tokens of the last cut chain
        (``verified`` is less than the cut when the caller shortened the chain further)."""
        kept = self._pending[:verified]
        self._pending = []
        for j, context in enumerate(kept[: accepted + 1]):
            d = min(j, self.MAX_DEPTH)
            hit = 1.0 if j < accepted else 0.0
            for k in range(len(context) + 1):
                stat = self._stats.setdefault((context[:k], d), [0.0, 0.0])
                stat[0] += 1.0
                stat[1] += hit


def chain_cut_for(model, opts: MethodOptions):
    """A :class:`~genrefine.methods.parts.draft_size.ChainCut` for copying drafters on a backend that verifies
    chains only (llama.cpp), where each verified row costs a large share of a step; None with
    ``tree_cut=False`` or on backends that verify trees (their drafts are trees, not cut)."""
    if not opts.tree_cut or model.supports_trees:
        return None

    return ChainCut(target_costs(model))
