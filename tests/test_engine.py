"""The engine: every lossless method's greedy output equals plain greedy decoding, on the native
runtime (chains and trees) and through the transformers adapter (chains); seeded sampling
repeats; stats, EOS, token budgets and the end of the context.

``sps`` runs here with one draft model for every target (:func:`draft_model`); its own tests are
in ``test_draft_model.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import genrefine.engine as engine_mod
from genrefine.methods.base import Context, StepFeedback
from genrefine.methods.jacobi import JacobiDrafter
from genrefine.engine import Engine, Stats
from genrefine.errors import ConfigError
from genrefine.registry import METHODS, build_method, is_lossless
from genrefine.methods.base import FixedPolicy, Method, MethodOptions
from genrefine.models.hf import HFModel
from genrefine.models.runtime import EXACT_ROWS_MAX, NativeModel
from genrefine.diskcache import machine_key
from genrefine.costs import CostTable
from genrefine.types import Draft, SamplingParams
from genrefine.verify import verify_greedy_argmax
from tiny import ShallowModel, quantized_native, tiny_drafter, tiny_hf_model, without_exact_rows

LOSSLESS = [name for name, info in METHODS.items() if info.lossless]


def lossless_on(backend: str) -> list[str]:
    """The lossless methods a backend runs (layer-skipping ones need the native runtime)."""
    return [n for n in LOSSLESS if backend == "native" or not METHODS[n].native_only]


def speculative_on(backend: str) -> list[str]:
    """:func:`lossless_on` but plain decoding (``ar``, the reference)."""
    return [n for n in lossless_on(backend) if n != "ar"]

GREEDY = SamplingParams()
NEW = 40  # generations run well past the tiny models' sliding window (6)


@pytest.fixture(autouse=True, scope="module")
def _cost_cache(tmp_path_factory, _one_thread):
    """``auto`` measures a cost table once and caches it under $GENREFINE_CACHE.

    A table is saved up front under the key ``auto`` uses for the test models (measuring costs
    seconds on a busy machine; the key names the thread count, hence ``_one_thread`` first); if
    the key format changes, ``auto`` just measures.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENREFINE_CACHE", str(tmp_path_factory.mktemp("genrefine-cache")))
        key = f"model|{torch.float32}|{machine_key(torch.device('cpu'))}"
        CostTable.from_measurements({1: 1.0e-3, 8: 1.2e-3, 32: 2.0e-3}, key, 128).save()
        yield


@functools.lru_cache(maxsize=None)
def model(backend: str, family: str):
    """A tiny model: native (float32), quant (the native runtime on quantized weights of three
    formats, mixed inside the fused projections) or hf (the transformers adapter)."""
    hf = tiny_hf_model(family)
    if backend == "quant":
        return quantized_native(hf)
    return NativeModel.from_hf(hf) if backend == "native" else HFModel(hf)


@functools.lru_cache(maxsize=None)
def draft_model() -> ShallowModel:
    """The draft model of ``sps`` here: the first 2 of the tiny llama's 4 layers (its drafts are
    right now and then on the llama target, and mostly wrong on the other families)."""
    return ShallowModel(model("native", "llama"), 2)


def options_for(name: str, m, base: MethodOptions | None = None) -> MethodOptions | None:
    """``base`` plus what a method needs beyond its name (sps: a draft model; trained-drafter
    methods: a drafter for ``m``)."""
    info = METHODS[name]
    if info.drafter_kind is not None:
        return dataclasses.replace(base or MethodOptions(), drafter=tiny_drafter(m, info.drafter_kind))
    if not info.needs_draft_model:
        return base
    return dataclasses.replace(base or MethodOptions(), draft_model=draft_model())


def _random(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


PROMPTS = {
    "random": _random(12, 1),  # drafts are often wrong
    "repeated": _random(10, 2) * 4,  # prompt lookup accepts a lot
    "one_token": [7],
}


def run(m, method, prompt, max_new=NEW, params=GREEDY, eos=frozenset()):
    """Generate; returns (tokens, stats, finish_reason) after checking the stats' invariants."""
    if isinstance(method, str):
        method = build_method(method, m, options_for(method, m))
    stats = Stats(method.name)
    engine = Engine(m, method)
    chunks = list(engine.generate(prompt, max_new, params, eos_ids=eos, stats=stats))
    out = [t for c in chunks for t in c]
    assert all(c for c in chunks), "empty chunks are never yielded"
    assert stats.new_tokens == len(out) <= max_new
    assert stats.prompt_tokens == len(prompt)
    assert sum(stats.accepted_hist) == stats.steps
    assert sum(k * c for k, c in enumerate(stats.accepted_hist)) == stats.accepted
    assert stats.accepted <= stats.drafted
    # each step emits accepted + 1 tokens; the last step may be cut by EOS or max_new
    assert stats.decode_tokens <= stats.steps + stats.accepted
    assert engine.finish_reason in ("stop", "length")
    return out, stats, engine.finish_reason


@functools.lru_cache(maxsize=None)
def greedy_reference(backend: str, family: str, prompt: tuple[int, ...], max_new: int = NEW):
    out, stats, reason = run(model(backend, family), "ar", list(prompt), max_new)
    assert stats.tokens_per_step == 1.0 and stats.steps == len(out) - 1 and stats.drafted == 0
    assert reason == "length" and len(out) == max_new
    return out


# --------------------------------------------------------------------------- lossless greedy
def test_ar_is_plain_decoding() -> None:
    method = build_method("ar", model("native", "llama"))
    assert not method.drafters and method.decode is None and is_lossless("ar")


@pytest.mark.parametrize("name", speculative_on("native"))
def test_lossless_methods_draft_and_verify_exactly(name: str) -> None:
    """What makes the greedy tests below mean something: each lossless method but ar drafts,
    runs the engine's draft-and-verify loop and verifies with the exact rule."""
    m = model("native", "llama")
    method = build_method(name, m, options_for(name, m))
    assert method.drafters and method.decode is None and method.acceptance == "exact"


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize(
    "backend,family,name",
    [("native", f, n) for f in ("llama", "mistral", "qwen3", "gemma3_text", "gemma2")
     for n in speculative_on("native")]
    + [("quant", f, n) for f in ("llama", "gemma3_text") for n in speculative_on("native")]
    + [("hf", "llama", n) for n in speculative_on("hf")],
)
def test_greedy_output_equals_ar(backend: str, family: str, name: str, prompt: str) -> None:
    m = model(backend, family)
    ids = PROMPTS[prompt]
    ref = greedy_reference(backend, family, tuple(ids))
    out, stats, reason = run(m, name, ids)
    assert out == ref
    assert reason == "length" and stats.drafted > 0
    if name == "pld" and prompt == "repeated":
        assert stats.tokens_per_step > 1.2  # (tiny random models follow patterns loosely)


@pytest.mark.parametrize("name", speculative_on("hf"))
def test_greedy_equals_ar_through_the_adapter_with_windows(name: str) -> None:
    """gemma3_text mixes sliding-window and global layers; the adapter verifies chains."""
    m = model("hf", "gemma3_text")
    ids = PROMPTS["repeated"]
    ref = greedy_reference("hf", "gemma3_text", tuple(ids))
    assert ref == greedy_reference("native", "gemma3_text", tuple(ids))
    assert run(m, name, ids)[0] == ref


@pytest.mark.parametrize("name", ["pld", "rest"])
def test_copying_drafters_cut_their_chains_on_a_chain_backend(name: str) -> None:
    """On a backend that verifies chains only (the adapter; llama.cpp), pld and rest cut each
    chain to what pays under the forward times (methods.parts.draft_size.ChainCut). Where every extra row costs 70%
    of a step they verify fewer tokens than whole chains, and the output is still ar's; seeded
    samples repeat. Native models draft trees, which are not cut."""
    m = model("hf", "llama")
    ids = PROMPTS["repeated"]
    ref = greedy_reference("hf", "llama", tuple(ids))
    method = build_method(name, m, MethodOptions())
    cut = method.drafters[0]._chains.chain_cut
    assert cut is not None
    cut.cost = lambda n: 1.0 + 0.7 * (n - 1)
    out, stats, _ = run(m, method, ids)
    whole = build_method(name, m, MethodOptions(tree_cut=False))
    assert whole.drafters[0]._chains.chain_cut is None
    out_whole, stats_whole, _ = run(m, whole, ids)
    assert out == ref == out_whole
    assert 0 < stats.drafted < stats_whole.drafted
    if name == "pld":  # (rest remembers earlier generations, so its drafts change anyway)
        params = SamplingParams(temperature=0.8, seed=3)
        assert run(m, method, ids, 30, params)[0] == run(m, method, ids, 30, params)[0]
    native = build_method(name, model("native", "llama"), MethodOptions())
    assert native.drafters[0]._chains.chain_cut is None


@pytest.mark.parametrize("name", ["ar", "pld"])
def test_chunked_prefill(monkeypatch, name: str) -> None:
    ids = PROMPTS["repeated"]
    ref = greedy_reference("native", "llama", tuple(ids))
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 7)
    assert run(model("native", "llama"), name, ids)[0] == ref


def test_auto_measures_and_caches_its_cost_table(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    m = model("native", "qwen3")
    ids = PROMPTS["repeated"]
    assert run(m, "auto", ids, 12)[0] == greedy_reference("native", "qwen3", tuple(ids), 12)
    saved = list((tmp_path / "cost").glob("*.json"))
    assert len(saved) == 1
    build_method("auto", m)  # loads the saved table
    assert list((tmp_path / "cost").glob("*.json")) == saved


@pytest.mark.parametrize("name", LOSSLESS)
def test_method_options(name: str) -> None:
    m = model("native", "gemma3_text")
    ids = PROMPTS["repeated"]
    ref = greedy_reference("native", "gemma3_text", tuple(ids))
    opts = MethodOptions(draft_len=3, max_ngram=2, jacobi_block=5)
    method = build_method(name, m, options_for(name, m, opts))
    assert method.max_budget <= 3
    assert run(m, method, ids)[0] == ref


def test_typical_acceptance_option() -> None:
    """Typical acceptance is lossy and says so; with greedy params it is still greedy."""
    m = model("native", "gemma3_text")
    ids = PROMPTS["repeated"]
    ref = greedy_reference("native", "gemma3_text", tuple(ids))
    typical = MethodOptions(acceptance="typical")
    assert not is_lossless("pld", typical) and is_lossless("pld")
    method = build_method("pld", m, typical)
    assert method.name == "pld+typical"
    assert run(m, method, ids)[0] == ref
    out = run(m, build_method("pld", m, typical), ids, 30, SamplingParams(temperature=0.7, seed=0))
    assert len(out[0]) == 30


# --------------------------------------------------------------------------- trees
class OracleTreeDrafter:
    """Knows the greedy continuation and drafts a tree whose right answer is NOT the first path:

    wrong, wrong's child, right_1, right_2, right_3 (parents -1, 0, -1, 2, 3). Accepting the
    second branch makes the cache keep a non-prefix path. Ignores ``budget`` (the engine trims).
    """

    name = "oracle"

    def __init__(self, full: list[int], vocab: int) -> None:
        self.full, self.vocab = full, vocab  # prompt + greedy continuation
        self.observed = 0

    def reset(self) -> None:
        self.observed = 0

    def propose(self, ctx: Context, budget: int) -> Draft:
        m = int(ctx.tokens.shape[0])
        assert ctx.tokens.tolist() == self.full[:m]
        right = self.full[m : m + 3]
        if not right:
            return Draft.empty()
        wrong = (right[0] + 1) % self.vocab
        toks = [wrong, (wrong + 5) % self.vocab] + right
        parents = [-1, 0, -1, 2, 3][: len(toks)]
        return Draft(torch.tensor(toks), torch.tensor(parents))

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        assert feedback.target_argmax.shape == (len(feedback.draft) + 1,)
        self.observed += 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2"])
def test_tree_with_the_answer_on_a_second_branch(family: str) -> None:
    m = model("native", family)
    ids = PROMPTS["random"]
    ref = greedy_reference("native", family, tuple(ids))
    drafter = OracleTreeDrafter(ids + ref, m.vocab_size)
    method = Method("oracle", [drafter], FixedPolicy(drafter, 5), 5)
    out, stats, reason = run(m, method, ids)
    assert out == ref and reason == "length"
    assert stats.tokens_per_step > 3.0  # 4 per full step (3 accepted + bonus)
    # every step drafted except, maybe, the last (a budget of max_new - 1 - emitted = 0)
    assert stats.drafter_steps["oracle"] == drafter.observed >= stats.steps - 1
    # with a budget of 2 (wrong + its child) nothing is ever accepted, but output is unchanged
    drafter = OracleTreeDrafter(ids + ref, m.vocab_size)
    method = Method("oracle", [drafter], FixedPolicy(drafter, 2), 2)
    out, stats, _ = run(m, method, ids)
    assert out == ref and stats.accepted == 0 and stats.tokens_per_step == 1.0


DIVERGING = _random(4, 3) + [50] + _random(4, 3) + [51] + _random(4, 3) + [52] + _random(4, 3)


def test_pld_trees_greedy() -> None:
    """Prompt lookup drafts trees when several earlier matches disagree."""
    m = model("native", "llama")
    ref = greedy_reference("native", "llama", tuple(DIVERGING))
    out, stats, _ = run(m, "pld", DIVERGING)
    assert out == ref


@pytest.mark.parametrize("name", LOSSLESS)
def test_sampling_with_top_k_1_is_greedy(name: str) -> None:
    """Sampling with top_k=1 is greedy: every method must give the greedy output."""
    m = model("native", "llama")
    ref = greedy_reference("native", "llama", tuple(DIVERGING))
    params = SamplingParams(temperature=0.8, top_k=1, seed=0)
    assert run(m, name, DIVERGING, params=params)[0] == ref


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1)],
    ids=["t0.8", "t0.8_k20_p0.9"],
)
@pytest.mark.parametrize("name", LOSSLESS)  # auto included: under sampling its choices ignore the clock
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_seeded_sampling_repeats(family: str, name: str, params: SamplingParams) -> None:
    m = model("native", family)
    ids = PROMPTS["repeated"]
    a = run(m, name, ids, 30, params)[0]
    b = run(m, name, ids, 30, params)[0]
    other = SamplingParams(temperature=0.8, top_k=params.top_k, top_p=params.top_p, seed=2)
    c = run(m, name, ids, 30, other)[0]
    assert a == b
    assert a != c
    assert len(a) == len(c) == 30


# --------------------------------------------------------------------------- stats, EOS, budgets
@pytest.mark.parametrize("k", [0, 5, 17])
@pytest.mark.parametrize("name", LOSSLESS)
def test_eos_stops_every_method(name: str, k: int) -> None:
    m = model("native", "llama")
    ids = PROMPTS["random"]
    ref = greedy_reference("native", "llama", tuple(ids))
    eos = ref[k]
    cut = ref.index(eos)  # EOS's first appearance
    out, stats, reason = run(m, name, ids, eos=frozenset({eos}))
    assert out == ref[:cut]
    assert reason == "stop" and stats.new_tokens == cut


@pytest.mark.parametrize("max_new", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("name", LOSSLESS)
def test_max_new_tokens_respected(name: str, max_new: int) -> None:
    m = model("native", "llama")
    ids = PROMPTS["repeated"]
    ref = greedy_reference("native", "llama", tuple(ids))
    out, stats, reason = run(m, name, ids, max_new)
    assert out == ref[:max_new]
    assert reason == "length"


@pytest.mark.parametrize("name", LOSSLESS)
def test_end_of_context(name: str) -> None:
    """A prompt near the model's context: every method stops at the same token, "length"."""
    m = model("native", "gemma3_text")
    assert m.max_context == 256
    ids = (_random(10, 4) * 26)[:248]
    ref, _, reason = run(m, "ar", ids, NEW)
    assert len(ref) == m.max_context - len(ids) + 1  # the last token is never fed back
    assert reason == "length"
    out, _, reason = run(m, name, ids, NEW)
    assert out == ref and reason == "length"


def test_bad_prompts() -> None:
    m = model("native", "llama")
    engine = Engine(m, build_method("ar", m))
    with pytest.raises(ConfigError, match="empty"):
        list(engine.generate([], 5, GREEDY))
    with pytest.raises(ConfigError, match="context"):
        list(engine.generate([5] * m.max_context, 5, GREEDY))
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("nope", m)


# --------------------------------------------------------------------------- jacobi
def test_jacobi_guesses_follow_the_context() -> None:
    """The iterate carried over is for the positions after the emitted tokens; when other
    drafters (``auto``) decided tokens meanwhile, the guesses for those positions are dropped."""
    d = JacobiDrafter(block=4)
    ctx = Context(torch.tensor([5, 6, 7]), 2)
    draft = d.propose(ctx, 3)
    assert draft.tokens.tolist() == [7, 7, 7] and draft.is_chain
    # the target's argmax after the root and each guess: 8 9 1 2 -> nothing accepted, bonus 8
    argmax = torch.tensor([8, 9, 1, 2])
    result = verify_greedy_argmax(draft, argmax)
    assert result.tokens.tolist() == [8]
    d.observe(ctx, StepFeedback(draft, result, argmax))
    ctx = Context(torch.tensor([5, 6, 7, 8]), 2)
    assert d.propose(ctx, 4).tokens.tolist() == [9, 1, 2, 8]  # the rest, padded with the bonus
    draft = d.propose(ctx, 4)
    argmax = torch.tensor([9, 1, 3, 4, 0])  # accepts 9 1, bonus 3; carries 4 0
    d.observe(ctx, StepFeedback(draft, verify_greedy_argmax(draft, argmax), argmax))
    assert d.propose(Context(torch.tensor([5, 6, 7, 8, 9, 1, 3]), 2), 4).tokens.tolist() == [
        4, 0, 3, 3
    ]
    # one token decided by another drafter meanwhile: its guess is dropped
    ctx = Context(torch.tensor([5, 6, 7, 8, 9, 1, 3, 4]), 2)
    assert d.propose(ctx, 4).tokens.tolist() == [0, 3, 3, 3]
    # too far ahead: start over from the last token
    ctx = Context(torch.arange(20), 2)
    assert d.propose(ctx, 4).tokens.tolist() == [19] * 4
    d.reset()
    assert d.propose(Context(torch.tensor([4]), 1), 2).tokens.tolist() == [4, 4]



def assert_greedy_up_to_a_near_tie(m, prompt: list[int], ref: list[int], out: list[int]) -> None:
    """What is promised where rows are not bitwise exact: ``out`` follows ``ref`` (ar) until,
    at most, a step where ar's two best logits were within rounding of each other."""
    assert len(out) == len(ref)
    i = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), None)
    if i is None:
        return
    logits = m.forward(torch.tensor(prompt + ref[:i]), m.new_cache()).logits[-1].float()
    top = logits.topk(2).values
    assert float(top[0] - top[1]) <= 0.05 * max(1.0, abs(float(top[0]))), (i, top)


@functools.lru_cache(maxsize=None)
def bf16_model(exact_rows: bool) -> NativeModel:
    if exact_rows:
        return NativeModel.from_hf(tiny_hf_model("gemma3_text"), dtype=torch.bfloat16)
    return without_exact_rows("gemma3_text")


@pytest.mark.parametrize("name", LOSSLESS)
def test_bfloat16_greedy_equals_ar_bit_for_bit(name):
    """In bfloat16 near-ties are common; row-exact verification keeps every method on ar's path.
    On a machine whose invariance probe fails (``bitwise_exact`` False) only the fallback's
    promise is checked: ar's path up to a near-tie (see the next test)."""
    m = bf16_model(exact_rows=True)
    for prompt in PROMPTS.values():
        ref = run(m, "ar", prompt)[0]
        out = run(m, name, prompt)[0]
        if m.bitwise_exact:
            assert out == ref, (name, prompt)
        else:
            assert_greedy_up_to_a_near_tie(m, prompt, ref, out)


@pytest.mark.parametrize("name", ["pld", "jacobi"])
def test_bfloat16_without_exact_rows_falls_back_to_fused_attention(name, monkeypatch):
    """Where the probe fails, forwards use fused attention (no blocked attention, whose exactness
    would rest on the failed probe) and greedy methods stay on ar's path up to a near-tie."""
    import genrefine.models.runtime as runtime

    m = bf16_model(exact_rows=False)
    blocked = []
    real = runtime.blocked_attention
    monkeypatch.setattr(runtime, "blocked_attention", lambda *a, **k: blocked.append(1) or real(*a, **k))
    for prompt in PROMPTS.values():
        ref = run(m, "ar", prompt)[0]
        assert_greedy_up_to_a_near_tie(m, prompt, ref, run(m, name, prompt)[0])
    assert not blocked


def test_decoder_caps_draft_nodes_and_stays_greedy() -> None:
    """``Decoder.propose(max_nodes)`` (the server's cap on a shared forward's rows) never drafts
    more nodes than asked and leaves the output unchanged."""
    m = model("native", "llama")
    ids = PROMPTS["repeated"]
    ref = run(m, "ar", ids)[0]
    for cap in (0, 2):
        method = build_method("pld", m)
        stats = Stats("pld")
        dec = engine_mod.Decoder(m, method, torch.tensor(ids), NEW, GREEDY, frozenset(), stats)
        out = dec.start()
        while not dec.done:
            step = dec.propose(cap)
            if step is None:
                break
            assert step.tokens.shape[0] <= cap + 1
            out += dec.accept(m.forward(step.tokens, step.cache, step.positions, step.tree_mask).logits)
        assert out == ref
        assert stats.drafted <= cap * stats.steps
        assert (stats.drafted > 0) == (cap > 0)


class ContinuationDrafter:
    """Drafts the next ``budget`` tokens of a known continuation as one chain (every row of the
    verification is then on the accepted path)."""

    name = "continuation"

    def __init__(self, full: list[int]) -> None:
        self.full = full

    def reset(self) -> None:
        pass

    def propose(self, ctx: Context, budget: int) -> Draft:
        m = int(ctx.tokens.shape[0])
        toks = self.full[m : m + budget]
        return Draft(torch.tensor(toks, dtype=torch.long), torch.arange(-1, len(toks) - 1))

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        pass


def test_a_64_token_draft_stays_on_the_bitwise_exact_path(monkeypatch) -> None:
    """A draft of 64 tokens plus its root would be 65 rows, past what exact attention covers:
    the engine cuts every draft so that draft + root fits, and each verification row equals the
    logits one-token decoding computes, bit for bit. The matmuls run row by row (exact by
    construction) so that only the attention path is under test; the matmuls' own exactness is
    a measurement (test_runtime.py)."""
    m = NativeModel.from_hf(tiny_hf_model("gemma3_text"), dtype=torch.bfloat16)
    if not m.bitwise_exact:
        pytest.skip("this machine's bfloat16 matmuls could not be made batch-invariant")
    inner = m._linear
    monkeypatch.setattr(
        m, "_linear", lambda x, w, b: torch.cat([inner(x[r : r + 1], w, b) for r in range(x.shape[0])])
    )
    ids = PROMPTS["random"]
    new = 100
    ref_logits = []
    dec = engine_mod.Decoder(m, build_method("ar", m), torch.tensor(ids), new, GREEDY, frozenset(), Stats("ar"))
    ref = dec.start()
    while (step := dec.propose()) is not None:
        logits = m.forward(step.tokens, step.cache).logits
        ref_logits.append(logits[0])
        ref += dec.accept(logits)
    d = ContinuationDrafter(ids + ref)
    method = Method("continuation", [d], FixedPolicy(d, 64), 64)
    dec = engine_mod.Decoder(m, method, torch.tensor(ids), new, GREEDY, frozenset(), Stats("c"))
    out = dec.start()
    rows, rows_per_step = [], []
    while (step := dec.propose()) is not None:
        rows_per_step.append(int(step.tokens.shape[0]))
        logits = m.forward(step.tokens, step.cache).logits
        rows += list(logits)
        out += dec.accept(logits)
    assert max(rows_per_step) == EXACT_ROWS_MAX  # the most the exact path covers, no more
    for i, (a, b) in enumerate(zip(rows, ref_logits)):
        assert torch.equal(a, b), i
    assert out == ref


def test_draft_len_is_validated_against_the_exact_rows() -> None:
    """``--draft-len`` allows exactly the drafts the engine verifies whole: draft + root rows."""
    assert MethodOptions(draft_len=EXACT_ROWS_MAX - 1).draft_len == EXACT_ROWS_MAX - 1
    with pytest.raises(ConfigError, match=f"between 1 and {EXACT_ROWS_MAX - 1}, got {EXACT_ROWS_MAX}"):
        MethodOptions(draft_len=EXACT_ROWS_MAX)


# (methods that need an image model's codebook: tests/test_image_methods.py)
@pytest.mark.parametrize("name", [n for n, info in METHODS.items() if not info.needs_latents])
def test_a_huge_token_budget_stops_at_the_context(name: str) -> None:
    """``max_new_tokens=10**12``: buffers are sized by what the context holds, not by the budget,
    and every method stops at the end of the context ("length"), lossless ones with ar's tokens."""
    m = model("native", "llama")
    ids = (_random(10, 5) * 24)[:230]  # repeated: the copying drafters accept long drafts
    ref = greedy_reference("native", "llama", tuple(ids), m.max_context - len(ids) + 1)
    out, _, reason = run(m, name, ids, 10**12)
    assert reason == "length"
    assert len(out) == m.max_context - len(ids) + 1  # the last token is never fed back
    if METHODS[name].lossless:
        assert out == ref


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_torch_cannot_take_is_a_config_error(seed) -> None:
    """The API refuses what torch.Generator.manual_seed would raise on, in one line (the
    server's 400 uses the same range); both ends of the range are accepted."""
    with pytest.raises(ConfigError, match="seed must be between"):
        SamplingParams(temperature=1.0, seed=seed)
    for ok in (2**64 - 1, -(2**63)):
        torch.Generator().manual_seed(SamplingParams(temperature=1.0, seed=ok).seed)

