"""Verifiers: greedy tables, exact distributions of speculative sampling, typical acceptance,
seeded determinism and tree topology.

The exact-distribution harness. A verifier's randomness is "which node wins among each node's
children" and "which bonus token": :func:`speculative_plan` is the real code's deterministic half
(per-node acceptance probability given that the node is tried, and per-row bonus distribution),
so the harness enumerates every draft a drafter can propose (with its q-probability) and, for
each, every walk through the tree (child c wins with probability accept[c] * prod over earlier
siblings (1 - accept)), giving the exact distribution of the emitted tokens. Short outputs are
continued with the target itself (what the next step would emit if it is lossless) so that
the joint of the first L tokens can be compared with the target's. The random half of
verify_speculative (uniforms, first success, bonus draw) is checked separately by a Monte Carlo.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from functools import lru_cache

import pytest
import torch

import genrefine.verify.sampling as vs
from genrefine.sampling import logits_to_probs, sample
from genrefine.types import Draft, SamplingParams
from genrefine.verify import (
    build_tree,
    deepest_path_row,
    speculative_plan,
    tree_positions,
    verify_greedy_argmax,
    verify_speculative,
    verify_typical,
)
from genrefine.verify.greedy import finish

V = 5  # toy vocabulary
CTX = (0,)  # the decided prefix; its last token is the root

# ---------------------------------------------------------------------------------------------
# a toy target and drafter: logits are a fixed pseudo-random function of the prefix


def _code(prefix: tuple[int, ...]) -> int:
    c = 0
    for t in prefix:
        c = c * (V + 1) + t + 1
    return c


@lru_cache(maxsize=None)
def _target_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 + _code(prefix))
    return torch.randn(V, generator=g) * 1.5  # [V]


@lru_cache(maxsize=None)
def _draft_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(2_000_003 + _code(prefix))
    # correlated with the target, and flatter (so sampling several siblings stays possible)
    return 0.6 * (_target_logits(prefix) + torch.randn(V, generator=g))  # [V]


@lru_cache(maxsize=None)
def p_of(prefix: tuple[int, ...], params: SamplingParams) -> torch.Tensor:
    return logits_to_probs(_target_logits(prefix), params)  # [V] float32


@lru_cache(maxsize=None)
def q_of(prefix: tuple[int, ...], params: SamplingParams) -> torch.Tensor:
    return logits_to_probs(_draft_logits(prefix), params)  # [V] float32


def node_prefix(parents, tokens, i: int) -> tuple[int, ...]:
    """CTX followed by the tokens on the root-to-node path of node i (CTX for i = -1)."""
    path = []
    while i >= 0:
        path.append(tokens[i])
        i = parents[i]
    return CTX + tuple(reversed(path))


def target_rows(parents, tokens, params) -> torch.Tensor:
    rows = [p_of(CTX, params)] + [
        p_of(node_prefix(parents, tokens, i), params) for i in range(len(parents))
    ]
    return torch.stack(rows)  # [n + 1, V]


def make_draft(parents, tokens, params, sampled: bool) -> Draft:
    probs = None
    if sampled:
        rows = [q_of(node_prefix(parents, tokens, parents[i]), params) for i in range(len(parents))]
        probs = torch.stack(rows) if rows else torch.zeros(0, V)
    return Draft(
        torch.tensor(tokens, dtype=torch.long).reshape(-1),
        torch.tensor(parents, dtype=torch.long).reshape(-1),
        probs,
    )


def drafter_outcomes(parents, params, siblings: str):
    """Every token assignment a sampling drafter can produce, with its probability (float64)."""
    n = len(parents)
    out = []

    def rec(i: int, toks: list[int], w: float) -> None:
        if i == n:
            out.append((tuple(toks), w))
            return
        q = q_of(node_prefix(parents, toks, parents[i]), params).double().clone()
        if siblings == "without_replacement":
            for j in range(i):
                if parents[j] == parents[i]:
                    q[toks[j]] = 0.0
        q = q / q.sum()
        for x in range(V):
            if q[x] > 0:
                rec(i + 1, toks + [x], w * float(q[x]))

    rec(0, [], 1.0)
    return out


def emitted_from_plan(draft: Draft, plan) -> dict[tuple[int, ...], float]:
    """Exact distribution of the emitted tokens of verify_speculative for one draft."""
    parents = draft.parents.tolist()
    tokens = draft.tokens.tolist()
    a = plan.accept_prob.double().tolist()
    bonus = plan.bonus_probs.double()
    children = defaultdict(list)
    for c, par in enumerate(parents):
        children[par + 1].append(c)
    out: dict[tuple[int, ...], float] = defaultdict(float)

    def walk(row: int, mass: float, emitted: tuple[int, ...]) -> None:
        none = 1.0  # probability that every child tried so far was rejected
        for c in children[row]:
            if none * a[c] > 0:
                walk(c + 1, mass * none * a[c], emitted + (tokens[c],))
            none *= 1.0 - a[c]
        for y in range(V):
            if bonus[row, y] > 0:
                out[emitted + (y,)] += mass * none * float(bonus[row, y])

    walk(0, 1.0, ())
    return out


def extend(dist, params, length: int, into: torch.Tensor | None = None, weight: float = 1.0):
    """Joint of the first ``length`` tokens, continuing short sequences with the target."""
    res = torch.zeros((V,) * length, dtype=torch.float64) if into is None else into
    for seq, m in dist.items():
        if len(seq) >= length:
            res[seq[:length]] += weight * m
        else:
            p = p_of(CTX + seq, params).double()
            extend({seq + (y,): float(p[y]) for y in range(V) if p[y] > 0}, params, length, res,
                   weight * m)
    return res


def target_joint(params, length: int) -> torch.Tensor:
    return extend({(): 1.0}, params, length)


def speculative_joint(parents, params, draw: str, verify_as: str | None = None, length=None):
    """Exact joint of the first ``length`` emitted tokens, averaged over sampled drafts drawn
    with sibling mode ``draw`` and verified assuming ``verify_as``."""
    length = length or build_tree(parents).num_levels + 1
    res = torch.zeros((V,) * length, dtype=torch.float64)
    outcomes = drafter_outcomes(parents, params, draw)
    assert abs(sum(w for _, w in outcomes) - 1.0) < 1e-9, "toy drafter cannot fill this shape"
    for toks, w in outcomes:
        draft = make_draft(parents, toks, params, sampled=True)
        plan = speculative_plan(draft, target_rows(parents, toks, params), verify_as or draw)
        extend(emitted_from_plan(draft, plan), params, length, res, w)
    return res


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def assert_lossless(got: torch.Tensor, want: torch.Tensor) -> None:
    assert abs(float(got.sum()) - 1.0) < 1e-6
    for k in range(1, got.dim() + 1):  # first token, first two tokens, ..., the full joint
        dims = tuple(range(k, got.dim()))
        g = got.sum(dim=dims) if dims else got
        w = want.sum(dim=dims) if dims else want
        err = float((g - w).abs().max())
        assert err < 1e-5, f"first {k} tokens differ from the target by {err:.2e}"


PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7_k3": SamplingParams(temperature=0.7, top_k=3),
    "t1.3_p0.9": SamplingParams(temperature=1.3, top_p=0.9),
    "greedy": SamplingParams(temperature=0.0),
}
CHAINS = {"chain1": [-1], "chain3": [-1, 0, 1]}
TREES = {"tree3": [-1, -1, 0], "fan3": [-1, -1, -1, 1]}

# ---------------------------------------------------------------------------------------------
# tree topology


def test_build_tree_hand_built():
    #       root
    #      /    \
    #     0      1
    #    / \     |
    #   2   3    5
    #   |
    #   4
    parents = [-1, -1, 0, 0, 2, 1]
    info = build_tree(torch.tensor(parents))
    assert info.num_nodes == 6 and info.num_levels == 3
    assert info.depth.tolist() == [0, 0, 1, 1, 2, 1]
    assert info.leaves.tolist() == [3, 4, 5]
    assert info.sibling_rank.tolist() == [0, 1, 0, 1, 0, 0]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for i, anc in {0: [0], 1: [1], 2: [0, 2], 3: [0, 3], 4: [0, 2, 4], 5: [1, 5]}.items():
        want[i, anc] = True
    assert torch.equal(info.mask, want)
    assert torch.equal(info.mask_with_root[1:, 1:], want)
    assert info.mask_with_root[:, 0].all() and not info.mask_with_root[0, 1:].any()
    assert info.earlier_sibling.nonzero().tolist() == [[1, 0], [3, 2]]
    assert tree_positions(10, info).tolist() == [11, 11, 12, 12, 13, 12]
    assert not info.is_chain and build_tree([-1, 0, 1]).is_chain


def test_build_tree_is_cached_and_empty():
    a = build_tree(torch.tensor([-1, -1, 0]))
    assert build_tree([-1, -1, 0]) is a
    assert build_tree(torch.tensor([-1, -1, 0]).clone()) is a
    e = build_tree(torch.zeros(0, dtype=torch.long))
    assert e.num_nodes == 0 and e.num_levels == 0 and e.mask.shape == (0, 0)
    assert e.mask_with_root.tolist() == [[True]]


@pytest.mark.parametrize("bad", [[0], [-2], [-1, 1], [-1, 0, 3]])
def test_build_tree_rejects_invalid_parents(bad):
    with pytest.raises(AssertionError, match="parents"):
        build_tree(torch.tensor(bad))


# ---------------------------------------------------------------------------------------------
# greedy tables


def logits_with_argmax(argmax: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(len(argmax), 6, generator=g)  # [n + 1, 6] in [0, 1)
    return x + 5.0 * torch.nn.functional.one_hot(torch.tensor(argmax), 6)


@pytest.mark.parametrize(
    "parents, tokens, argmax, path, emitted",
    [
        ([-1, 0, 1], [1, 2, 3], [1, 2, 3, 4], [0, 1, 2], [1, 2, 3, 4]),  # perfect match + bonus
        ([-1, 0, 1], [1, 2, 3], [0, 2, 3, 4], [], [0]),  # first token missed
        ([-1, 0, 1], [1, 2, 3], [1, 5, 3, 4], [0], [1, 5]),  # middle miss
        # the right answer is on the second branch: 1 -> 3
        ([-1, -1, 0, 1], [1, 2, 3, 4], [2, 0, 4, 5, 1], [1, 3], [2, 4, 1]),
        # both branches match equally deep (duplicate siblings): the lower index wins
        ([-1, -1, 0, 1], [2, 2, 3, 3], [2, 3, 3, 1, 1], [0, 2], [2, 3, 1]),
        # deepest wins over a shallower, lower-index match
        ([-1, -1, 1], [2, 2, 5], [2, 0, 5, 4], [1, 2], [2, 5, 4]),
        ([], [], [3], [], [3]),  # empty draft: just the bonus
    ],
)
def test_verify_greedy_tables(parents, tokens, argmax, path, emitted):
    draft = Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    res = verify_greedy_argmax(draft, torch.tensor(argmax))
    assert res.path.tolist() == path
    assert res.tokens.tolist() == emitted
    assert res.num_accepted == len(path)


def test_speculative_greedy_equals_plain_greedy():
    """With one-hot p and q both verifiers emit plain greedy decoding. They agree exactly unless
    siblings repeat a token: then greedy takes the deepest copy, speculative the first."""
    params = PARAMS["greedy"]
    g = torch.Generator().manual_seed(0)
    for parents in [[-1, 0, 1], [-1, -1, 0, 1, 2], [-1, -1, -1, 1]]:
        for toks in itertools.islice(itertools.product(range(V), repeat=len(parents)), 0, None, 7):
            rows = target_rows(parents, toks, params)
            draft = make_draft(parents, list(toks), params, sampled=False)
            res = verify_greedy_argmax(draft, rows.argmax(dim=-1))
            spec = verify_speculative(draft, rows, g)
            # plain greedy decoding of the toy target
            plain, prefix = [], CTX
            for _ in range(len(parents) + 1):
                plain.append(int(p_of(prefix, params).argmax()))
                prefix = prefix + (plain[-1],)
            assert res.tokens.tolist() == plain[: len(res.tokens)]
            assert spec.tokens.tolist() == plain[: len(spec.tokens)]
            repeated = any(toks[i] == toks[j] and parents[i] == parents[j]
                           for i in range(len(toks)) for j in range(i))
            if not repeated:
                assert torch.equal(spec.path, res.path)


# ---------------------------------------------------------------------------------------------
# speculative sampling: exact distributions


@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("shape", list(CHAINS))
def test_speculative_chain_sampled_drafts_exact(pname, shape):
    params, parents = PARAMS[pname], CHAINS[shape]
    length = len(parents) + 1
    assert_lossless(speculative_joint(parents, params, "iid"), target_joint(params, length))


@pytest.mark.parametrize(
    "draw, verify_as",
    [
        ("without_replacement", "without_replacement"),
        ("iid", "iid"),
        # the without-replacement rule is lossless for i.i.d. draws too (repeats are skipped)
        ("iid", "without_replacement"),
    ],
)
@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("shape", list(TREES))
def test_speculative_tree_sampled_drafts_exact(pname, shape, draw, verify_as):
    params, parents = PARAMS[pname], TREES[shape]
    if params.greedy and draw == "without_replacement":
        pytest.skip("a one-hot q has a single token: siblings without replacement cannot exist")
    length = build_tree(parents).num_levels + 1
    got = speculative_joint(parents, params, draw, verify_as)
    assert_lossless(got, target_joint(params, length))


@pytest.mark.parametrize("pname", ["t1", "t0.7_k3", "greedy"])
@pytest.mark.parametrize("parents", [[-1, 0], [-1, -1, 0], [-1, -1, -1, 1]])
def test_speculative_deterministic_drafts_exact(pname, parents):
    """probs=None: every fixed draft (including repeated sibling tokens) is lossless on its own."""
    params = PARAMS[pname]
    length = build_tree(parents).num_levels + 1
    want = target_joint(params, length)
    all_drafts = list(itertools.product(range(V), repeat=len(parents)))
    for toks in all_drafts[:: max(1, len(all_drafts) // 40)]:
        draft = make_draft(parents, list(toks), params, sampled=False)
        plan = speculative_plan(draft, target_rows(parents, toks, params))
        assert_lossless(extend(emitted_from_plan(draft, plan), params, length), want)


def test_speculative_empty_draft():
    params = PARAMS["t1"]
    rows = p_of(CTX, params)[None]  # [1, V]
    g = torch.Generator().manual_seed(0)
    for probs in (None, torch.zeros(0, V)):
        draft = Draft(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), probs)
        plan = speculative_plan(draft, rows)
        assert torch.equal(plan.bonus_probs, rows)
        for verify in (verify_speculative, verify_typical):
            res = verify(draft, rows, g)
            assert res.num_accepted == 0 and res.tokens.shape == (1,)


def test_speculative_edge_cases():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])  # [2, 3]
    # q(x) = 0: the candidate could not have been drawn; it is skipped, p left as it is
    plan = speculative_plan(Draft.chain([1], torch.tensor([[1.0, 0.0, 0.0]])), p)
    assert plan.accept_prob.tolist() == [0.0]
    assert torch.equal(plan.bonus_probs, p)
    # p == q: always accepted; the (unreachable) residual falls back to p
    plan = speculative_plan(Draft.chain([0], p[:1].clone()), p)
    assert plan.accept_prob.tolist() == [1.0]
    assert torch.equal(plan.bonus_probs[0], p[0])
    # point mass on a token p gives probability 1: accepted for sure
    plan = speculative_plan(Draft.chain([2]), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert plan.accept_prob.tolist() == [1.0]


# ---------------------------------------------------------------------------------------------
# the distribution checks can fail: known bugs are detected


def test_exact_check_detects_accepting_with_p(monkeypatch):
    params, parents = PARAMS["t1"], CHAINS["chain3"]
    want = target_joint(params, 4)
    monkeypatch.setattr(vs, "_accept_prob", lambda px, qx: px)  # bug: p(x), not min(1, p/q)
    got = speculative_joint(parents, params, "iid")
    assert tv(got, want) > 0.02
    with pytest.raises(AssertionError, match="differ from the target"):
        assert_lossless(got, want)


def test_exact_check_detects_bonus_from_p(monkeypatch):
    params, parents = PARAMS["t1"], CHAINS["chain1"]
    want = target_joint(params, 2)
    monkeypatch.setattr(vs, "_residual", lambda p, q: p)  # bug: bonus from p, not the residual
    got = speculative_joint(parents, params, "iid")
    assert tv(got, want) > 0.02
    with pytest.raises(AssertionError, match="differ from the target"):
        assert_lossless(got, want)


@pytest.mark.parametrize("pname", ["t1", "t1.3_p0.9"])
def test_exact_check_detects_wrong_sibling_assumption(pname):
    """The sibling rule matters: siblings drawn without replacement but verified with the i.i.d.
    rule (q left unchanged) are not lossless."""
    params, parents = PARAMS[pname], TREES["fan3"]
    got = speculative_joint(parents, params, "without_replacement", "iid")
    want = target_joint(params, 3)
    assert tv(got, want) > 0.01
    with pytest.raises(AssertionError, match="differ from the target"):
        assert_lossless(got, want)


# ---------------------------------------------------------------------------------------------
# the random half, end to end (Monte Carlo; seeded, so deterministic)


def chi_square_ok(counts: Counter, probs: dict, n: int) -> bool:
    """Pearson chi-square over outcomes with expected count >= 5 (the rest pooled); passes when
    the statistic is below df + 6 sqrt(2 df) (far in the tail for a correct sampler)."""
    stat, df, pooled_e, pooled_o = 0.0, 0, 0.0, n
    for k, pk in probs.items():
        e = n * pk
        if e >= 5:
            stat += (counts.get(k, 0) - e) ** 2 / e
            df += 1
            pooled_o -= counts.get(k, 0)
        else:
            pooled_e += e
    if pooled_e >= 5:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
    else:
        df -= 1
        assert pooled_o <= max(10, 3 * pooled_e), "outcomes with tiny probability came up often"
    return stat < df + 6 * (2 * max(df, 1)) ** 0.5


def test_verify_speculative_matches_its_plan_monte_carlo():
    params, parents = PARAMS["t1"], TREES["fan3"]
    toks = [1, 3, 2, 0]  # node 0 accepted w.p. ~0.54, else node 1 surely, then node 3 w.p. ~0.25
    draft = make_draft(parents, toks, params, sampled=True)
    rows = target_rows(parents, toks, params)
    probs = emitted_from_plan(draft, speculative_plan(draft, rows))
    g = torch.Generator().manual_seed(1234)
    n = 3000
    counts = Counter(tuple(verify_speculative(draft, rows, g).tokens.tolist()) for _ in range(n))
    assert set(counts) <= {k for k, v in probs.items() if v > 0}
    assert chi_square_ok(counts, probs, n)
    # the same check rejects a random half that lets any successful sibling win (deepest path
    # over all hits) instead of the first success in index order
    def any_hit_wins(draft, rows, g):
        info = build_tree(draft.parents)
        plan = speculative_plan(draft, rows)
        hit = torch.rand(info.num_nodes, generator=g) < plan.accept_prob
        end_row = deepest_path_row(info, hit)
        return finish(info, draft.tokens, end_row, sample(plan.bonus_probs[end_row], g))

    buggy = Counter(tuple(any_hit_wins(draft, rows, g).tokens.tolist()) for _ in range(n))
    assert not chi_square_ok(buggy, probs, n)


def test_draft_then_verify_end_to_end_monte_carlo():
    """Sample a 3-sibling tree with torch.multinomial (without replacement, draw order), verify,
    and compare the first two emitted tokens with the target's joint."""
    params = PARAMS["t1"]
    q0 = q_of(CTX, params)
    g = torch.Generator().manual_seed(99)
    want = target_joint(params, 2)
    probs = {(a, b): float(want[a, b]) for a in range(V) for b in range(V)}
    counts, n = Counter(), 3000
    for _ in range(n):
        kids = torch.multinomial(q0, 3, replacement=False, generator=g)  # [3], in draw order
        grandchild = torch.multinomial(q_of(CTX + (int(kids[1]),), params), 1, generator=g)
        toks = kids.tolist() + grandchild.tolist()
        parents = TREES["fan3"]
        draft = make_draft(parents, toks, params, sampled=True)
        res = verify_speculative(draft, target_rows(parents, toks, params), g)
        out = res.tokens.tolist()
        if len(out) == 1:  # continue with the target, as the next step would
            out.append(int(torch.multinomial(p_of(CTX + (out[0],), params), 1, generator=g)))
        counts[tuple(out[:2])] += 1
    assert chi_square_ok(counts, probs, n)


def test_seeded_determinism():
    params, parents = PARAMS["t1"], TREES["fan3"]
    toks = [1, 3, 2, 0]
    draft = make_draft(parents, toks, params, sampled=True)
    rows = target_rows(parents, toks, params)

    def run(seed: int, verifier):
        g = torch.Generator().manual_seed(seed)
        return [verifier(draft, rows, g) for _ in range(20)]

    for verifier in (verify_speculative, verify_typical):
        a, b, c = run(7, verifier), run(7, verifier), run(8, verifier)
        assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.path, y.path)
                   for x, y in zip(a, b))
        assert any(not torch.equal(x.tokens, z.tokens) for x, z in zip(a, c))


# ---------------------------------------------------------------------------------------------
# typical acceptance (lossy)


def test_typical_is_greedy_on_peaked_p():
    parents, tokens = [-1, -1, 0, 1, 3], [1, 2, 3, 4, 0]
    argmax = [2, 0, 4, 5, 1, 3]  # branch 1 -> 3 matches, then node 4 (token 0) misses
    draft = Draft(torch.tensor(tokens), torch.tensor(parents))
    g = torch.Generator().manual_seed(0)
    peaked = logits_to_probs(logits_with_argmax(argmax) * 4.0, SamplingParams(temperature=1.0))
    one_hot = logits_to_probs(logits_with_argmax(argmax), PARAMS["greedy"])
    want = verify_greedy_argmax(draft, torch.tensor(argmax))
    assert want.path.tolist() == [1, 3] and want.tokens.tolist() == [2, 4, 1]
    for probs in (peaked, one_hot):
        got = verify_typical(draft, probs, g)
        assert got.path.tolist() == want.path.tolist()
        assert got.tokens.tolist() == want.tokens.tolist()


def test_typical_is_not_lossless():
    params, parents = PARAMS["t1"], [-1, 0]
    want = target_joint(params, 3)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for toks in itertools.product(range(V), repeat=2):
        rows = target_rows(parents, toks, params)
        res = verify_typical(make_draft(parents, list(toks), params, sampled=False), rows, g)
        # the path is deterministic; the bonus is drawn from p at the row after it
        end = int(res.path[-1]) + 1 if res.num_accepted else 0
        emitted = tuple(res.tokens[:-1].tolist())
        dist = {emitted + (y,): float(rows[end, y]) for y in range(V) if rows[end, y] > 0}
        worst = max(worst, tv(extend(dist, params, 3), want))
    assert worst > 0.1  # a deterministic draft is accepted outright when p(x) passes the bar
