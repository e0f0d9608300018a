"""Image methods and classifier-free guidance: ``GuidedModel``, ``sjd``, ``mc-sjd``, ``lantern``,
``gsd`` and relaxed acceptance (issue 19's correctness section).

A tiny random native Llama stands in for the image transformer: ids ``0 .. C-1`` are codes,
``C + c`` class ``c``, ``C + K`` the null class; a prompt is one class token.

* greedy: every image method (lossy ones included: their relaxation applies to sampling only) is
  token-identical to ``ar``, with and without guidance;
* exact distribution: ``sjd`` and ``mc-sjd`` run through the engine on 4 codes, every random
  outcome enumerated (as in ``test_engine_distribution.py``), and the joint of the first tokens
  equals the guided, processed target's joint computed by enumeration from the base model's own
  rows; planted bugs fail the same check;
* relaxed acceptance: the emitted distribution of every row is within ``delta`` of ``p`` in total
  variation, exactly and by Monte Carlo; without the budget's scaling it is not.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict

import pytest
import torch
from test_engine_distribution import Choices, tv
from tiny import tiny_hf_model

import genrefine.models.guided as guided_mod
import genrefine.sampling as sampling_mod
import genrefine.verify.relaxed as relaxed_mod
import genrefine.verify.sampling as vs
from genrefine.engine import Engine, Stats
from genrefine.errors import ConfigError
from genrefine.methods.base import MethodOptions
from genrefine.methods.parts import jacobi_sampling as js
from genrefine.models.batched import BatchItem
from genrefine.models.guided import GuidedModel
from genrefine.models.runtime import NativeModel
from genrefine.registry import METHODS, build_method, is_lossless
from genrefine.sampling import logits_to_probs
from genrefine.types import Draft, ModelOutput, SamplingParams
from genrefine.verify.relaxed import (
    LatentGroups,
    LatentNeighbours,
    emitted_distribution,
    verify_relaxed,
)

IMAGE_METHODS = ["sjd", "mc-sjd", "lantern", "gsd"]
C, K = 16, 4  # codes, classes (greedy tests)


@functools.lru_cache(maxsize=None)
def native(vocab: int) -> NativeModel:
    return NativeModel.from_hf(tiny_hf_model("llama", vocab=vocab))


def latents(n: int, seed: int = 0, dim: int = 3) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def image_model(scale: float, codes: int = C, classes: int = K, base=None) -> GuidedModel:
    base = base if base is not None else native(codes + classes + 1)
    return GuidedModel(base, n_codes=codes, class_offset=codes, n_classes=classes,
                       null_token=codes + classes, scale=scale, latents=latents(codes))


def generate(m, method, prompt, n, params, stats=None):
    if isinstance(method, str):
        method = build_method(method, m)
    return [t for c in Engine(m, method).generate(prompt, n, params, stats=stats) for t in c]


# ----------------------------------------------------------------------------- registry
def test_registry_lists_the_image_methods_with_their_losslessness() -> None:
    assert [n for n in METHODS if n in IMAGE_METHODS] == IMAGE_METHODS
    assert METHODS["sjd"].lossless and METHODS["mc-sjd"].lossless
    assert is_lossless("sjd") and is_lossless("mc-sjd")
    assert not METHODS["lantern"].lossless and not METHODS["gsd"].lossless
    assert not is_lossless("lantern") and not is_lossless("gsd")
    assert METHODS["lantern"].needs_latents and METHODS["gsd"].needs_latents
    assert not METHODS["sjd"].needs_latents and not METHODS["mc-sjd"].needs_latents


@pytest.mark.parametrize("name", ["lantern", "gsd"])
def test_latent_methods_refuse_a_model_without_a_codebook(name: str) -> None:
    with pytest.raises(ConfigError, match="image model with a VQ codebook"):
        build_method(name, native(C + K + 1))


@pytest.mark.parametrize(
    "bad", [dict(relax_delta=1.5), dict(relax_delta=-0.1), dict(relax_k=0), dict(group_size=0),
            dict(group_similarity=1.5)],
)
def test_relaxation_options_are_validated(bad) -> None:
    with pytest.raises(ConfigError):
        MethodOptions(**bad)


# ----------------------------------------------------------------------------- GuidedModel
def test_guided_logits_are_u_plus_s_times_c_minus_u() -> None:
    base = native(C + K + 1)
    m = image_model(3.0)
    tokens = torch.tensor([C + 2, 5, 7, 1, 15])
    got = m.forward(tokens, m.new_cache(16)).logits  # [5, C]
    c = base.forward(tokens, base.new_cache(16)).logits
    null = torch.tensor([C + K, 5, 7, 1, 15])
    u = base.forward(null, base.new_cache(16)).logits
    assert got.shape == (5, C) and got.dtype == torch.float32
    assert torch.equal(got, (u + 3.0 * (c - u))[:, :C])
    assert not torch.equal(got, c[:, :C])
    assert m.vocab_size == C and m.token_latents.shape == (C, 3)


def _guided(base, scale: float) -> GuidedModel:
    return GuidedModel(base, n_codes=C, class_offset=C, n_classes=K, null_token=C + K, scale=scale)


def test_guided_rows_run_in_one_batched_forward(monkeypatch) -> None:
    """Under guidance the conditional and unconditional rows go through one ``forward_batch`` of
    the base (each weight read once for both), with the logits rows cut afterwards; the guided
    logits are ``u + s * (c - u)`` of that forward's rows."""
    base = native(C + K + 1)
    m = _guided(base, 3.0)
    calls = []
    real = base.forward_batch
    monkeypatch.setattr(base, "forward_batch", lambda items: calls.append(items) or real(items))
    monkeypatch.setattr(base, "forward", lambda *a, **kw: pytest.fail("a separate base forward ran"))
    tokens = torch.tensor([C + 2, 5, 7, 1, 15])
    null = torch.tensor([C + K, 5, 7, 1, 15])
    got = m.forward(tokens, m.new_cache(16), logits_rows=torch.tensor([1, 4])).logits
    assert len(calls) == 1 and [it.tokens.tolist() for it in calls[0]] == [tokens.tolist(), null.tolist()]
    c, u = real([BatchItem(tokens, base.new_cache(16)), BatchItem(null, base.new_cache(16))])
    assert torch.equal(got, (u + 3.0 * (c - u))[[1, 4], :C])
    assert m.forward(torch.tensor([C + 1]), m.new_cache(4), logits_rows=torch.tensor([], dtype=torch.long)).logits is None


def test_guided_rows_of_an_exact_base_equal_separate_forwards(monkeypatch, tmp_path) -> None:
    """On the integer kernels (bitwise-exact rows) the batched halves are bit for bit the two
    separate forwards', for a chain, a tree and a one-token step, so greedy lossless methods
    still give ``ar``'s codes there."""
    from tiny import quantized_native

    from genrefine.kernels import load_extension
    from genrefine.verify import build_tree

    if not load_extension():
        pytest.skip("no C++ extension on this machine: quantized weights run layer by layer")
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    base = quantized_native(tiny_hf_model("llama", vocab=C + K + 1), formats=("q8_0",))
    assert base.bitwise_exact
    m = _guided(base, 2.5)
    calls = []
    real = base.forward_batch
    monkeypatch.setattr(base, "forward_batch", lambda items: calls.append(1) or real(items))
    cache, cond, uncond = m.new_cache(32), base.new_cache(32), base.new_cache(32)
    tree = build_tree(torch.tensor([-1, -1, 1]))
    steps = [(torch.tensor([C + 1, 4, 9, 2]), None, None), (torch.tensor([6]), None, None),
             (torch.tensor([6, 1, 8, 0]), "tree", tree.mask_with_root)]
    for tokens, kind, mask in steps:
        pos = None
        if kind == "tree":
            pos = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + tree.depth])
        got = m.forward(tokens, cache, positions=pos, tree_mask=mask).logits
        c = base.forward(tokens, cond, positions=pos, tree_mask=mask).logits
        u = base.forward(m.unconditional(tokens), uncond, positions=pos, tree_mask=mask).logits
        assert torch.equal(got, (u + 2.5 * (c - u))[:, :C])
    assert len(calls) == len(steps)
    ref = generate(m, "ar", [C + 2], 24, SamplingParams())
    assert generate(m, "sjd", [C + 2], 24, SamplingParams()) == ref


def test_scale_one_runs_no_unconditional_forward(monkeypatch) -> None:
    base = native(C + K + 1)
    m = image_model(1.0)
    calls = []
    real = base.forward
    monkeypatch.setattr(base, "forward", lambda tokens, cache, **kw: calls.append(tokens) or real(tokens, cache, **kw))
    cache = m.new_cache(16)
    assert cache.uncond is None
    tokens = torch.tensor([C + 1, 3, 4])
    got = m.forward(tokens, cache).logits
    assert len(calls) == 1 and torch.equal(calls[0], tokens)
    assert torch.equal(got, real(tokens, base.new_cache(16)).logits[:, :C])
    m.scale = 2.0  # changed with a cache of the unguided kind: refused, not silently unguided
    with pytest.raises(ConfigError, match="guidance scale was changed"):
        m.forward(torch.tensor([3]), cache)


def test_rollback_and_keep_move_both_caches() -> None:
    """A chain, a rollback, a tree with keep: the next row equals a fresh forward of the kept
    sequence, and the cond and uncond halves stay the same length."""
    m = image_model(3.0)
    cache = m.new_cache(32)
    m.forward(torch.tensor([C + 3, 4, 9, 2]), cache)
    cache.rollback(2)  # keeps [C+3, 4]
    assert cache.cond.length == cache.uncond.length == 2
    # a tree of 3 nodes after the root 6: 6 -> {1, 8}, 8 -> 0
    parents = torch.tensor([-1, -1, 1])
    from genrefine.verify import build_tree

    tree = build_tree(parents)
    pos = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + tree.depth])
    m.forward(torch.tensor([6, 1, 8, 0]), cache, positions=pos, tree_mask=tree.mask_with_root)
    cache.keep(2, torch.tensor([0, 2, 3]))  # root 6, node 8, node 0
    assert cache.cond.length == cache.uncond.length == cache.length == 5
    got = m.forward(torch.tensor([11]), cache).logits
    want = m.forward(torch.tensor([C + 3, 4, 6, 8, 0, 11]), m.new_cache(32)).logits[-1:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- greedy = ar
@pytest.mark.parametrize("draft_len", [None, 4])
@pytest.mark.parametrize("prompt,n", [([C + 0], 48), ([C + 2, 3, 5], 30), ([C + 3], 64)])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["no-cfg", "cfg3"])
@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_greedy_image_methods_equal_ar(name, scale, prompt, n, draft_len) -> None:
    m = image_model(scale)
    greedy = SamplingParams()
    ref = generate(m, "ar", prompt, n, greedy)
    method = build_method(name, m, MethodOptions(draft_len=draft_len))
    stats = Stats(name)
    assert generate(m, method, prompt, n, greedy, stats) == ref
    assert len(ref) == n and stats.drafted > 0 and method.max_budget == (draft_len or js.DEFAULT_WINDOW)


@pytest.mark.parametrize("name", ["lantern", "gsd"])
def test_latent_methods_sample_to_the_end_of_the_context(name: str) -> None:
    """(The engine's huge-budget test for methods that need an image model.)"""
    m = image_model(3.0)
    params = SamplingParams(temperature=1.0, top_k=8, seed=0)
    engine = Engine(m, build_method(name, m))
    out = [t for c in engine.generate([C + 1], 10**12, params) for t in c]
    assert engine.finish_reason == "length" and len(out) == m.max_context
    assert all(0 <= t < C for t in out)
    assert out == [t for c in Engine(m, build_method(name, m)).generate([C + 1], 10**12, params)
                   for t in c]  # seeded: repeats


# ----------------------------------------------------------------------------- exact distribution
CODES, CLASSES = 4, 2  # the distribution tests' image model: 4 codes, 2 classes, the null id
PROMPT = [CODES + 1]  # class 1
LENGTH = 4  # tokens compared: the prefill's, then what up to three verifications emit
DRAFT_LEN = 2
SCALE = 2.5
PARAMS = {
    "t1_k3": SamplingParams(temperature=1.0, top_k=3, seed=0),
    "t0.8_p0.9": SamplingParams(temperature=0.8, top_p=0.9, seed=0),
}


@functools.lru_cache(maxsize=None)
def base_row(prefix: tuple[int, ...]) -> torch.Tensor:
    """The tiny base model's logits after ``prefix`` ([CODES + CLASSES + 1]), one fresh forward."""
    b = native(CODES + CLASSES + 1)
    return b.forward(torch.tensor(prefix), b.new_cache(16)).logits[-1]


class TokenCache:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.tokens = capacity, []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.length
        del self.tokens[self.length - n :]


class PrefixModel:
    """The base model of the distribution tests: each row is :func:`base_row` of the tokens up to
    it (the tiny native model, memoised per prefix so that enumerating runs stays cheap)."""

    vocab_size = CODES + CLASSES + 1
    max_context, num_layers, hidden_size = 64, 1, 4
    device, dtype = torch.device("cpu"), torch.float32
    supports_trees = bitwise_exact = False

    def new_cache(self, capacity=None) -> TokenCache:
        return TokenCache(capacity or self.max_context)

    def forward(self, tokens, cache, positions=None, tree_mask=None, logits_rows=None,
                hidden_layers=(), layers=None, vocab_subset=None):
        assert tree_mask is None
        start = cache.length
        cache.tokens += tokens.tolist()
        assert cache.length <= cache.capacity
        rows = range(tokens.shape[0]) if logits_rows is None else logits_rows.tolist()
        logits = [base_row(tuple(cache.tokens[: start + r + 1])) for r in rows]
        return ModelOutput(logits=torch.stack(logits) if logits else None, hidden={})


def small_model(scale: float) -> GuidedModel:
    return image_model(scale, CODES, CLASSES, base=PrefixModel())


def target_joint(params: SamplingParams, scale: float, length: int = LENGTH) -> dict:
    """The guided, processed target's joint of the first ``length`` codes after PROMPT, from the
    base rows directly: ``u + scale * (c - u)`` with u the row after the null-class prompt."""
    null = [CODES + CLASSES]
    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, w in out.items():
            c = base_row(tuple(PROMPT) + seq)[:CODES]
            u = base_row(tuple(null) + seq)[:CODES]
            p = logits_to_probs(u + scale * (c - u), params).double()
            for x in range(CODES):
                if p[x] > 0:
                    nxt[seq + (x,)] = w * float(p[x])
        out = nxt
    return out


def enumerate_runs(monkeypatch, generate_fn) -> dict[tuple[int, ...], float]:
    """The exact distribution of ``generate_fn()``'s output: every draw of
    :func:`genrefine.sampling.sample` (each row of a multi-row draw) and every acceptance uniform
    of a chain verification is replayed over all its outcomes, each weighted by its probability
    (the harness of ``test_engine_distribution.py``, for multi-row draws and chains)."""
    state: dict = {}

    def sample(probs, generator):
        rows = probs.double().reshape(-1, probs.shape[-1])
        picks = []
        for row in rows:
            row = row / row.sum()
            picks.append(state["choices"].choose(row.tolist()))
        return torch.tensor(picks).reshape(probs.shape[:-1])

    def plan(*args, **kwargs):
        out = real_plan(*args, **kwargs)
        state["accept"] = out.accept_prob
        return out

    class Uniforms:
        """torch for the verifier, but rand: chain outcomes 'pass' (0.0) or 'fail' (1.0),
        enumerated up to the first failure (what comes after it cannot matter on a chain)."""

        def __getattr__(self, name):
            return getattr(torch, name)

        def rand(self, n, generator=None, device=None):
            accept = state["accept"].double().tolist()
            out, failed = [], False
            for a in accept[:n]:
                fail = 1 if failed else state["choices"].choose([a, 1.0 - a])
                failed = failed or fail == 1
                out.append(float(fail))
            return torch.tensor(out, dtype=torch.float32)

    real_plan = vs._plan
    for mod in (sampling_mod, vs, js, relaxed_mod):
        monkeypatch.setattr(mod, "sample", sample)
    monkeypatch.setattr(vs, "_plan", plan)
    monkeypatch.setattr(vs, "torch", Uniforms())
    out: dict[tuple[int, ...], float] = defaultdict(float)
    todo: list[list[int]] = [[]]
    runs = 0
    while todo:
        state["choices"] = choices = Choices(todo.pop(), todo)
        tokens = generate_fn()
        out[tuple(tokens)] += choices.weight
        runs += 1
    assert runs < 20_000, runs  # keeps the test fast; a change that explodes it should show
    return dict(out)


def sampled_joint(monkeypatch, name: str, params: SamplingParams, scale: float) -> dict:
    m = small_model(scale)
    method = build_method(name, m, MethodOptions(draft_len=DRAFT_LEN))
    return enumerate_runs(monkeypatch, lambda: generate(m, method, PROMPT, LENGTH, params))


def _steps_reuse_rows(monkeypatch, name: str) -> None:
    """What makes the check mean something: some runs verify a window refilled from the last
    forward (and for mc-sjd, one holding a coupled old token)."""
    seen = {"refilled": 0, "coupled": 0}
    real = js.JacobiSamplingDrafter.propose

    def propose(self, ctx, budget):
        if self.start == int(ctx.tokens.shape[0]) and self.q is not None:
            seen["refilled"] += 1
            seen["coupled"] += int(self.old is not None and bool((self.old[:budget] >= 0).any()))
        return real(self, ctx, budget)

    monkeypatch.setattr(js.JacobiSamplingDrafter, "propose", propose)
    sampled_joint(monkeypatch, name, PARAMS["t1_k3"], SCALE)
    monkeypatch.undo()
    assert seen["refilled"] > 0
    if name == "mc-sjd":
        assert seen["coupled"] > 0


@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("scale", [1.0, SCALE], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("name", ["sjd", "mc-sjd"])
def test_sampled_output_is_the_guided_target(monkeypatch, name, scale, pname) -> None:
    params = PARAMS[pname]
    got = sampled_joint(monkeypatch, name, params, scale)
    want = target_joint(params, scale)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    assert set(got) <= set(want)
    assert tv(got, want) < 1e-5


@pytest.mark.parametrize("name", ["sjd", "mc-sjd"])
def test_the_distribution_check_sees_reused_rows(monkeypatch, name) -> None:
    _steps_reuse_rows(monkeypatch, name)


def _report_uniform_q(real):
    """Bug: tokens drawn from the window's q, but the draft reports a uniform q."""
    def propose(self, ctx, budget):
        d = real(self, ctx, budget)
        if d.probs is None:
            return d
        return Draft.chain(d.tokens, torch.full_like(d.probs, 1.0 / d.probs.shape[1]))
    return propose


def _report_q_old(real):
    """Bug (MC-SJD): a coupled token verified against its old q instead of the new one."""
    def propose(self, ctx, budget):
        old, q_old = self.old, self.q_old
        d = real(self, ctx, budget)
        if old is None or d.probs is None:
            return d
        k = len(d)
        probs = torch.where((old[:k] >= 0)[:, None], q_old[:k], d.probs)
        return Draft.chain(d.tokens, probs)
    return propose


def _keep_old_always(q_new, old, q_old):
    """Bug (MC-SJD): the old token is always kept (no coupling: drawn from q_old, reported q_new)."""
    hot = torch.zeros_like(q_new).scatter_(1, old.clamp_min(0)[:, None], 1.0)
    return torch.where((old >= 0)[:, None], hot, q_new)


BUGS = {
    "sjd-reports-another-q": ("sjd", 1.0, lambda mp: mp.setattr(
        js.JacobiSamplingDrafter, "propose", _report_uniform_q(js.JacobiSamplingDrafter.propose))),
    "sjd-no-residual": ("sjd", 1.0, lambda mp: mp.setattr(vs, "_residual", lambda p, q: p)),
    "mc-sjd-verified-against-q-old": ("mc-sjd", 1.0, lambda mp: mp.setattr(
        js.JacobiSamplingDrafter, "propose", _report_q_old(js.JacobiSamplingDrafter.propose))),
    "mc-sjd-keeps-old-tokens": ("mc-sjd", 1.0, lambda mp: mp.setattr(
        js, "coupled_rows", _keep_old_always)),
    "mc-sjd-no-residual-cfg": ("mc-sjd", SCALE, lambda mp: mp.setattr(
        vs, "_residual", lambda p, q: p)),
    "cfg-uncond-keeps-the-class": ("sjd", SCALE, lambda mp: mp.setattr(
        guided_mod.GuidedModel, "unconditional", lambda self, tokens: tokens)),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_the_distribution_check_fails_on_planted_bugs(monkeypatch, bug) -> None:
    name, scale, plant = BUGS[bug]
    params = PARAMS["t1_k3"]
    want = target_joint(params, scale)
    with pytest.MonkeyPatch.context() as mp:
        plant(mp)
        broken = sampled_joint(monkeypatch, name, params, scale)
        monkeypatch.undo()
    # the enumeration is exact: a correct run is within rounding (1e-5), a bug far outside
    assert tv(broken, want) > 1e-3
    assert tv(sampled_joint(monkeypatch, name, params, scale), want) < 1e-5  # and without it


# ----------------------------------------------------------------------------- relaxed acceptance
def _random_rows(n: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, V, generator=g) * 2.0).softmax(-1)
    q = (torch.randn(n, V, generator=g) * 2.0).softmax(-1)
    q[: n // 4] = p[: n // 4]  # some rows where draft and target agree
    return p, q


def _row_tv(e: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (e - p).abs().sum(-1)


RELAXATIONS = {
    "lantern": lambda lat, delta: LatentNeighbours(lat, k=6, delta=delta),
    "gsd": lambda lat, delta: LatentGroups(lat, group=6, threshold=0.2, delta=delta),
}


@pytest.mark.parametrize("delta", [0.05, 0.2])
@pytest.mark.parametrize("kind", list(RELAXATIONS))
def test_relaxed_acceptance_stays_within_delta_per_token(kind: str, delta: float) -> None:
    V = 48
    p, q = _random_rows(64, V, seed=1)
    relax = RELAXATIONS[kind](latents(V, seed=2), delta)
    a = relax.ratio(p, q)
    e = emitted_distribution(p, q, a, relax.delta)  # [64, V]
    assert torch.allclose(e.sum(-1), torch.ones(64), atol=1e-5) and (e >= 0).all()
    dist = _row_tv(e, p)
    assert (dist <= delta + 1e-5).all()
    assert dist.max() > delta / 4  # the relaxation does move mass (a bound that binds)
    exact_accept = torch.minimum(p, q).sum(-1)
    accept, _ = relaxed_mod.relaxed_rows(p, q, a, delta)
    assert ((q * accept).sum(-1) >= exact_accept - 1e-6).all()  # never below exact acceptance
    # the planted bug: no scaling by s = min(1, delta / D) (delta = 1 leaves s = 1 always)
    unscaled = _row_tv(emitted_distribution(p, q, a, 1.0), p)
    assert unscaled.max() > delta + 0.01


def test_relaxed_acceptance_with_the_exact_ratio_is_speculative_sampling() -> None:
    p, q = _random_rows(16, 10, seed=3)
    exact = torch.where(q > 0, (p / q).clamp(max=1.0), 0.0)
    e = emitted_distribution(p, q, exact, 0.3)
    torch.testing.assert_close(e, p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(RELAXATIONS))
def test_relaxed_verification_emits_the_budgeted_distribution(kind: str) -> None:
    """Monte Carlo through :func:`verify_relaxed`: a one-node chain drafted from q; the first
    emitted token's frequencies match :func:`emitted_distribution` (within sampling noise), which
    is within delta of p."""
    V, N, delta = 6, 6000, 0.15
    p, q = _random_rows(2, V, seed=5)
    p, q = p[1:2], q[1:2]
    relax = RELAXATIONS[kind](latents(V, seed=6), delta)
    want = emitted_distribution(p, q, relax.ratio(p, q), delta)[0]
    g = torch.Generator().manual_seed(0)
    target = torch.cat([p, p])  # [2, V]: rows after the root and after the node
    counts = torch.zeros(V)
    for x in torch.multinomial(q[0], N, replacement=True, generator=g).tolist():
        res = verify_relaxed(Draft.chain([x], q), target, g, relax)
        counts[int(res.tokens[0])] += 1
    freq = counts / N
    # per-token noise: 3 standard deviations of each frequency
    assert ((freq - want).abs() <= 3 * (want * (1 - want) / N).sqrt() + 1e-3).all()
    assert float(_row_tv(freq, p[0])) <= delta + 0.03
    assert float(_row_tv(want, p[0])) > 0.01  # lossy: differs from p


def test_relaxed_verification_refuses_trees() -> None:
    relax = LatentNeighbours(latents(5), 2, 0.1)
    d = Draft(torch.tensor([1, 2]), torch.tensor([-1, -1]), None)
    with pytest.raises(ConfigError, match="chain"):
        verify_relaxed(d, torch.full((3, 5), 0.2), torch.Generator(), relax)


def test_lantern_neighbours_are_nearest_first_within_the_budget() -> None:
    lat = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    relax = LatentNeighbours(lat, k=2, delta=0.25)
    assert relax.neighbours.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    p = torch.tensor([[0.1, 0.2, 0.1, 0.6]])
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    # token 0: + p(1) = 0.2 (then + p(2) would reach 0.3 > 0.25): p~ = 0.3, a = 0.3 / 0.7
    a = relax.ratio(p, q)
    assert a[0, 0] == pytest.approx(0.3 / 0.7)
    assert a[0, 3] == 1.0


def test_lantern_and_gsd_sampled_outputs_differ_from_sjd_but_stay_in_the_codes() -> None:
    """Same seed and drafter: the relaxed rule accepts more, so the lossy methods' samples
    differ from sjd's (a relaxation that did nothing would leave them equal)."""
    m = image_model(3.0)
    params = SamplingParams(temperature=1.0, top_k=8, seed=3)
    ref = generate(m, "sjd", [C + 1], 48, params)
    for name in ("lantern", "gsd"):
        opts = MethodOptions(relax_delta=0.5, relax_k=8, group_size=8, group_similarity=0.0)
        out = generate(m, build_method(name, m, opts), [C + 1], 48, params)
        assert len(out) == 48 and all(0 <= t < C for t in out)
        assert out != ref


def test_options_reach_the_relaxations() -> None:
    m = image_model(3.0)
    opts = MethodOptions(relax_delta=0.3, relax_k=3, group_size=5, group_similarity=0.1)
    lan = build_method("lantern", m, opts).relax
    gsd = build_method("gsd", m, opts).relax
    assert (lan.delta, lan.k) == (0.3, 3) and lan.neighbours.shape == (C, 3)
    assert (gsd.delta, gsd.group) == (0.3, 5)
    assert dataclasses.replace(opts, relax_delta=0.0).relax_delta == 0.0
