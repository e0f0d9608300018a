"""``auto``: per step, the drafter and draft size with the best expected tokens per second.

:class:`CostModelPolicy` maximises expected tokens per second. It needs

- ``T(n)``, the seconds one target forward of ``n`` new tokens takes (a
  :class:`~genrefine.costs.CostTable`, measured once per model and machine and cached on disk),
- per drafter, an :class:`AcceptanceEstimator` (per-depth acceptance rates, learned online),
- per drafter, the seconds drafting costs per draft token (learned online, an EMA).

A step that drafts ``n`` tokens feeds ``n + 1`` tokens (root + draft) to the target and emits
``expected_tokens(n)`` tokens on average, so its rate is
``expected_tokens(n) / (T(n + 1) + draft_cost * n)``; ``n = 0`` is plain decoding. The drafters
are prompt lookup (:mod:`genrefine.methods.pld`) and Jacobi (:mod:`genrefine.methods.jacobi`).

Under load (the server's continuous batching, :mod:`genrefine.server.scheduler`) the step's
forward is shared: ``b`` sequences each feed their ``[root] + draft`` rows into ONE forward. The
scheduler tells the policy ``b`` before each step (:meth:`CostPolicy.observe_load`). Each
sequence then prices its own draft at the margin, as if the others fed their root alone: the
step costs ``S_b(n) = T_batch(b) + T(b + n) - T(b)`` (the batched forward of ``b`` plain rows,
:func:`genrefine.costs.batch_costs`, measured once per machine, ``T(b)`` when there is none, plus
what this sequence's ``n`` rows add to it) plus its drafting ``c n``, and the batch emits
``b - 1 + E(n)`` tokens. The rate compared is the batch's, ``(b - 1 + E(n)) / (S_b(n) + c n)``,
against plain ``b / T_batch(b)``; for ``b = 1`` it is the rule above. The draft pays only where
its expected extra tokens, ``E(n) - 1``, beat what the extra seconds would have given all ``b``
sequences. Where a plain row is cheap inside a full batch but more rows are not (the forward is
no longer bound by reading the weights, or the rows spill past a full tile of the kernels),
``auto`` drafts less or not at all. Greedy generations only: sampled ones ignore the load (see
:meth:`CostPolicy.reset`).

Trees: ``budget`` bounds the total number of draft nodes. The estimators see the accepted length
against the draft's depth, so for a tree drafter the model is that of a chain as deep as its tree;
there is no separate width choice.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..costs import CostTable, batch_costs, target_costs
from ..errors import ConfigError
from .base import Method, MethodOptions, MethodSpec
from .pld import make_pld_drafter


class AcceptanceEstimator:
    """Per-depth conditional acceptance rates ``alpha[d]``, learned online.

    ``alpha[d]`` estimates P(draft token at depth ``d + 1`` is accepted | the ``d`` before it
    were). Each starts at ``prior`` worth ``prior_weight`` observations; an observation moves it
    by a weight ``max(rate, 1 / (prior_weight + count))``, a running mean at first and an
    exponential moving average with ``rate`` once ``count`` is large. Depths past ``max_depth``
    share the last rate.
    """

    def __init__(
        self, max_depth: int = 32, prior: float = 0.5, prior_weight: float = 2.0, rate: float = 0.05
    ) -> None:
        if max_depth < 1 or not (0.0 <= prior <= 1.0) or prior_weight < 0 or not (0 < rate <= 1):
            raise ConfigError(
                "need max_depth >= 1, prior in [0, 1], prior_weight >= 0 and rate in (0, 1], got "
                f"{max_depth}, {prior}, {prior_weight}, {rate}"
            )
        self.max_depth, self.prior = max_depth, prior
        self.prior_weight, self.rate = prior_weight, rate
        self.alpha = [prior] * max_depth
        self.count = [0] * max_depth

    def _observe(self, d: int, accepted: bool) -> None:
        self.count[d] += 1
        w = max(self.rate, 1.0 / (self.prior_weight + self.count[d]))
        self.alpha[d] += w * (float(accepted) - self.alpha[d])

    def update(self, num_drafted: int, num_accepted: int) -> None:
        """One step: depths ``1..num_accepted`` passed; ``num_accepted + 1`` failed if drafted.

        For a tree pass its depth as ``num_drafted``.
        """
        a = min(num_accepted, num_drafted)
        for d in range(min(a, self.max_depth)):
            self._observe(d, True)
        if a < num_drafted and a < self.max_depth:
            self._observe(a, False)

    def rates(self, n: int) -> list[float]:
        """``alpha`` for depths 1..n."""
        return [self.alpha[min(d, self.max_depth - 1)] for d in range(n)]

    def expected_tokens(self, n: int) -> float:
        """Tokens a step emits on average when drafting ``n``: ``1 + sum_k prod_{d<k} alpha[d]``."""
        total, run = 1.0, 1.0
        for a in self.rates(n):
            run *= a
            total += run
        return total


class CostModelPolicy:
    """Chooses the drafter and draft size that maximise expected tokens per second.

    For drafter ``k`` drafting ``n`` tokens the rate is
    ``E_k(n) / (T(n + 1) + c_k * n)`` with ``E_k`` from its :class:`AcceptanceEstimator`, ``T``
    from the :class:`CostTable` and ``c_k`` its drafting seconds per token (an EMA fed by
    :meth:`update_draft_cost`; 0 until measured). ``n = 0`` (plain decoding, rate ``1 / T(1)``)
    competes too. Ties go to the smaller ``n`` and to the earlier drafter.

    So that a drafter that fell out of favour gets re-measured, a drafter not chosen for
    ``probe_every`` consecutive :meth:`choose` calls is chosen once with its best ``n >= 1``.
    Under a load of ``b`` sequences the interval is ``b * probe_every``: a probe's rows go into
    the forward all ``b`` share, and the ``b`` sequences probe in turn, so the shared forward
    still sees about one probe per ``probe_every`` steps. All of this is deterministic.

    A drafter's rates are learnt only at the depths it drafts, so a policy whose first choices
    are one-token drafts never learns that deeper tokens pass more often (a copied span, once its
    first token matches, tends to match on) and stays there. On an AMD EPYC, where verification
    forwards grow steeply with their rows, prompt lookup's rates stayed at the prior (0.5, never
    observed) past depth 1 over 29 prompts; with exploration they came out 0.79-0.99, and
    ``auto`` made 2.41 tokens a step instead of 1.63 (66.2 against 61.9 tokens/s, the same
    tokens). So every ``explore_every``-th choice of a drafter drafts ``2 n + 1`` instead of its
    best ``n`` while depth ``n + 1`` has fewer than ``explore_until`` observations, and every
    ``8 * explore_every``-th after that (to follow drift); under a load of ``b`` sequences ``b``
    times less often. ``explore_every=0`` turns it off.

    :meth:`set_load` switches to the rates of a step shared by ``b`` sequences (see the module
    docstring); ``batch_cost`` is ``T_batch`` over batch sizes, or None to use ``T(b)``.
    """

    def __init__(
        self,
        cost: CostTable,
        max_len: int = 16,
        cost_rate: float = 0.1,
        probe_every: int = 32,
        estimator_kwargs: dict | None = None,
        batch_cost: CostTable | None = None,
        explore_every: int = 8,
        explore_until: int = 16,
    ) -> None:
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        if explore_every < 0 or explore_until < 0:
            raise ConfigError(
                f"explore_every and explore_until must be >= 0, got {explore_every}, {explore_until}"
            )
        self.explore_every, self.explore_until = explore_every, explore_until
        self._picks: dict[str, int] = {}  # choices of each drafter with a draft
        self.cost = cost
        self.max_len = max_len
        self.cost_rate = cost_rate
        self.probe_every = probe_every
        self._estimator_kwargs = dict(estimator_kwargs or {})
        self._estimator_kwargs.setdefault("max_depth", max_len)
        self._verify = [cost(n + 1) for n in range(max_len + 1)]  # [n] = T(n + 1)
        self.batch_cost = batch_cost
        self.load = 1  # sequences sharing the step's forward
        self._steps: dict[int, list[float]] = {1: self._verify}  # load b -> [n] = S_b(n)
        self.estimators: dict[str, AcceptanceEstimator] = {}
        self.draft_cost: dict[str, float] = {}  # seconds per draft token
        self._idle: dict[str, int] = {}
        # _best(name, 1) of each drafter at self.load, until its rates, its drafting cost or the
        # load change: under load a plain step observes nothing, yet every sequence chooses
        # every step (2 drafters: 16 us a choice made afresh, 2 us from here, AMD EPYC)
        self._best_cache: dict[str, tuple[int, float]] = {}

    def step_cost(self, n: int, load: int = 1) -> float:
        """``S_b(n)``: seconds of a step shared by ``load`` sequences in which this one drafts
        ``n`` tokens and the others none, drafting aside (``T(n + 1)`` alone)."""
        if load <= 1:
            return self.cost(n + 1)
        plain = self.batch_cost(load) if self.batch_cost is not None else self.cost(load)
        return plain + self.cost(load + n) - self.cost(load)

    def set_load(self, sequences: int) -> None:
        """The next steps' forward is shared by ``sequences`` sequences (1: alone)."""
        b = max(1, int(sequences))
        if b == self.load:
            return
        self._best_cache.clear()
        if b not in self._steps:
            self._steps[b] = [self.step_cost(n, b) for n in range(self.max_len + 1)]
        self.load = b

    def estimator(self, name: str) -> AcceptanceEstimator:
        """The acceptance estimator of drafter ``name`` (created on first use)."""
        est = self.estimators.get(name)
        if est is None:
            est = self.estimators[name] = AcceptanceEstimator(**self._estimator_kwargs)
        return est

    def update(self, name: str, num_drafted: int, num_accepted: int) -> None:
        """Record a verified step of drafter ``name``."""
        self.estimator(name).update(num_drafted, num_accepted)
        self._best_cache.pop(name, None)

    def update_draft_cost(self, name: str, seconds: float, n: int) -> None:
        """Record that drafting ``n`` tokens with ``name`` took ``seconds``."""
        if n <= 0:
            return
        per_token = seconds / n
        old = self.draft_cost.get(name)
        new = per_token if old is None else old + self.cost_rate * (per_token - old)
        self.draft_cost[name] = new
        self._best_cache.pop(name, None)

    def rate(self, name: str, n: int) -> float:
        """Expected tokens per second of the step's forward (alone: this sequence's) when
        ``name`` drafts ``n`` tokens (``n = 0``: plain)."""
        n = min(max(n, 0), self.max_len)
        steps, others = self._steps[self.load], self.load - 1
        if n == 0:
            return self.load / steps[0]
        seconds = steps[n] + self.draft_cost.get(name, 0.0) * n
        return (others + self.estimator(name).expected_tokens(n)) / seconds

    def _best(self, name: str, min_n: int) -> tuple[int, float]:
        est = self.estimator(name)
        c = self.draft_cost.get(name, 0.0)
        steps, others = self._steps[self.load], self.load - 1
        best_n, best_r = min_n, -1.0
        expected, run = 1.0, 1.0
        for n, a in enumerate(est.rates(self.max_len), start=1):
            run *= a
            expected += run
            r = (others + expected) / (steps[n] + c * n)
            if n >= min_n and r > best_r:
                best_n, best_r = n, r
        plain = self.load / steps[0]
        if min_n == 0 and plain >= best_r:
            return 0, plain
        return best_n, best_r

    def choose(self, names: Iterable[str]) -> tuple[str | None, int]:
        """``(drafter, budget)`` for the next step; ``(None, 0)`` means plain decoding."""
        names = list(names)
        for name in names:
            self._idle[name] = self._idle.get(name, 0) + 1
        every = self.probe_every * self.load
        probe = next((k for k in names if self._idle[k] > every), None)
        if probe is not None:
            self._idle[probe] = 0
            return probe, self._best(probe, 1)[0]
        best_name, best_n, best_r = None, 0, self.load / self._steps[self.load][0]
        cache = self._best_cache
        for name in names:
            nr = cache.get(name)
            if nr is None:
                nr = cache[name] = self._best(name, 1)
            n, r = nr
            if r > best_r:
                best_name, best_n, best_r = name, n, r
        if best_name is not None:
            self._idle[best_name] = 0
            best_n = self._explore(best_name, best_n)
        return best_name, best_n

    def _explore(self, name: str, n: int) -> int:
        """``n``, or now and then a deeper draft (see the class docstring)."""
        k = self._picks[name] = self._picks.get(name, 0) + 1
        deeper = min(self.max_len, 2 * n + 1)
        if not self.explore_every or deeper <= n:
            return n
        est = self.estimator(name)
        seen = est.count[min(n, est.max_depth - 1)]
        every = self.explore_every * (1 if seen < self.explore_until else 8) * self.load
        return deeper if k % every == 0 else n


class CostPolicy:
    """Pick drafter and draft size maximising expected tokens per second (:class:`CostModelPolicy`)."""

    def __init__(self, cost_table, max_len: int, batch_table=None) -> None:
        self.cost_table, self.max_len, self.batch_table = cost_table, max_len, batch_table
        self.policy = CostModelPolicy(cost_table, max_len=max_len, batch_cost=batch_table)

    def reset(self, params=None) -> None:
        """Greedy generations share what earlier ones learnt (the output cannot depend on it).
        Sampled ones start afresh and ignore wall-clock drafting costs and the server's load, so
        that a seed gives the same tokens every time: the drafter and draft size choices steer
        how the random stream is consumed."""
        self._timed = params is None or params.greedy
        if not self._timed:
            self.policy = CostModelPolicy(
                self.cost_table, max_len=self.max_len, batch_cost=self.batch_table
            )
        self.policy.set_load(1)

    def observe_load(self, sequences: int) -> None:
        """The scheduler's word, before a step, that ``sequences`` sequences share its forward
        (1: this sequence's forward runs alone). Ignored by sampled generations."""
        if getattr(self, "_timed", True):
            self.policy.set_load(sequences)

    def choose(self, drafters):
        by_name = {d.name: d for d in drafters}
        name, budget = self.policy.choose(list(by_name))
        return (by_name[name], budget) if name is not None else (None, 0)

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        if drafter is None or drafted == 0:
            return
        depth = tree_info.num_levels if tree_info is not None else drafted
        self.policy.update(drafter.name, depth, accepted)
        if getattr(self, "_timed", True):
            self.policy.update_draft_cost(drafter.name, draft_seconds, drafted)


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .jacobi import JacobiDrafter

    max_len = opts.draft_len or 16
    table = target_costs(model)
    drafters = [make_pld_drafter(model, opts), JacobiDrafter(block=max_len)]
    policy = CostPolicy(table, max_len, batch_costs(model))  # T_batch: if measured (the server)
    return Method("auto", drafters, policy, max_len, opts.acceptance)


SPEC = MethodSpec(
    name="auto", lossless=True, build=build, order=14,
    summary="per step, the drafter and draft size with the best expected tokens/s (cost model)",
)
