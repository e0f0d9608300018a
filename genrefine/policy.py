"""How much to draft, and with which drafter.

Two policies:

* :class:`HeuristicLength`: the schedule of transformers' assisted generation ("heuristic"):
  +2 after a draft was accepted in full, -1 after a miss. No measurements needed.
* :class:`CostModelPolicy`: maximise expected tokens per second. It needs

  - ``T(n)``, the seconds one target forward of ``n`` new tokens takes (a :class:`CostTable`,
    measured once per model and machine by :func:`measure_verify_cost` and cached on disk),
  - per drafter, an :class:`AcceptanceEstimator` (per-depth acceptance rates, learned online),
  - per drafter, the seconds drafting costs per draft token (learned online, an EMA).

  A step that drafts ``n`` tokens feeds ``n + 1`` tokens (root + draft) to the target and emits
  ``expected_tokens(n)`` tokens on average, so its rate is
  ``expected_tokens(n) / (T(n + 1) + draft_cost * n)``; ``n = 0`` is plain decoding.

Trees: ``budget`` bounds the total number of draft nodes. The estimators see the accepted length
against the draft's depth, so for a tree drafter the model is that of a chain as deep as its tree;
there is no separate width choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .models.paths import cache_root

import torch
from torch import Tensor

from .errors import ConfigError

# --------------------------------------------------------------------------- heuristic schedule


class HeuristicLength:
    """Draft length schedule: +2 after a full acceptance, -1 after a miss, kept in bounds."""

    def __init__(self, initial: int = 4, min_len: int = 1, max_len: int = 16) -> None:
        if not (1 <= min_len <= initial <= max_len):
            raise ConfigError(
                "need 1 <= min_len <= initial <= max_len, got "
                f"min_len={min_len}, initial={initial}, max_len={max_len}"
            )
        self.initial, self.min_len, self.max_len = initial, min_len, max_len
        self.length = initial

    def next_budget(self) -> int:
        """How many tokens to draft next step."""
        return self.length

    def update(self, num_drafted: int, num_accepted: int) -> None:
        """Grow after all ``num_drafted`` tokens were accepted, shrink otherwise.

        A step that drafted nothing (the drafter had no proposal) leaves the length alone.
        """
        if num_drafted <= 0:
            return
        step = 2 if num_accepted >= num_drafted else -1
        self.length = min(self.max_len, max(self.min_len, self.length + step))

    def reset(self) -> None:
        self.length = self.initial


def confident_prefix_len(q_max_probs: Tensor, threshold: float, inclusive: bool = False) -> int:
    """How many leading draft tokens to keep under a draft-confidence stop.

    q_max_probs: [n] the drafter's top probability at each draft position. Drafting stops at the
    first position whose top probability is below ``threshold``; that token is dropped, or kept
    when ``inclusive`` (as transformers' ``assistant_confidence_threshold`` keeps it).
    """
    assert q_max_probs.dim() == 1, q_max_probs.shape
    n = int(q_max_probs.shape[0])
    confident = int((q_max_probs >= threshold).long().cumprod(0).sum())  # one host sync
    return min(n, confident + 1) if inclusive else confident


# --------------------------------------------------------------------------- target cost T(n)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine_key(device: torch.device | str | None = None) -> str:
    """A description of this machine for cost-table keys: CPU model, torch threads, GPU name."""
    parts = [_cpu_model(), f"threads={torch.get_num_threads()}"]
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(dev))
    return "|".join(parts)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_verify_cost(
    model,
    sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    context_len: int = 128,
    repeats: int = 5,
    forward_kwargs: dict | None = None,
    warmup: int = 3,
    tolerance: float = 0.05,
    retries: int = 2,
) -> dict[int, float]:
    """Seconds per target forward of ``n`` new tokens, for each ``n`` in ``sizes``.

    Fills a fresh cache with ``context_len`` random tokens, then

    1. warms up: ``warmup`` untimed forwards of every size (first calls of a shape pay for lazily
       chosen kernels, allocations and thread start-up; a cold call must not end up in the table);
    2. times ``repeats`` rounds, each one forward of every size (logits for every row, as
       verification asks) followed by ``cache.rollback(n)``; a size's time is the median of its
       rounds. The rounds interleave the sizes, so a passing slowdown touches every size a little
       instead of one size a lot;
    3. sanity-checks the result: more tokens never cost less, so a size measured more than
       ``tolerance`` (relative) slower than a larger size was disturbed. Such sizes are
       re-measured (another ``repeats`` forwards, at most ``retries`` times), keeping the lower
       median, since disturbances only add time. Whatever is still out of order afterwards is
       made monotone by a running maximum (each size costs at least the largest time measured
       for a smaller one), so the returned times never decrease with ``n``.

    On a model with a shorter context (``model.max_context``) the sizes that do not fit are
    dropped and the context shortened. ``forward_kwargs`` go to every forward after the prefix
    (a draft model's ``vocab_subset``).
    """
    fwd = dict(forward_kwargs or {})
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"sizes must be positive token counts, got {sizes}")
    if context_len < 1 or repeats < 1 or warmup < 0 or retries < 0 or tolerance < 0:
        raise ConfigError(
            "need context_len >= 1, repeats >= 1, warmup >= 0, retries >= 0 and tolerance >= 0, "
            f"got {context_len}, {repeats}, {warmup}, {retries}, {tolerance}"
        )
    limit = getattr(model, "max_context", None)
    if limit:  # a short-context model: fewer sizes, a shorter context
        sizes = [n for n in sizes if n < limit] or [1]
        context_len = max(1, min(context_len, limit - sizes[-1]))
    device = torch.device(getattr(model, "device", "cpu"))
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.vocab_size)
    with torch.inference_mode():
        cache = model.new_cache(capacity=context_len + sizes[-1])
        prefix = torch.randint(0, vocab, (context_len,), generator=gen).to(device)  # [context_len]
        model.forward(prefix, cache, logits_rows=torch.tensor([context_len - 1], device=device))
        batches = {n: torch.randint(0, vocab, (n,), generator=gen).to(device) for n in sizes}

        def rounds(todo: list[int], count: int, timed: bool) -> dict[int, list[float]]:
            times: dict[int, list[float]] = {n: [] for n in todo}
            for _ in range(count):
                for n in todo:
                    start = time.perf_counter()
                    model.forward(batches[n], cache, **fwd)
                    _synchronize(device)
                    if timed:
                        times[n].append(time.perf_counter() - start)
                    cache.rollback(n)
            return times

        rounds(sizes, warmup, timed=False)
        out = {n: statistics.median(t) for n, t in rounds(sizes, repeats, timed=True).items()}
        for _ in range(retries):
            suspect = _out_of_order(out, tolerance)
            if not suspect:
                break
            for n, t in rounds(suspect, repeats, timed=True).items():
                out[n] = min(out[n], statistics.median(t))
    run = -math.inf
    for n in sizes:  # what re-measuring did not settle: a running maximum
        run = out[n] = max(run, out[n])
    return out


def _out_of_order(measured: dict[int, float], tolerance: float) -> list[int]:
    """The sizes measured more than ``tolerance`` (relative) slower than some larger size."""
    suspect, floor = [], math.inf
    for n in sorted(measured, reverse=True):
        if measured[n] > floor * (1.0 + tolerance):
            suspect.append(n)
        floor = min(floor, measured[n])
    return sorted(suspect)


COST_TABLE_VERSION = 2
"""Format and measurement version of saved cost tables; a table of another version is measured
again. 2: tables measured with warm-up, medians and the order check of :func:`measure_verify_cost`
(version 1 tables could hold a cold first forward)."""


@dataclass(frozen=True)
class CostTable:
    """Measured target forward times; ``table(n)`` interpolates seconds for ``n`` new tokens.

    Between measured sizes ``T`` is linear; below the smallest it is the smallest's time; above the
    largest it extends the last segment's slope (never negative). The measurements are first made
    non-decreasing in ``n`` (a running maximum), since feeding more tokens never costs less.
    """

    sizes: tuple[int, ...]  # ascending token counts
    seconds: tuple[float, ...]  # seconds per forward at each size
    key: str = ""
    context_len: int = 0
    _mono: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ConfigError("a cost table needs one time per size and at least one size")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ConfigError(f"cost table sizes must be ascending and distinct: {self.sizes}")
        mono, run = [], -math.inf
        for s in self.seconds:
            run = max(run, float(s))
            mono.append(run)
        object.__setattr__(self, "_mono", tuple(mono))

    @staticmethod
    def from_measurements(
        measured: dict[int, float], key: str = "", context_len: int = 0
    ) -> "CostTable":
        """A table from :func:`measure_verify_cost`'s ``{n: seconds}``."""
        sizes = tuple(sorted(measured))
        return CostTable(sizes, tuple(float(measured[n]) for n in sizes), key, context_len)

    def __call__(self, n: float) -> float:
        """Interpolated seconds for a forward of ``n`` new tokens."""
        xs, ys = self.sizes, self._mono
        if n <= xs[0] or len(xs) == 1:
            return ys[0] if n <= xs[0] else ys[-1]
        for i in range(1, len(xs)):
            if n <= xs[i]:
                w = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + w * (ys[i] - ys[i - 1])
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(slope, 0.0) * (n - xs[-1])

    @staticmethod
    def path_for(key: str) -> Path:
        """Where the table for ``key`` lives: ``$GENREFINE_CACHE/cost/<slug>-<hash>.json``."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:60].strip("_") or "table"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return cache_root() / "cost" / f"{slug}-{digest}.json"

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": COST_TABLE_VERSION,
                "key": self.key,
                "context_len": self.context_len,
                "sizes": list(self.sizes),
                "seconds": list(self.seconds),
            },
            indent=1,
        )

    @staticmethod
    def from_json(text: str) -> "CostTable":
        """The table in ``text``; ValueError when it was saved by another version."""
        d = json.loads(text)
        version = d.get("version") if isinstance(d, dict) else None
        if version != COST_TABLE_VERSION:
            raise ValueError(f"cost table version {version}, need {COST_TABLE_VERSION}")
        return CostTable(
            tuple(int(n) for n in d["sizes"]),
            tuple(float(s) for s in d["seconds"]),
            str(d.get("key", "")),
            int(d.get("context_len", 0)),
        )

    def save(self) -> Path:
        """Write to :meth:`path_for` of this table's key (atomically); returns the path."""
        path = self.path_for(self.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(key: str) -> "CostTable | None":
        """The saved table for ``key``, or None when there is none (or it is unreadable, or of
        another :data:`COST_TABLE_VERSION`)."""
        path = CostTable.path_for(key)
        try:
            table = CostTable.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, ConfigError):
            return None
        return table if table.key == key else None


def load_or_measure(model, key: str, **measure_kwargs) -> CostTable:
    """The cached cost table for ``key``, measuring (and saving) it first if there is none.

    ``key`` should name everything the timings depend on, e.g.
    ``f"{model_id}|{dtype}|{device}|{machine_key(device)}"``.
    ``measure_kwargs`` go to :func:`measure_verify_cost`.
    """
    table = CostTable.load(key)
    if table is not None:
        return table
    context_len = int(measure_kwargs.get("context_len", 128))
    measured = measure_verify_cost(model, **measure_kwargs)
    table = CostTable.from_measurements(measured, key, context_len)
    table.save()
    return table


# --------------------------------------------------------------------------- tree size


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

    def observe(self, accepted: int) -> None:
        """The target accepted ``accepted`` nodes of the last cut tree."""
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
    whole (see :meth:`keep`). Each decision to draft on reads only the tokens before the next
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

    def add(self, p: float) -> bool:
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

    def keep(self, cut: bool = True) -> int:
        """How many of the drafted tokens to verify (at least one; all of them unless ``cut``),
        remembered for :meth:`observe`. Sampled drafts must not be cut: whether a token is
        verified would then depend on the draft probabilities after it, so on the token itself,
        and speculative sampling would no longer be exact."""
        n = len(self._paths)
        if n == 0:
            return 0
        spent = n * self.draft_cost
        best = n
        if cut:
            best = max(range(1, n + 1), key=lambda k: self._gains[k] / (spent + self.verify(k + 1)))
        self._pending = float(sum(self._paths[:best]))
        return best

    def observe(self, accepted: int) -> None:
        """The target accepted ``accepted`` tokens of the last kept draft."""
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

    def observe(self, accepted: int, drafted: int | None = None) -> None:
        """The target accepted ``accepted`` tokens of the last cut chain (of which ``drafted``
        were verified, when the caller shortened the chain further)."""
        kept = self._pending
        self._pending = []
        if drafted is not None:
            kept = kept[:drafted]
        for j, context in enumerate(kept[: accepted + 1]):
            d = min(j, self.MAX_DEPTH)
            hit = 1.0 if j < accepted else 0.0
            for k in range(len(context) + 1):
                stat = self._stats.setdefault((context[:k], d), [0.0, 0.0])
                stat[0] += 1.0
                stat[1] += hit


# --------------------------------------------------------------------------- acceptance


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


# --------------------------------------------------------------------------- cost model policy


class CostModelPolicy:
    """Chooses the drafter and draft size that maximise expected tokens per second.

    For drafter ``k`` drafting ``n`` tokens the rate is
    ``E_k(n) / (T(n + 1) + c_k * n)`` with ``E_k`` from its :class:`AcceptanceEstimator`, ``T``
    from the :class:`CostTable` and ``c_k`` its drafting seconds per token (an EMA fed by
    :meth:`update_draft_cost`; 0 until measured). ``n = 0`` (plain decoding, rate ``1 / T(1)``)
    competes too. Ties go to the smaller ``n`` and to the earlier drafter.

    So that a drafter that fell out of favour gets re-measured, a drafter not chosen for
    ``probe_every`` consecutive :meth:`choose` calls is chosen once with its best ``n >= 1``.
    All of this is deterministic.
    """

    def __init__(
        self,
        cost: CostTable,
        max_len: int = 16,
        cost_rate: float = 0.1,
        probe_every: int = 32,
        estimator_kwargs: dict | None = None,
    ) -> None:
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        self.cost = cost
        self.max_len = max_len
        self.cost_rate = cost_rate
        self.probe_every = probe_every
        self._estimator_kwargs = dict(estimator_kwargs or {})
        self._estimator_kwargs.setdefault("max_depth", max_len)
        self._verify = [cost(n + 1) for n in range(max_len + 1)]  # [n] = T(n + 1)
        self.estimators: dict[str, AcceptanceEstimator] = {}
        self.draft_cost: dict[str, float] = {}  # seconds per draft token
        self._idle: dict[str, int] = {}

    def estimator(self, name: str) -> AcceptanceEstimator:
        """The acceptance estimator of drafter ``name`` (created on first use)."""
        est = self.estimators.get(name)
        if est is None:
            est = self.estimators[name] = AcceptanceEstimator(**self._estimator_kwargs)
        return est

    def update(self, name: str, num_drafted: int, num_accepted: int) -> None:
        """Record a verified step of drafter ``name``."""
        self.estimator(name).update(num_drafted, num_accepted)

    def update_draft_cost(self, name: str, seconds: float, n: int) -> None:
        """Record that drafting ``n`` tokens with ``name`` took ``seconds``."""
        if n <= 0:
            return
        per_token = seconds / n
        old = self.draft_cost.get(name)
        new = per_token if old is None else old + self.cost_rate * (per_token - old)
        self.draft_cost[name] = new

    def rate(self, name: str, n: int) -> float:
        """Expected tokens per second when ``name`` drafts ``n`` tokens (``n = 0``: plain)."""
        n = min(max(n, 0), self.max_len)
        if n == 0:
            return 1.0 / self._verify[0]
        seconds = self._verify[n] + self.draft_cost.get(name, 0.0) * n
        return self.estimator(name).expected_tokens(n) / seconds

    def _best(self, name: str, min_n: int) -> tuple[int, float]:
        est = self.estimator(name)
        c = self.draft_cost.get(name, 0.0)
        best_n, best_r = min_n, -1.0
        expected, run = 1.0, 1.0
        for n, a in enumerate(est.rates(self.max_len), start=1):
            run *= a
            expected += run
            r = expected / (self._verify[n] + c * n)
            if n >= min_n and r > best_r:
                best_n, best_r = n, r
        if min_n == 0 and 1.0 / self._verify[0] >= best_r:
            return 0, 1.0 / self._verify[0]
        return best_n, best_r

    def best_budget(self, name: str) -> int:
        """The draft size (0 = do not draft) that maximises the rate of drafter ``name``."""
        return self._best(name, 0)[0]

    def choose(self, names: Iterable[str]) -> tuple[str | None, int]:
        """``(drafter, budget)`` for the next step; ``(None, 0)`` means plain decoding."""
        names = list(names)
        for name in names:
            self._idle[name] = self._idle.get(name, 0) + 1
        probe = next((k for k in names if self._idle[k] > self.probe_every), None)
        if probe is not None:
            self._idle[probe] = 0
            return probe, self._best(probe, 1)[0]
        best_name, best_n, best_r = None, 0, 1.0 / self._verify[0]
        for name in names:
            n, r = self._best(name, 1)
            if r > best_r:
                best_name, best_n, best_r = name, n, r
        if best_name is not None:
            self._idle[best_name] = 0
        return best_name, best_n
