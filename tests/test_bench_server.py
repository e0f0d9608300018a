"""benchmarks/bench_server.py's bookkeeping: the rotated run order and the per-level medians."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_server", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_each_method_takes_each_place_in_the_run_order() -> None:
    bs = _module()
    methods = ["ar", "pld", "auto"]
    assert bs.run_order(methods, 0, 0) == methods  # the reference method runs first
    orders = [bs.run_order(methods, level, 0) for level in range(3)]
    for m in methods:
        assert sorted(order.index(m) for order in orders) == [0, 1, 2]
    assert bs.run_order(methods, 1, 2) == bs.run_order(methods, 0, 0)  # rounds rotate too
    assert bs.run_order(methods, 0, 1) != methods


def test_the_summary_takes_each_levels_median_round_and_range() -> None:
    bs = _module()

    def level(method, clients, rate, rnd):
        return bs.Level(method, clients, 4, 100, 100 / rate, rate, 1.0, 4, round=rnd)

    rows = [level("ar", 1, r, i) for i, r in enumerate([10.0, 30.0, 20.0])]
    rows += [level("auto", 1, r, i) for i, r in enumerate([25.0, 5.0, 21.0])]
    rows += [level("ar", 4, 40.0, 0), level("auto", 4, 38.0, 0)]
    summary = bs.summarize(rows, ["ar", "auto"], [1, 4])
    assert summary[0]["tokens_per_s"] == {"ar": 20.0, "auto": 21.0}
    assert summary[0]["range"] == {"ar": [10.0, 30.0], "auto": [5.0, 25.0]}
    assert abs(summary[0]["auto_vs_best"] - 21.0 / 20.0) < 1e-12
    assert abs(summary[1]["auto_vs_best"] - 38.0 / 40.0) < 1e-12
    table = bs.summary_table(summary, ["ar", "auto"])
    assert "| 1 | 20.0 (10.0-30.0) | 21.0 (5.0-25.0) | 1.05x |" in table
