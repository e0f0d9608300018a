"""The speech methods of issue 20: ``pcg`` (group-level speculative sampling, exact on groups)
and ``vadusa`` (heads, a sparse tree, tolerance acceptance), both lossy.

* pcg: on a 6-token vocabulary with known groups, the emitted group's law equals the target's
  group marginal exactly (enumeration of accept / reject, for arbitrary p and q), and planted
  bugs (a token-level residual, a token-level ratio) fail that check; the token's law is not the
  target's in general (the "lossy" label is earned); a row's acceptance is at least the exact
  rule's; the verifier follows the rule (seeded Monte Carlo); greedy is ``ar``'s tokens.
* vadusa: every accepted drafted token is in the target's top-k at its position (recomputed
  from a fresh forward of the whole output), a planted bug (accepting beyond the top-k) is
  caught by the same check, tolerance 1 accepts exactly the greedy path, greedy is ``ar``'s.
"""

from __future__ import annotations

import functools
from functools import partial

import pytest
import torch
from tiny import tiny_drafter, tiny_hf_model

from genrefine.cli import main
from genrefine.engine import Engine, Stats
from genrefine.errors import ConfigError
from genrefine.methods.base import FixedPolicy, Method, MethodOptions
from genrefine.methods.parts.heads import HeadsNet, static_tree
from genrefine.methods.vadusa import SPARSE_NODES, SPARSE_WIDTH, VadusaDrafter, sparse_tree
from genrefine.models.guided import GuidedModel
from genrefine.models.runtime import NativeModel
from genrefine.registry import METHODS, build_method, is_lossless
from genrefine.sampling import logits_to_probs
from genrefine.types import Draft, SamplingParams
from genrefine.verify.greedy import verify_greedy_argmax
from genrefine.verify.groups import (
    TokenGroups,
    balanced_partition,
    emitted_distribution,
    group_mass,
    grouped_rows,
    verify_grouped,
)
from genrefine.verify.tolerance import tolerated, verify_tolerance

GREEDY = SamplingParams()
CODES = 32  # the speech-like model's output vocabulary: codes 0..30 and EOS 31


@functools.lru_cache(maxsize=None)
def native(vocab: int = 97) -> NativeModel:
    return NativeModel.from_hf(tiny_hf_model("llama", vocab=vocab))


def speech_model() -> GuidedModel:
    """As the speech contract builds it: the output vocabulary cut to the codes (and EOS),
    ``token_latents`` their input embeddings, no guidance."""
    base = native()
    return GuidedModel(base, n_codes=CODES, class_offset=CODES, n_classes=1, null_token=CODES + 1,
                       scale=1.0, latents=base.embed[:CODES].detach().float().clone())


def generate(m, method, prompt, n, params, stats=None):
    if isinstance(method, str):
        method = build_method(method, m)
    return [t for c in Engine(m, method).generate(prompt, n, params, stats=stats) for t in c]


# ----------------------------------------------------------------------------- registry
def test_both_are_listed_as_lossy() -> None:
    assert list(METHODS).index("pcg") < list(METHODS).index("vadusa")
    for name in ("pcg", "vadusa"):
        assert not METHODS[name].lossless and not is_lossless(name)
    assert METHODS["pcg"].needs_latents and "exact on groups" in METHODS["pcg"].summary
    assert METHODS["vadusa"].drafter_kind == "heads" and METHODS["vadusa"].native_only


def test_methods_command_shows_them(capsys) -> None:
    assert main(["methods"]) == 0
    rows = {ln.split()[0]: ln.split()[1] for ln in capsys.readouterr().out.splitlines()}
    assert rows["pcg"] == "lossy" and rows["vadusa"] == "lossy"


def test_pcg_refuses_a_model_without_latents() -> None:
    with pytest.raises(ConfigError, match="method pcg needs .*token_latents"):
        build_method("pcg", native())


def test_tolerance_is_validated_and_reaches_the_options() -> None:
    with pytest.raises(ConfigError, match="tolerance"):
        MethodOptions(tolerance=0)
    import argparse

    from genrefine.cli.options import add_generation_options, method_options

    p = argparse.ArgumentParser()
    add_generation_options(p)
    assert method_options(p.parse_args(["--tolerance", "5"])).tolerance == 5
    assert method_options(p.parse_args([])).tolerance == MethodOptions().tolerance


# ----------------------------------------------------------------------------- groups: exactness
GROUPS = torch.tensor([0, 0, 1, 1, 1, 2])  # V = 6, three groups (one a singleton)


def rows(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary p, q rows on 6 tokens: dense, sparse (zeros), point masses, equal rows."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 6, generator=g) ** 3
    q = torch.rand(n, 6, generator=g) ** 3
    p[::4] *= (torch.rand(n, 6, generator=g)[::4] > 0.5)  # holes in p
    q[1::4] *= (torch.rand(n, 6, generator=g)[1::4] > 0.5)  # holes in q
    p[:, 0] += 1e-3  # no all-zero row
    q[:, 5] += 1e-3
    q[2] = torch.nn.functional.one_hot(torch.tensor(3), 6).float()  # a point-mass draft
    q[3] = p[3]  # q = p
    return p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)


def group_error(accept: torch.Tensor, residual: torch.Tensor, p, q) -> float:
    """Largest gap between the emitted group law (exact, enumerated) and the target's."""
    e = emitted_distribution(accept, residual, q)
    assert torch.allclose(e.sum(1), torch.ones(e.shape[0]), atol=1e-5)
    return float((group_mass(e, GROUPS, 3) - group_mass(p, GROUPS, 3)).abs().max())


@pytest.mark.parametrize("seed", range(4))
def test_emitted_group_has_exactly_the_targets_group_law(seed: int) -> None:
    p, q = rows(seed)
    accept, residual = grouped_rows(p, q, GROUPS)
    assert group_error(accept, residual, p, q) < 1e-6


def _token_residual(p, q):
    rest = (p - q).clamp_min(0)
    z = rest.sum(1, keepdim=True)
    return torch.where(z > 0, rest / z.clamp_min(1e-30), p)


def _token_ratio(p, q):
    return torch.where(q > 0, (p / q.clamp_min(1e-30)).clamp(max=1), 0.0)


@pytest.mark.parametrize("bug", ["token residual", "token ratio", "group from p"])
def test_planted_bugs_are_detected_by_the_group_check(bug: str) -> None:
    """The exactness check can fail: each planted bug moves the emitted group law."""
    p, q = rows(0)
    accept, residual = grouped_rows(p, q, GROUPS)
    if bug == "token residual":  # rejection's token from norm(max(0, p - q)) over tokens
        residual = _token_residual(p, q)
    elif bug == "token ratio":  # accept with min(1, p(x)/q(x)), residual still over groups
        accept = _token_ratio(p, q)
    else:  # rejection's token drawn from p itself, not the group residual
        residual = p
    assert group_error(accept, residual, p, q) > 1e-2


def test_token_law_is_not_the_targets_so_pcg_is_lossy() -> None:
    p, q = rows(1)
    e = emitted_distribution(*grouped_rows(p, q, GROUPS), q)
    tv = 0.5 * (e - p).abs().sum(1)  # [n]
    assert float(tv.max()) > 0.05  # the token inside an accepted group follows q, not p
    # singleton groups: exact speculative sampling, the token law is the target's
    single = torch.arange(6)
    a, r = grouped_rows(p, q, single)
    kept = q * a
    e1 = kept + (1 - kept.sum(1, keepdim=True)) * r
    assert torch.allclose(e1, p, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_acceptance_is_at_least_exact_acceptance(seed: int) -> None:
    p, q = rows(seed)
    group = (q * grouped_rows(p, q, GROUPS)[0]).sum(1)  # [n]: a row's acceptance
    exact = torch.minimum(p, q).sum(1)
    assert bool((group >= exact - 1e-6).all()) and bool((group > exact + 1e-3).any())


def test_verify_grouped_follows_the_rule() -> None:
    """Seeded Monte Carlo through the verifier itself: a drafted x ~ q, then verify; the first
    emitted token's frequencies match the enumerated law (and hence the group marginal)."""
    p, q = rows(2, n=4)
    p_row, q_row = p[1], q[1]
    want = emitted_distribution(*grouped_rows(p_row[None], q_row[None], GROUPS), q_row[None])[0]
    g = torch.Generator().manual_seed(0)
    n, counts, accepted = 4000, torch.zeros(6), 0
    target = torch.stack([p_row, p_row])  # [n + 1, V] for a 1-node chain
    for _ in range(n):
        x = torch.multinomial(q_row, 1, generator=g)
        res = verify_grouped(Draft.chain(x, q_row[None]), target, g, GROUPS)
        counts[int(res.tokens[0])] += 1
        accepted += res.num_accepted
    freq = counts / n
    assert 0.5 * float((freq - want).abs().sum()) < 0.04
    gap = group_mass(freq[None], GROUPS, 3) - group_mass(p_row[None], GROUPS, 3)
    assert float(gap.abs().max()) < 0.03
    assert 0 < accepted < n


def test_verify_grouped_edge_cases() -> None:
    p = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 3)
    g = torch.Generator().manual_seed(0)
    # a drafted token of the right group, though p(x) = 0: accepted (group-level)
    q = torch.tensor([[0.0, 1.0, 0, 0, 0, 0]] * 2)
    res = verify_grouped(Draft.chain([1, 1], q), p, g, GROUPS)
    assert res.num_accepted == 2 and res.tokens.tolist() == [1, 1, 0]
    # a token of a group the target gives no mass: always rejected, bonus in the target's group
    for _ in range(20):
        res = verify_grouped(Draft.chain([4]), p[:2], g, GROUPS)
        assert res.num_accepted == 0 and int(res.tokens[0]) == 0
    with pytest.raises(ConfigError, match="chain"):
        verify_grouped(Draft(torch.tensor([0, 1]), torch.tensor([-1, -1])), p, g, GROUPS)


def test_partition_is_balanced_deterministic_and_local() -> None:
    lat = torch.randn(101, 5, generator=torch.Generator().manual_seed(0))
    groups = balanced_partition(lat, 8)
    assert groups.shape == (101,) and torch.equal(groups, balanced_partition(lat.clone(), 8))
    sizes = torch.bincount(groups)
    assert int(sizes.sum()) == 101 and int(sizes.max()) <= 8 and int((sizes < 8).sum()) <= 7
    assert int(groups.max()) + 1 == len(sizes) == TokenGroups(lat, 8).num_groups
    # members of a group are closer to each other than random pairs
    d = torch.cdist(lat, lat)
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    assert float(d[same].mean()) < 0.8 * float(d[~same].mean())
    assert len(set(balanced_partition(lat, 1).tolist())) == 101  # singletons


# ----------------------------------------------------------------------------- pcg end to end
@pytest.mark.parametrize("draft_len", [None, 3])
@pytest.mark.parametrize("prompt", [[CODES + 5, 40, 41], [CODES + 10]])
def test_pcg_greedy_equals_ar(prompt, draft_len) -> None:
    m = speech_model()
    ref = generate(m, "ar", prompt, 40, GREEDY)
    stats = Stats("pcg")
    got = generate(m, build_method("pcg", m, MethodOptions(draft_len=draft_len)), prompt, 40,
                   GREEDY, stats)
    assert got == ref and stats.drafted > 0


def test_pcg_samples_with_its_group_rule_repeatably(monkeypatch) -> None:
    import genrefine.verify.groups as groups_mod

    m = speech_model()
    calls = []
    real = groups_mod.verify_grouped
    monkeypatch.setattr(groups_mod, "verify_grouped", lambda *a: calls.append(1) or real(*a))
    params = SamplingParams(temperature=1.0, seed=3)
    stats = Stats("pcg")
    opts = MethodOptions(group_size=4)
    out = generate(m, build_method("pcg", m, opts), [CODES + 3], 60, params, stats)
    assert len(out) == 60 and all(0 <= t < CODES for t in out)
    assert calls and stats.accepted > 0
    assert out == generate(m, build_method("pcg", m, opts), [CODES + 3], 60, params)
    calls.clear()
    generate(m, "pcg", [CODES + 3], 20, GREEDY)
    assert not calls  # greedy: argmax verification


# ----------------------------------------------------------------------------- vadusa
def test_sparse_tree_is_a_small_tree() -> None:
    acc = torch.tensor([[0.5, 0.3, 0.2, 0.1, 0.05]] * 4)
    full = static_tree(acc, 60)
    tree = sparse_tree(full)
    assert 0 < len(tree) <= SPARSE_NODES and all(max(p) < SPARSE_WIDTH for p in tree)
    seen = {()}
    for p in tree:
        assert p[:-1] in seen  # parents first
        seen.add(p)
    assert any(max(p) >= SPARSE_WIDTH for p in full[: len(tree) + 5])  # it did cut


def random_tree_draft(g: torch.Generator, n: int, vocab: int) -> Draft:
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, n)]
    return Draft(torch.randint(0, vocab, (n,), generator=g), torch.tensor(parents))


@pytest.mark.parametrize("seed", range(6))
def test_tolerance_one_accepts_exactly_the_greedy_path(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    V, n = 5, 7
    logits = torch.randn(n + 1, V, generator=g)
    draft = random_tree_draft(g, n, V)
    if seed % 2:  # make some nodes right, so paths are accepted
        info_rows = draft.parents + 1
        right = torch.rand(n, generator=g) < 0.7
        draft = Draft(logits.argmax(1)[info_rows].where(right, draft.tokens), draft.parents)
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0))
    got = verify_tolerance(draft, probs, g, k=1)
    want = verify_greedy_argmax(draft, logits.argmax(1))
    assert torch.equal(got.path, want.path)
    wider = verify_tolerance(draft, probs, g, k=3)
    assert wider.num_accepted >= got.num_accepted


def test_tolerated_respects_removed_tokens() -> None:
    """A token that top-k sampling removed (p = 0) is never tolerated, however large k."""
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    ok = tolerated(Draft.chain([2]), torch.cat([probs, probs]), 4)
    assert not bool(ok[0])
    assert bool(tolerated(Draft.chain([1]), torch.cat([probs, probs]), 2)[0])
    assert not bool(tolerated(Draft.chain([1]), torch.cat([probs, probs]), 1)[0])


def random_heads_method(m, k: int, verify=None) -> Method:
    torch.manual_seed(1)
    net = HeadsNet(m.hidden_size, 3)
    net.weight.data.normal_(0, 0.3)
    tree = sparse_tree(static_tree(torch.tensor([[0.6, 0.3, 0.1]] * 3), 40))
    d = VadusaDrafter(m, net, torch.arange(m.vocab_size), tree=tree, topk=SPARSE_WIDTH)
    return Method("vadusa", [d], FixedPolicy(d, len(tree)), len(tree),
                  verify_sampled=verify or partial(verify_tolerance, k=k))


def accepted_outside_top_k(m, method, prompt, n, params, k: int) -> tuple[int, int, int]:
    """Run ``method``, recording which emitted tokens were accepted drafts; then check each of
    those against the top-k of a fresh forward over the whole output. Returns (violations,
    accepted drafts, accepted drafts that were not the argmax)."""
    record = []
    verify = method.verify_sampled

    def spy(draft, probs, gen):
        res = verify(draft, probs, gen)
        record.extend([True] * res.num_accepted + [False])
        return res

    method.verify_sampled = spy
    out = generate(m, method, prompt, n, params)
    seq = torch.tensor(prompt + out)
    probs = logits_to_probs(m.forward(seq, m.new_cache(len(seq) + 1)).logits, params)  # [L, V]
    bad = accepted = not_argmax = 0
    for i, was_draft in enumerate(record[: len(out) - 1]):  # out[0] came from the prefill
        if not was_draft:
            continue
        pos = len(prompt) + 1 + i  # the token's position in seq
        row = probs[pos - 1]
        tok = int(seq[pos])
        accepted += 1
        bad += int(int((row > row[tok]).sum()) >= k or float(row[tok]) == 0.0)
        not_argmax += int(tok != int(row.argmax()))
    return bad, accepted, not_argmax


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=0),
                                    SamplingParams(temperature=0.9, top_k=6, seed=1)])
def test_every_accepted_draft_is_in_the_targets_top_k(params) -> None:
    m = native()
    bad, accepted, not_argmax = accepted_outside_top_k(
        m, random_heads_method(m, 3), [5, 9, 11, 5, 9], 80, params, k=3)
    assert bad == 0 and accepted > 0 and not_argmax > 0  # lossy: not only the argmax passed


def test_planted_bug_accepting_outside_the_top_k_is_caught() -> None:
    m = native()
    buggy = partial(verify_tolerance, k=20)  # accepts ranks up to 20 though k = 3 is promised
    bad, accepted, _ = accepted_outside_top_k(
        m, random_heads_method(m, 3, verify=buggy), [5, 9, 11, 5, 9], 80,
        SamplingParams(temperature=1.0, seed=0), k=3)
    assert bad > 0


@pytest.mark.parametrize("prompt", [[5, 9, 11, 5, 9], [7]])
def test_vadusa_greedy_equals_ar(prompt) -> None:
    m = native()
    ref = generate(m, "ar", prompt, 40, GREEDY)
    stats = Stats("vadusa")
    assert generate(m, random_heads_method(m, 3), prompt, 40, GREEDY, stats) == ref
    assert stats.drafted > 0
    opts = MethodOptions(drafter=tiny_drafter(m, "heads"), tolerance=4)
    trained = build_method("vadusa", m, opts)
    assert trained.name == "vadusa" and trained.max_budget <= SPARSE_NODES
    assert generate(m, trained, prompt, 40, GREEDY) == ref
