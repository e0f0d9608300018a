"""Draft-length policies: the heuristic schedule, acceptance estimates, the cost model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from genrefine.diskcache import machine_key
from genrefine.errors import ConfigError
from genrefine.methods.auto import AcceptanceEstimator, CostModelPolicy
from genrefine.methods.parts.draft_size import ChainCut, DraftSizer, DraftStop, TreeCut
from genrefine.costs import CostTable, load_or_measure, measure_verify_cost


def test_acceptance_estimator_converges() -> None:
    # synthetic chain steps: each depth accepted with probability alpha_true[d]
    alpha_true = [0.9, 0.8, 0.6, 0.5, 0.3, 0.2]
    g = torch.Generator().manual_seed(0)
    est = AcceptanceEstimator(max_depth=8, prior=0.5, rate=0.01)
    for _ in range(4000):
        n = 6
        accepted = 0
        for a in alpha_true:
            if float(torch.rand((), generator=g)) < a:
                accepted += 1
            else:
                break
        est.update(n, accepted)
    for d, a in enumerate(alpha_true):
        assert abs(est.alpha[d] - a) < 0.08, (d, est.alpha[d], a)
    assert est.alpha[7] == 0.5 and est.count[7] == 0  # never drafted: still the prior
    want, run = 1.0, 1.0
    for a in est.alpha[:6]:
        run *= a
        want += run
    assert est.expected_tokens(6) == pytest.approx(want)
    assert est.expected_tokens(0) == 1.0


def test_acceptance_estimator_uses_prior_then_tracks() -> None:
    est = AcceptanceEstimator(max_depth=4, prior=0.5, prior_weight=2.0, rate=0.05)
    assert est.expected_tokens(2) == pytest.approx(1 + 0.5 + 0.25)
    est.update(3, 3)
    assert est.alpha[0] == pytest.approx(0.5 + (1 - 0.5) / 3)
    est.update(2, 0)  # a miss at depth 1 touches only depth 1
    assert est.count == [2, 1, 1, 0]
    assert est.expected_tokens(10) > est.expected_tokens(4) - 1e-12  # past max_depth: last rate


def table(fn, sizes=(1, 2, 4, 8, 16, 32)) -> CostTable:
    return CostTable.from_measurements({n: fn(n) for n in sizes}, key="test")


def test_cost_table_interpolates() -> None:
    t = table(lambda n: 0.01 + 0.001 * n)
    assert t(4) == pytest.approx(0.014)
    assert t(3) == pytest.approx(0.013)
    assert t(0.5) == pytest.approx(0.011)
    assert t(64) == pytest.approx(0.074)  # extends the last slope
    bumpy = CostTable((1, 2, 3), (0.02, 0.01, 0.03))
    assert bumpy(2) == pytest.approx(0.02)  # made non-decreasing


def feed(policy: CostModelPolicy, name: str, alpha: float, steps: int = 300, n: int = 16) -> None:
    """A seeded stream of chain steps, each depth accepted with probability ``alpha``."""
    g = torch.Generator().manual_seed(1)
    passed = (torch.rand(steps, n, generator=g) < alpha).long()  # [steps, n]
    accepted = passed.cumprod(dim=1).sum(dim=1).tolist()  # [steps]
    for a in accepted:
        policy.update(name, n, a)


def test_cost_model_long_draft_when_verify_is_flat_and_acceptance_high() -> None:
    policy = CostModelPolicy(table(lambda n: 0.02 + 1e-5 * n), max_len=16)
    feed(policy, "pld", 0.97)
    name, budget = policy.choose(["pld"])
    assert name == "pld" and budget >= 12


def test_cost_model_short_or_no_draft_when_verify_is_linear_and_acceptance_low() -> None:
    policy = CostModelPolicy(table(lambda n: 0.01 * n), max_len=16)
    feed(policy, "pld", 0.2)
    assert policy.choose(["pld"]) == (None, 0)
    # moderate acceptance, linear cost: a short draft at most
    policy2 = CostModelPolicy(table(lambda n: 0.005 + 0.01 * n), max_len=16)
    feed(policy2, "pld", 0.7)
    name, budget = policy2.choose(["pld"])
    assert name == "pld" and 1 <= budget <= 3


def test_cost_model_weighs_drafting_cost_and_picks_the_better_drafter() -> None:
    policy = CostModelPolicy(table(lambda n: 0.02 + 1e-4 * n), max_len=8)
    feed(policy, "cheap", 0.8)
    feed(policy, "good", 0.95)
    policy.update_draft_cost("good", 0.0, 4)
    policy.update_draft_cost("cheap", 0.0, 4)
    assert policy.choose(["cheap", "good"])[0] == "good"
    policy.update_draft_cost("good", 8 * 0.05, 8)  # 50 ms per token: far too slow
    assert policy.draft_cost["good"] == pytest.approx(0.1 * 0.05)  # EMA from 0
    for _ in range(60):
        policy.update_draft_cost("good", 8 * 0.05, 8)
    assert policy.choose(["cheap", "good"])[0] == "cheap"
    assert policy.rate("good", 0) == pytest.approx(1 / policy.cost(1))


def test_cost_model_probes_an_idle_drafter() -> None:
    policy = CostModelPolicy(table(lambda n: 0.01 * n), max_len=8, probe_every=5)
    feed(policy, "pld", 0.1)
    picks = [policy.choose(["pld"]) for _ in range(12)]
    assert picks[:5] == [(None, 0)] * 5
    assert picks[5][0] == "pld" and picks[5][1] >= 1
    assert picks[6:11] == [(None, 0)] * 5
    # deterministic: a fresh policy fed the same makes the same choices
    again = CostModelPolicy(table(lambda n: 0.01 * n), max_len=8, probe_every=5)
    feed(again, "pld", 0.1)
    assert [again.choose(["pld"]) for _ in range(12)] == picks
    # under a load of 3 sequences each probes 3 times less often (the forward is shared)
    loaded = CostModelPolicy(table(lambda n: 0.01 * n), max_len=8, probe_every=5)
    feed(loaded, "pld", 0.1)
    loaded.set_load(3)
    picks = [loaded.choose(["pld"]) for _ in range(32)]
    assert [i for i, (name, _) in enumerate(picks) if name == "pld"] == [15, 31]


def _copy_like_run(policy: CostModelPolicy, steps: int, seed: int = 0) -> list[int]:
    """Steps of a drafter whose first token passes 77% of the time and every later one 95%
    (a copied span matches on once it starts), on verification costs that grow steeply past two
    rows (an AVX2 CPU's, measured); the budgets chosen."""
    g = torch.Generator().manual_seed(seed)
    budgets = []
    for _ in range(steps):
        name, n = policy.choose(["pld"])
        budgets.append(n)
        if name is None:
            continue
        p = torch.tensor([0.77] + [0.95] * (n - 1))
        passed = (torch.rand(n, generator=g) < p).long()
        policy.update("pld", n, int(passed.cumprod(0).sum()))
    return budgets


AVX2_COSTS = CostTable((1, 2, 3, 4, 6, 8, 12, 16, 17), (14.7, 15.4, 22.6, 26.1, 33.8, 43.1, 57.4, 74.1, 76.0))


def test_cost_model_explores_deeper_drafts_and_learns_they_pay() -> None:
    """With rates learnt only where it drafts, the policy would stay at one token a step: depth
    2's prior (0.5) makes two tokens look worse. Exploring now and then, it finds that deeper
    tokens pass and drafts 3 or more (the best rate here is at 5-11 tokens); with exploration
    off (the planted bug) it never leaves one."""
    stuck = _copy_like_run(CostModelPolicy(AVX2_COSTS, max_len=16, explore_every=0), 600)
    assert set(stuck[50:]) == {1}
    learns = _copy_like_run(CostModelPolicy(AVX2_COSTS, max_len=16), 600)
    assert min(learns[400:]) >= 3
    assert sorted(learns[400:])[100] >= 5  # the median budget of the last 200 steps
    # deterministic: the same feed, the same choices
    assert _copy_like_run(CostModelPolicy(AVX2_COSTS, max_len=16), 600) == learns


def test_cost_model_does_not_explore_what_it_has_measured_often() -> None:
    """Where deeper tokens do fail, exploring stays rare: after depth 2 has been seen 16 times,
    one choice in 64 drafts deeper."""
    policy = CostModelPolicy(AVX2_COSTS, max_len=16)
    feed(policy, "pld", 0.3)
    picks = [policy.choose(["pld"]) for _ in range(256)]
    assert sum(1 for _, n in picks if n > 1) <= 256 // 64 + 2


def test_cost_table_json_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    key = f"tiny-model|float32|cpu|{machine_key('cpu')}"
    assert "threads=" in key
    t = CostTable.from_measurements({1: 0.01, 4: 0.012, 16: 0.03}, key=key, context_len=64)
    path = t.save()
    assert path.parent == tmp_path / "cost" and path.suffix == ".json"
    assert json.loads(path.read_text())["key"] == key
    back = CostTable.load(key)
    assert back == t and back(10) == pytest.approx(t(10))
    assert CostTable.load("another key") is None
    path.write_text("{ not json")
    assert CostTable.load(key) is None


class FakeCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.length
        self.length -= n


class FakeModel:
    """Costs ``per_token`` seconds of sleep per new token; records its calls."""

    vocab_size = 50
    device = torch.device("cpu")

    def __init__(self, per_token: float = 2e-4) -> None:
        self.per_token = per_token
        self.calls: list[tuple[int, int, object]] = []
        self.caches: list[FakeCache] = []

    def new_cache(self, capacity: int | None = None) -> FakeCache:
        cache = FakeCache(capacity or 1024)
        self.caches.append(cache)
        return cache

    def forward(self, tokens, cache, positions=None, logits_rows=None, **kw):
        self.kwargs = kw
        n = tokens.shape[0]
        assert tokens.dtype == torch.long and int(tokens.max()) < self.vocab_size
        assert cache.length + n <= cache.capacity
        self.calls.append((cache.length, n, logits_rows))
        cache.length += n
        time.sleep(self.per_token * n)
        rows = n if logits_rows is None else len(logits_rows)
        return torch.zeros(rows, self.vocab_size)


class FakeClock:
    """Stands in for ``time.perf_counter`` in :mod:`genrefine.costs`; only models move it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    import genrefine.costs as policy

    fake = FakeClock()
    monkeypatch.setattr(policy, "time", fake)
    return fake


class TimedModel(FakeModel):
    """A forward of ``n`` tokens takes ``cost(n, k)`` seconds of fake time, ``k`` counting the
    forwards of ``n`` tokens made before it (0 for the first)."""

    def __init__(self, clock: FakeClock, cost) -> None:
        super().__init__(per_token=0.0)
        self.clock, self.cost = clock, cost
        self.seen: dict[int, int] = {}

    def forward(self, tokens, cache, positions=None, logits_rows=None, **kw):
        n = tokens.shape[0]
        k = self.seen.get(n, 0)
        self.seen[n] = k + 1
        self.clock.now += self.cost(n, k)
        return super().forward(tokens, cache, positions, logits_rows, **kw)


def linear(n: int) -> float:
    """A well-behaved forward: 80 ms plus 2 ms per token."""
    return 0.08 + 0.002 * n


def test_measure_verify_cost_with_a_fake_model(clock) -> None:
    model = TimedModel(clock, lambda n, k: linear(n))
    sizes = (1, 4, 8)
    out = measure_verify_cost(model, sizes=sizes, context_len=32, repeats=3)
    assert sorted(out) == list(sizes)
    assert out == {n: pytest.approx(linear(n)) for n in sizes}
    (cache,) = model.caches
    assert cache.length == 32  # every timed forward was rolled back
    assert model.calls[0][:2] == (0, 32)  # the prefix first
    timed = model.calls[1:]
    assert len(timed) == len(sizes) * (3 + 3)  # warm-up + repeats; in order, nothing re-measured
    assert all(start == 32 and rows is None for start, _, rows in timed)  # logits for every row


def test_measure_verify_cost_warms_up_every_size(clock) -> None:
    # The first forwards of each size are slow (kernels chosen, buffers allocated on first use):
    # none of them may end up in the table.
    model = TimedModel(clock, lambda n, k: linear(n) + (0.3 if k < 3 else 0.0))
    out = measure_verify_cost(model, sizes=(1, 2, 4, 8), context_len=16)
    assert out == {n: pytest.approx(linear(n)) for n in (1, 2, 4, 8)}


def test_measure_verify_cost_stops_where_rows_stop_sharing_weight_reads(clock) -> None:
    # bfloat16 on a CPU without native bfloat16 (an AMD EPYC): about a one-token forward per row.
    # The sizes past 12 times one token's cost are not timed; the table extends the line.
    def per_row(n: int) -> float:
        return 0.02 + 0.06 * n

    model = TimedModel(clock, lambda n, k: per_row(n))
    out = measure_verify_cost(model, sizes=(1, 2, 4, 8, 16, 32, 48), context_len=16, repeats=3)
    assert sorted(out) == [1, 2, 4, 8, 16]  # T(16) = 0.98 s > 12 * T(1) = 0.96 s: the last one
    assert 32 not in model.seen and 48 not in model.seen
    table = CostTable.from_measurements(out)
    assert table(48) == pytest.approx(per_row(48))
    # a fast model is measured at every size, however many times dearer its large forwards are
    model = TimedModel(clock, lambda n, k: 0.001 * n)
    assert sorted(measure_verify_cost(model, sizes=(1, 16, 48), context_len=16)) == [1, 16, 48]


def test_measure_verify_cost_does_not_stop_at_one_cold_forward(clock) -> None:
    # The first forward of 4 tokens is slow (a kernel chosen on first use): measured again, warm,
    # it is cheap, and the larger sizes are measured too.
    model = TimedModel(clock, lambda n, k: linear(n) + (3.0 if n == 4 and k == 0 else 0.0))
    out = measure_verify_cost(model, sizes=(1, 2, 4, 8), context_len=16)
    assert out == {n: pytest.approx(linear(n)) for n in (1, 2, 4, 8)}


def test_measure_verify_cost_remeasures_a_size_that_measured_slower_than_a_larger_one(clock) -> None:
    # One token was disturbed through the (default, 3 forwards) warm-up and the whole first
    # timing pass (the cached table of issue 17: T(1) = 356 ms, T(2) = 87 ms); measured again
    # it is fast.
    model = TimedModel(clock, lambda n, k: linear(n) + (0.27 if n == 1 and k < 3 + 3 else 0.0))
    out = measure_verify_cost(model, sizes=(1, 2, 4), context_len=16, repeats=3)
    assert out == {n: pytest.approx(linear(n)) for n in (1, 2, 4)}
    assert model.seen == {16: 1, 1: 3 + 3 + 3, 2: 3 + 3, 4: 3 + 3}  # only T(1) measured again


def test_measure_verify_cost_makes_a_lasting_inversion_monotone(clock) -> None:
    # Two tokens measure cheaper than one however often they are timed: a running maximum.
    costs = {1: 0.10, 2: 0.05, 4: 0.12}
    model = TimedModel(clock, lambda n, k: costs.get(n, 0.0))
    out = measure_verify_cost(model, sizes=(1, 2, 4), context_len=16, repeats=3)
    assert out == {1: pytest.approx(0.10), 2: pytest.approx(0.10), 4: pytest.approx(0.12)}
    assert model.seen[1] > model.seen[2]  # re-measured before giving up


def test_load_or_measure_remeasures_a_table_of_an_older_version(tmp_path, monkeypatch, clock) -> None:
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    key = "fake|cpu"
    old = {"version": 1, "key": key, "context_len": 8, "sizes": [1, 2], "seconds": [0.356, 0.087]}
    path = CostTable.path_for(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    model = TimedModel(clock, lambda n, k: linear(n))
    table = load_or_measure(model, key, sizes=(1, 2), context_len=8)
    assert model.calls  # measured, not read
    assert (table(1), table(2)) == (pytest.approx(linear(1)), pytest.approx(linear(2)))
    assert CostTable.load(key) == table  # and saved over the old one


def test_measure_verify_cost_passes_forward_kwargs() -> None:
    model = FakeModel(per_token=1e-5)
    measure_verify_cost(model, sizes=(1,), context_len=4, repeats=1, forward_kwargs={"x": 1})
    assert model.kwargs == {"x": 1}


def test_load_or_measure_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    model = FakeModel(per_token=1e-5)
    t1 = load_or_measure(model, "fake|cpu", sizes=(1, 2), context_len=8, repeats=1)
    calls = len(model.calls)
    t2 = load_or_measure(model, "fake|cpu", sizes=(1, 2), context_len=8, repeats=1)
    assert len(model.calls) == calls and t1 == t2 and t1.context_len == 8


@pytest.mark.parametrize("tty", [True, False])
def test_load_or_measure_says_what_the_wait_is_on_a_terminal(tmp_path, monkeypatch, tty) -> None:
    """A person at a terminal learns why a first run pauses (one line, only when a table is
    measured); logs and pipes stay as they were."""
    import io
    import sys

    class Err(io.StringIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    err = Err()
    monkeypatch.setattr(sys, "stderr", err)
    model = FakeModel(per_token=1e-5)
    load_or_measure(model, "fake|cpu", sizes=(1, 2), context_len=8, repeats=1)
    load_or_measure(model, "fake|cpu", sizes=(1, 2), context_len=8, repeats=1)  # cached: silent
    lines = err.getvalue().splitlines()
    if tty:
        assert len(lines) == 1 and "timing this model's forwards" in lines[0] and "cached" in lines[0]
    else:
        assert lines == []


# --------------------------------------------------------------------------- chain cut
def steep(n: float) -> float:
    """llama.cpp-like forward times: each extra row costs 70% of a one-token step."""
    return 1.0 + 0.7 * (n - 1)


def test_chain_cut_keeps_everything_with_flat_costs() -> None:
    cut = ChainCut(lambda n: 1.0)
    assert cut([(1,)] * 10) == 10
    assert cut([]) == 0
    for _ in range(20):  # even a context that always misses: rows are free
        cut([(1,)] * 10)
        cut.observe(0, 10)
    assert cut([(1,)] * 10) == 10


def test_chain_cut_learns_which_contexts_pay() -> None:
    cut = ChainCut(steep, explore_every=1000)
    good, bad = (True, 1), (False, 3)
    assert cut.size([good] * 8) == cut.size([bad] * 8) > 0  # nothing learnt yet: the prior drafts
    for _ in range(30):
        cut([good] * 8)
        cut.observe(8, 8)
        cut([bad] * 8)
        cut.observe(0, 8)
    assert cut.rate(good, 0) > 0.9 > 0.7 > cut.rate(bad, 0)
    assert cut.size([good] * 8) == 8
    assert cut.size([bad] * 8) == 0  # (and so it stopped drafting, and learning, there)
    assert cut.size([bad] + [good] * 7) == 0  # an unsure first token holds back the rest
    # an unseen context borrows from its prefix: (True, 2) from (True,), which only saw good
    assert cut.rate((True, 2), 0) > cut.rate((False, 2), 0)
    assert cut.rate((False, 2), 0) == pytest.approx(
        (0 + 2 * cut.rate((False,), 0)) / (0 + 2)
    )
    # a chain accepted up to its third token teaches depths 0..2 (and the miss), not beyond
    before = {k: list(v) for k, v in cut._stats.items()}
    cut([(True, 0)] * 8)
    cut.observe(2, 8)
    new = {k: v for k, v in cut._stats.items() if v != before.get(k)}
    assert {(ctx, d) for ctx, d in new} == {
        (ctx, d) for ctx in [(), (True,), (True, 0)] for d in (0, 1, 2)
    }
    assert new[((True, 0), 2)] == [1.0, 0.0] and new[((True, 0), 1)] == [1.0, 1.0]


def test_chain_cut_explores_a_skipped_context() -> None:
    cut = ChainCut(steep, explore_every=3, explore_len=2)
    for _ in range(20):
        cut([(1,)] * 6)
        cut.observe(0, 6)
    got = []
    for _ in range(6):
        got.append(cut([(1,)] * 6))
        cut.observe(0, got[-1])
    first = got.index(2)
    assert got == [2 if i % 3 == first % 3 else 0 for i in range(6)]
    # a caller that verified fewer tokens than were kept: only those count
    cut = ChainCut(lambda n: 1.0)
    cut([(1,)] * 6)
    cut.observe(1, 1)
    assert cut._stats[((1,), 0)] == [1.0, 1.0] and ((1,), 1) not in cut._stats


def test_chain_cut_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        ChainCut(steep, prior=1.0)
    with pytest.raises(ConfigError):
        ChainCut(steep, explore_every=0)


def test_agreement_of_chain_tokens() -> None:
    from genrefine.methods.parts.ngram_index import ChainCutState as S

    conts = [[5, 6, 7], [5, 6, 8], [5, 9], [4]]
    # 5: 3 of 4 agree; 6: 2 of 3; 7: 1 of 2 (a half is a majority); then nothing is left
    assert S.agreement([5, 6, 7], conts) == [S.MAJORITY, S.MAJORITY, S.MAJORITY]
    assert S.agreement([4], conts) == [S.MINORITY]
    assert S.agreement([5, 6, 8, 1], [[5, 6, 8, 1]] * 2) == [S.ALL] * 4
    assert S.agreement([5, 6], [[5, 6]]) == [S.UNIQUE, S.UNIQUE]


# --------------------------------------------------------------------------- draft stop
def draft_until_stop(stop: DraftStop, probs) -> int:
    """Feed ``probs`` to ``stop`` as a drafter does; returns how many tokens were drafted."""
    stop.begin()
    for n, p in enumerate(probs, 1):
        if not stop.more(p):
            return n
    return len(probs)


def test_draft_stop_drafts_on_while_it_pays() -> None:
    """Free drafting and flat verification: every token pays, all are kept. Drafting that costs
    half a target step: an unsure draft stops at its first token, a sure one goes on; at a whole
    step per draft token not even a sure draft pays."""
    free = DraftStop(lambda n: 1.0, 0.0)
    assert draft_until_stop(free, [0.3] * 8) == 8 and free() == 8
    dear = DraftStop(lambda n: 1.0, 0.5)
    assert draft_until_stop(dear, [0.3] * 8) == 1
    assert draft_until_stop(dear, [0.99] * 8) > 3
    assert draft_until_stop(DraftStop(lambda n: 1.0, 1.0), [0.99] * 8) == 1
    # the expected gain falls with the path probability: a sure start, then unsure tokens, stops
    mid = DraftStop(lambda n: 1.0, 0.2)
    assert draft_until_stop(mid, [0.95, 0.95, 0.2, 0.2, 0.2]) == 3


def test_draft_stop_cuts_greedy_drafts_to_what_pays_to_verify() -> None:
    stop = DraftStop(steep, 0.0)  # drafting is free, each verified row costs 0.7 of a step
    assert draft_until_stop(stop, [0.99, 0.99, 0.3, 0.3]) >= 3
    kept = stop()
    assert kept == 2 and stop._pending == pytest.approx(0.99 + 0.99**2)
    draft_until_stop(stop, [0.99, 0.99, 0.3, 0.3])
    assert stop(whole=True) == len(stop._paths)  # sampled drafts are never cut
    assert stop([0.99, 0.99, 0.3, 0.3]) == kept  # the same probabilities given at once
    with pytest.raises(ConfigError, match="draft_cost"):
        DraftStop(steep, -1.0)


def test_draft_stop_calibrates_against_what_was_accepted() -> None:
    """A draft that claims 0.9 but is never accepted past its first token gets shorter drafts;
    reset() forgets it."""
    stop = DraftStop(lambda n: 1.0, 0.15)
    probs = [0.9] * 10
    before = draft_until_stop(stop, probs)
    for _ in range(20):
        draft_until_stop(stop, probs)
        stop()
        stop.observe(0, 1)
    after = draft_until_stop(stop, probs)
    assert after < before
    stop.reset()
    assert draft_until_stop(stop, probs) == before


# --------------------------------------------------------------------------- one protocol
def mild(n: float) -> float:
    """Forward times where each extra row costs 20% of a one-token step."""
    return 1.0 + 0.2 * (n - 1)


SIZERS = {
    "tree_cut": (lambda: TreeCut(mild), [0.9, 0.8, 0.7, 0.6, 0.5]),
    "chain_cut": (lambda: ChainCut(mild, explore_every=1000), [(True, 1)] * 5),
    "draft_stop": (lambda: DraftStop(mild, 0.0), [0.9, 0.8, 0.7, 0.6, 0.5]),
}


@pytest.mark.parametrize("name", list(SIZERS))
def test_draft_sizers_share_one_protocol(name: str) -> None:
    """Every draft-size control is called with one score per node, learns from
    observe(accepted, verified), and forgets on reset(): drafts that are never accepted shrink
    the cut, and a reset sizer cuts as a new one does."""
    make, scores = SIZERS[name]
    sizer = make()
    assert isinstance(sizer, DraftSizer)
    fresh = sizer(scores)
    assert 1 <= fresh <= len(scores)
    for _ in range(30):
        n = sizer(scores)
        sizer.observe(0, n)
    assert sizer(scores) < fresh
    sizer.reset()
    assert sizer(scores) == fresh


def test_cost_keys_of_quantized_models_name_the_kernels(monkeypatch) -> None:
    """A quantized model's cost tables are keyed on the C++ kernels' source, so a changed kernel
    is timed again instead of steering `auto` by stale figures; float models' keys are as before."""
    from types import SimpleNamespace

    import genrefine.kernels as kernels
    from genrefine.costs import _target_key

    quant = SimpleNamespace(name="m", quantized=True, device=torch.device("cpu"), segments=None)
    flt = SimpleNamespace(name="m", quantized=False, dtype=torch.bfloat16, device=torch.device("cpu"))
    monkeypatch.setattr("genrefine.models.protocol.weights_format", lambda m: "quantized:Q8_0")
    before_q, before_f = _target_key(quant), _target_key(flt)
    monkeypatch.setattr(kernels, "source_key", lambda: "changed")
    assert _target_key(quant) != before_q and _target_key(quant).endswith("|kernels=changed")
    assert _target_key(flt) == before_f
