"""What a target forward costs on this machine: ``T(n)``, the seconds one forward of ``n`` new
tokens takes.

:func:`measure_verify_cost` times it, :class:`CostTable` holds and interpolates it, and
:func:`load_or_measure` / :func:`target_costs` measure once per model, dtype and machine and cache
the table on disk (:mod:`genrefine.diskcache`). Every cost-aware decision reads it: ``auto``'s
choice of drafter and draft size, and the draft-size controls of
:mod:`genrefine.methods.parts.draft_size`. No clock is read while generating.

The server batches the steps of many sequences into one forward; ``T_batch(b)``, the seconds of
one batched forward of ``b`` sequences one new token each, is :func:`measure_batch_cost`'s, cached
the same way by :func:`batch_costs` (optional: ``auto`` models it as ``T(b)`` when absent).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diskcache import cache_root, write_text
from .errors import ConfigError


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_verify_cost(
    model,
    sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 17, 20, 21, 24, 32, 33, 48),
    context_len: int = 128,
    repeats: int = 5,
    forward_kwargs: dict | None = None,
    warmup: int = 3,
    tolerance: float = 0.05,
    retries: int = 2,
    max_ratio: float = 12.0,
    min_seconds: float = 0.25,
) -> dict[int, float]:
    """Seconds per target forward of ``n`` new tokens, for each ``n`` in ``sizes``.

    Fills a fresh cache with ``context_len`` random tokens, then

    1. warms up: ``warmup`` forwards of every size (first calls of a shape pay for lazily
       chosen kernels, allocations and thread start-up; a cold call must not end up in the table).
       The first warm-up round runs the sizes in ascending order and stops at the first size
       whose forward takes over ``min_seconds`` and over ``max_ratio`` times the smallest size's
       (twice, the second call warm): the larger sizes are not measured, and the table extends
       the slope of the last ones measured. A forward that costs that much more has stopped
       sharing weight reads between rows (bfloat16 on a CPU without native bfloat16: about one
       one-token forward per row), and timing every size up to 48 tokens there took 75 s;
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
    if (context_len < 1 or repeats < 1 or warmup < 0 or retries < 0 or tolerance < 0
            or max_ratio <= 1 or min_seconds < 0):
        raise ConfigError(
            "need context_len >= 1, repeats >= 1, warmup >= 0, retries >= 0, tolerance >= 0, "
            f"max_ratio > 1 and min_seconds >= 0, got {context_len}, {repeats}, {warmup}, "
            f"{retries}, {tolerance}, {max_ratio}, {min_seconds}"
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

        if warmup:
            sizes = _affordable(sizes, lambda n: rounds([n], 1, timed=True)[n][0], max_ratio,
                                min_seconds)
            rounds(sizes, warmup - 1, timed=False)
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


def _affordable(sizes: list[int], time_one, max_ratio: float, min_seconds: float) -> list[int]:
    """The ascending ``sizes`` up to the first whose forward (``time_one(n)``: seconds, one call)
    takes over ``min_seconds`` and over ``max_ratio`` times the smallest size's, twice in a row;
    that size is kept, the larger ones dropped. Every size gets one forward until the stop (the
    first warm-up round)."""
    first = time_one(sizes[0])
    for i, n in enumerate(sizes[1:], 1):
        limit = max(min_seconds, max_ratio * first)
        if time_one(n) > limit and time_one(n) > limit:  # the second call is a warm one
            return sizes[: i + 1]
    return sizes


def _out_of_order(measured: dict[int, float], tolerance: float) -> list[int]:
    """The sizes measured more than ``tolerance`` (relative) slower than some larger size."""
    suspect, floor = [], math.inf
    for n in sorted(measured, reverse=True):
        if measured[n] > floor * (1.0 + tolerance):
            suspect.append(n)
        floor = min(floor, measured[n])
    return sorted(suspect)


COST_TABLE_VERSION = 3
"""Format and measurement version of saved cost tables; a table of another version is measured
again. 2: tables measured with warm-up, medians and the order check of :func:`measure_verify_cost`
(version 1 tables could hold a cold first forward). 3: also 17, 20, 21, 33 and 48 tokens, so
that the step past a full 16-row tile (rows 17-20 run on the vector loop here, costing about
2 ms a row where the table used to interpolate 1.1) is measured, not interpolated."""


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
        return write_text(self.path_for(self.key), self.to_json())

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
    if sys.stderr.isatty():  # 15-45 s for the embedded model on 2 cores: say what the wait is
        print(
            "genrefine: timing this model's forwards on this CPU for drafting decisions "
            "(once per machine, cached) ...",
            file=sys.stderr,
            flush=True,
        )
    measured = measure_verify_cost(model, **measure_kwargs)
    table = CostTable.from_measurements(measured, key, context_len)
    table.save()
    return table


def _target_key(model) -> str:
    from .diskcache import machine_key
    from .models.protocol import weights_key

    key = f"{getattr(model, 'name', 'model')}|{weights_key(model)}|{machine_key(model.device)}"
    if getattr(model, "quantized", False):  # timings of the C++ kernels: measured again when they change
        from .kernels import source_key

        key += f"|kernels={source_key()}"
    return key


def target_costs(model):
    """The target's forward times on this machine (measured on first use, cached on disk)."""
    return load_or_measure(model, _target_key(model))


def measure_batch_cost(
    model,
    sizes: Sequence[int] = (1, 2, 4, 8, 16),
    context_len: int = 64,
    repeats: int = 3,
    warmup: int = 2,
) -> dict[int, float]:
    """Seconds per batched forward (:func:`genrefine.models.batched.forward_batch`, rows
    concatenated) of ``b`` sequences with one new token each, for each ``b`` in ``sizes``.

    Each sequence has its own cache holding ``context_len`` random tokens, as in the server's
    decoding steps; the attention of every sequence runs on its own, so ``T_batch(b)`` is more
    than the single-sequence ``T(b)``. Untimed warm-up rounds, then the median of ``repeats``
    rounds (sizes interleaved), made non-decreasing in ``b`` as :func:`measure_verify_cost` does.
    """
    from .models.batched import BatchItem, forward_batch

    sizes = sorted({int(b) for b in sizes})
    if not sizes or sizes[0] < 1 or context_len < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(
            "need positive batch sizes, context_len >= 1, repeats >= 1 and warmup >= 0, got "
            f"{sizes}, {context_len}, {repeats}, {warmup}"
        )
    limit = getattr(model, "max_context", None)
    if limit:
        context_len = max(1, min(context_len, limit - 1))
    device = torch.device(getattr(model, "device", "cpu"))
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.vocab_size)
    with torch.inference_mode():
        caches = []
        for _ in range(sizes[-1]):
            cache = model.new_cache(capacity=context_len + 1)
            prefix = torch.randint(0, vocab, (context_len,), generator=gen).to(device)  # [ctx]
            model.forward(prefix, cache, logits_rows=torch.tensor([context_len - 1], device=device))
            caches.append(cache)
        token = torch.randint(0, vocab, (sizes[-1], 1), generator=gen).to(device)  # [b_max, 1]

        times: dict[int, list[float]] = {b: [] for b in sizes}
        for r in range(warmup + repeats):
            for b in sizes:
                items = [BatchItem(token[i], caches[i]) for i in range(b)]
                start = time.perf_counter()
                forward_batch(model, items, mode="always")
                _synchronize(device)
                if r >= warmup:
                    times[b].append(time.perf_counter() - start)
                for c in caches[:b]:
                    c.rollback(1)
    out, run = {}, -math.inf
    for b in sizes:
        run = out[b] = max(run, statistics.median(times[b]))
    return out


def batch_costs(model, measure: bool = False, **measure_kwargs) -> CostTable | None:
    """``T_batch(b)`` on this machine (a :class:`CostTable` over batch sizes): the cached table,
    or, with ``measure``, one measured now (:func:`measure_batch_cost`) and cached; None when
    there is none and ``measure`` is off."""
    key = _target_key(model) + "|batch"
    table = CostTable.load(key)
    if table is not None or not measure:
        return table
    measured = measure_batch_cost(model, **measure_kwargs)
    table = CostTable.from_measurements(measured, key, int(measure_kwargs.get("context_len", 64)))
    table.save()
    return table
