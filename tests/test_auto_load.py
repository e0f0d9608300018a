"""``auto`` under the server's load: the scheduler tells each policy how many sequences share the
step's forward, and ``auto`` drafts less, or not at all, where extra rows in a full batch cost
more than they bring. Greedy output stays ar's.
"""

from __future__ import annotations

import pytest
import torch

import genrefine
import genrefine.methods.auto as auto_mod
from genrefine.costs import CostTable, batch_costs, measure_batch_cost
from genrefine.methods.auto import CostModelPolicy, CostPolicy
from genrefine.server import ServerConfig
from genrefine.server.scheduler import Job, Scheduler
from genrefine.types import SamplingParams
from tiny import save_tiny_model_dir

DEADLINE_S = 60.0  # joins the worker, never asserted as a speed
PROMPTS = ["abc abc abc abc abc", "The cat sat on the mat. The cat", "1 2 3 1 2 3 1 2", "hello hello",
           "xyz xyz xyz", "Once upon a time", "aaaa aaaa aaaa", "one two one two", "zz", "q",
           "red green blue red", "0 0 0 0 0 0"]


def roofline() -> CostTable:
    """A forward that costs the same up to 8 rows (reading the weights), then grows with rows."""
    sizes = (1, 8, 16, 32, 64, 128)
    return CostTable(sizes, tuple(max(1.0, n / 8) for n in sizes))


def cheap_batch() -> CostTable:
    """``T_batch(b)``: a plain row inside a batch is cheap (a little attention per sequence)."""
    sizes = (1, 2, 4, 8, 16, 32)
    return CostTable(sizes, tuple(max(1.0, b / 8) + 0.01 * b for b in sizes))


def confident(policy: CostModelPolicy, name: str = "pld", alpha: float = 0.8) -> None:
    g = torch.Generator().manual_seed(0)
    passed = (torch.rand(200, 8, generator=g) < alpha).long()  # [steps, 8]
    for a in passed.cumprod(dim=1).sum(dim=1).tolist():
        policy.update(name, 8, a)


@pytest.mark.parametrize("batch_cost", [None, "measured"])
def test_the_budget_shrinks_with_the_load_and_stops_in_a_full_batch(batch_cost) -> None:
    policy = CostModelPolicy(roofline(), max_len=8,
                             batch_cost=cheap_batch() if batch_cost else None)
    confident(policy)
    budgets = {}
    for load in (1, 2, 4, 8, 16):
        policy.set_load(load)
        name, budgets[load] = policy.choose(["pld"])
        assert (name is None) == (budgets[load] == 0)
    assert budgets[1] == 7  # alone: every draft token up to 8 rows is free
    assert budgets[1] >= budgets[2] >= budgets[4] >= budgets[8] >= budgets[16]
    assert 0 < budgets[2] < budgets[1]
    assert budgets[8] == budgets[16] == 0  # every row more costs a full share: plain decoding
    policy.set_load(16)
    assert policy.rate("pld", 1) < policy.rate("pld", 0)


def test_a_draft_that_spills_past_a_full_tile_is_priced_at_the_margin() -> None:
    """Kernels that run 16 rows as one tile: 16 rows cost what one does, rows 17-20 run on a
    slower loop. Sixteen sequences fill the tile; one more sequence's draft rows spill past it,
    which all sixteen pay for, so a confident drafter does not draft. (Priced as if every sequence
    drafted, 16 more rows fill a second tile cheaply and drafting looked worth it.)"""
    sizes = (1, 16, 17, 20, 21, 32, 64)
    tile = CostTable(sizes, (1.0, 1.0, 1.15, 1.6, 1.65, 1.9, 3.0))
    batch = CostTable((1, 16), (1.0, 1.16))
    policy = CostModelPolicy(tile, max_len=8, batch_cost=batch)
    confident(policy)
    assert policy.choose(["pld"])[1] == 8  # alone: up to 16 rows are free
    policy.set_load(16)
    assert policy.choose(["pld"]) == (None, 0)
    e1 = policy.estimator("pld").expected_tokens(1)
    assert policy.rate("pld", 1) == pytest.approx((15 + e1) / (1.16 + 0.15))
    assert policy.rate("pld", 0) == pytest.approx(16 / 1.16)
    # the old pricing (all sixteen draft one: T(32) - T(16) more) would have drafted
    assert e1 / (1.16 + tile(32) - tile(16)) > 1 / 1.16


def test_alone_the_rule_is_the_single_sequence_one() -> None:
    table = roofline()
    policy = CostModelPolicy(table, max_len=8, batch_cost=cheap_batch())
    for n in range(9):
        assert policy.step_cost(n, 1) == table(n + 1)
    assert policy.step_cost(0, 16) == cheap_batch()(16)
    # this sequence's 3 rows on top of the batch's 16 plain ones
    assert policy.step_cost(3, 16) == pytest.approx(cheap_batch()(16) + table(19) - table(16))


def test_sampled_generations_ignore_the_load() -> None:
    """A seed gives the same tokens whatever else the server decodes."""
    policy = CostPolicy(roofline(), 8, cheap_batch())
    policy.reset(SamplingParams(temperature=0.8, seed=1))
    policy.observe_load(16)
    assert policy.policy.load == 1
    policy.reset(SamplingParams())
    policy.observe_load(16)
    assert policy.policy.load == 16
    policy.reset(SamplingParams())  # a new generation starts alone until told otherwise
    assert policy.policy.load == 1


# --------------------------------------------------------------------------- in the scheduler
@pytest.fixture(scope="module")
def gen16(tmp_path_factory, cache_dir):
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama", "llama")
    return genrefine.load(str(d), dtype="bfloat16", quiet=True)


def decode_all(gen, method: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Submit every prompt before the worker starts (so they share every step), run to the end."""
    sched = Scheduler(gen, ServerConfig(method="ar", max_batch=len(prompts)))
    assert sched.batched
    events: list[list] = [[] for _ in prompts]
    for p, evs in zip(prompts, events):
        ids = gen.tokenizer(p)["input_ids"]
        sched.submit(Job(ids, max_tokens, SamplingParams(), method, emit=evs.append))
    sched.start()
    sched.stop(DEADLINE_S)
    for evs in events:
        assert evs and evs[-1].kind == "done", evs[-1].message if evs else "no events"
    return ["".join(e.text for e in evs) for evs in events]


def test_auto_under_load_drafts_nothing_and_equals_ar(gen16, monkeypatch) -> None:
    monkeypatch.setattr(auto_mod, "target_costs", lambda model: roofline())
    monkeypatch.setattr(auto_mod, "batch_costs", lambda model: cheap_batch())
    chosen: list[tuple[int, int]] = []  # (load, budget) of every choice
    choose = CostModelPolicy.choose

    def spy(self, names):
        out = choose(self, names)
        chosen.append((self.load, out[1]))
        return out

    monkeypatch.setattr(CostModelPolicy, "choose", spy)
    assert decode_all(gen16, "auto", PROMPTS[:1], 16) == decode_all(gen16, "ar", PROMPTS[:1], 16)
    assert chosen and all(load == 1 for load, _ in chosen)
    assert any(budget > 0 for _, budget in chosen)  # alone, drafting pays with this table

    chosen.clear()
    texts = decode_all(gen16, "auto", PROMPTS, 16)
    assert texts == decode_all(gen16, "ar", PROMPTS, 16)
    full = [budget for load, budget in chosen if load >= 8]  # a request may end at its prefill
    assert full and all(budget == 0 for budget in full)


def test_the_batched_forward_cost_is_measured_once_and_cached(gen16) -> None:
    measured = measure_batch_cost(gen16.model, sizes=(1, 2, 4), context_len=8, repeats=1, warmup=0)
    assert list(measured) == [1, 2, 4]
    assert all(s > 0 for s in measured.values())
    assert list(measured.values()) == sorted(measured.values())
    assert batch_costs(gen16.model) is None  # nothing measured: auto models T_batch as T
    table = batch_costs(gen16.model, measure=True, sizes=(1, 2), context_len=8, repeats=1)
    assert table.sizes == (1, 2)
    assert batch_costs(gen16.model) == table  # read back from the cache, not measured again


def test_cached_choices_equal_choices_made_afresh() -> None:
    """``choose`` keeps each drafter's best draft size until its rates, its drafting cost or the
    load change; every choice must equal one computed from scratch (a missed invalidation, say an
    update that leaves the cached size in place, makes them differ)."""
    g = torch.Generator().manual_seed(3)
    kept = CostModelPolicy(roofline(), max_len=8, batch_cost=cheap_batch(), probe_every=5)
    fresh = CostModelPolicy(roofline(), max_len=8, batch_cost=cheap_batch(), probe_every=5)
    names = ["pld", "jacobi"]
    differed_from_last = 0
    last = None
    for step in range(600):
        event = int(torch.randint(0, 6, (), generator=g))
        name = names[int(torch.randint(0, 2, (), generator=g))]
        if event == 0:
            load = int(torch.randint(1, 17, (), generator=g))
            kept.set_load(load)
            fresh.set_load(load)
        elif event == 1:
            drafted = int(torch.randint(1, 9, (), generator=g))
            accepted = int(torch.randint(0, drafted + 1, (), generator=g))
            kept.update(name, drafted, accepted)
            fresh.update(name, drafted, accepted)
        elif event == 2:
            seconds = float(torch.rand((), generator=g)) * 0.05
            kept.update_draft_cost(name, seconds, 4)
            fresh.update_draft_cost(name, seconds, 4)
        fresh._best_cache.clear()
        choice = kept.choose(names)
        assert choice == fresh.choose(names), step
        differed_from_last += choice != last
        last = choice
    assert differed_from_last > 20  # the events did move the choice
