"""Self-speculative drafters (early exit, SWIFT layer skipping), the reduced draft vocabulary and
the lossy CALM decoder: greedy identity with ``ar`` on tiny native models, the drafters leave the
target's cache as they found it, the skip-set search moves and repeats, the vocabulary ranking is
cached on disk, CALM exits (and with threshold 1 never does), the adapter refuses all three.
"""

from __future__ import annotations

import functools

import pytest
import torch

from genrefine import vocab
from genrefine.methods.base import Context
from genrefine.methods.early_exit_draft import EarlyExitDrafter
from genrefine.methods.swift import SkipLayerDrafter
from genrefine.methods.parts.self_draft import draft_cost, greedy_self_draft
from genrefine.methods.calm import calm_generate, default_exit_points
from genrefine.engine import Engine, Stats
from genrefine.errors import ConfigError, GenrefineError
from genrefine.registry import METHODS, build_method
from genrefine.methods.base import FixedPolicy, Method, MethodOptions
from genrefine.models.hf import HFModel
from genrefine.models.runtime import NativeModel
from genrefine.types import SamplingParams
from tiny import byte_tokenizer, tiny_hf_model

GREEDY = SamplingParams()
NEW = 40  # past the tiny models' sliding window (6)
FAMILIES = ("llama", "gemma3_text")


@functools.lru_cache(maxsize=None)
def native(family: str) -> NativeModel:
    return NativeModel.from_hf(tiny_hf_model(family))


def _random(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


PROMPTS = {"random": _random(12, 1), "repeated": _random(10, 2) * 4}
SUBSET = torch.arange(3, 97, 2)  # a reduced draft vocabulary: every other token id


def run(m, method, prompt, max_new=NEW, params=GREEDY, eos=frozenset()):
    stats = Stats(method.name)
    engine = Engine(m, method)
    out = [t for c in engine.generate(prompt, max_new, params, eos_ids=eos, stats=stats) for t in c]
    assert stats.new_tokens == len(out) <= max_new
    return out, stats, engine.finish_reason


@functools.lru_cache(maxsize=None)
def reference(family: str, prompt: tuple[int, ...], max_new: int = NEW) -> list[int]:
    m = native(family)
    return run(m, build_method("ar", m), list(prompt), max_new)[0]


def _method(drafter, budget: int = 6) -> Method:
    return Method(drafter.name, [drafter], FixedPolicy(drafter, budget), budget)


# --------------------------------------------------------------------------- lossless greedy
GREEDY_METHODS = {
    "early-exit-draft": lambda m: build_method("early-exit-draft", m),
    "swift": lambda m: build_method("swift", m),
    "early-exit-draft-layer3-no-stop": lambda m: build_method(
        "early-exit-draft", m, MethodOptions(exit_layer=3, draft_confidence=0.0)
    ),
    "exit1-subset": lambda m: _method(EarlyExitDrafter(m, 1, SUBSET)),
    "exit2-subset-no-stop": lambda m: _method(
        EarlyExitDrafter(m, 2, SUBSET, confidence=0.0), budget=5
    ),
    "every-layer-subset": lambda m: _method(EarlyExitDrafter(m, m.num_layers, SUBSET)),
    "skip-search-subset": lambda m: _method(
        SkipLayerDrafter(m, vocab_ids=SUBSET, probe_every=2, trial_steps=1)
    ),
}


@pytest.mark.parametrize("method", list(GREEDY_METHODS))
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_ar(family: str, prompt: str, method: str) -> None:
    m = native(family)
    ids = PROMPTS[prompt]
    ref = reference(family, tuple(ids))
    out, stats, reason = run(m, GREEDY_METHODS[method](m), ids)
    assert out == ref
    assert reason == "length" and stats.drafted > 0


@pytest.mark.parametrize("name", ["early-exit-draft", "swift"])
def test_sampling_stays_exact(name: str) -> None:
    """Deterministic drafts under sampling: top_k=1 is greedy; seeded runs repeat."""
    m = native("llama")
    ids = PROMPTS["repeated"]
    ref = reference("llama", tuple(ids))
    greedy_sampling = SamplingParams(temperature=0.8, top_k=1, seed=0)
    seeded = SamplingParams(temperature=0.8, seed=3)
    assert run(m, build_method(name, m), ids, params=greedy_sampling)[0] == ref
    a = run(m, build_method(name, m), ids, 30, seeded)[0]
    assert a == run(m, build_method(name, m), ids, 30, seeded)[0] and len(a) == 30


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_is_the_truncated_model_and_the_cache_is_restored(family: str) -> None:
    """An early-exit draft (no confidence stop) is greedy decoding of the first E layers run on
    their own cache; propose leaves the target's cache exactly as it found it."""
    m = native(family)
    ids = torch.tensor(PROMPTS["random"])
    exit_layer, k = 2, 9  # 9 draft tokens: past the window of 6
    cache = m.new_cache(64)
    m.forward(ids[:-1], cache)
    keys = [t[:, : cache.length].clone() for t in cache.keys]
    drafter = EarlyExitDrafter(m, exit_layer, confidence=0.0)
    draft = drafter.propose(Context(ids, len(ids), cache), k)
    assert draft.is_chain and len(draft) == k and draft.probs is None
    assert cache.length == len(ids) - 1
    assert all(torch.equal(a, t[:, : cache.length]) for a, t in zip(keys, cache.keys))
    # the first E layers as a model of their own
    own = m.new_cache(64)
    layers = list(range(exit_layer))
    logits = m.forward(ids, own, layers=layers).logits[-1:]
    expect = []
    for _ in range(k):
        tok = logits.argmax(-1)
        expect.append(int(tok))
        logits = m.forward(tok, own, layers=layers).logits
    assert draft.tokens.tolist() == expect
    with pytest.raises(ConfigError, match="cache"):
        drafter.propose(Context(ids, len(ids)), 3)


def test_confidence_stop() -> None:
    m = native("llama")
    ids = torch.tensor(PROMPTS["random"])
    cache = m.new_cache(64)
    m.forward(ids[:-1], cache)
    toks, top = greedy_self_draft(m, cache, ids[-1:], 8, [0, 1], None, confidence=1.0)
    assert toks.shape == top.shape == (1,)  # the first token is always proposed
    toks, top = greedy_self_draft(m, cache, ids[-1:], 8, [0, 1], None, confidence=0.0)
    assert toks.shape == (8,) and cache.length == len(ids) - 1
    thr = float(top[3]) + 1e-6  # the 4th token (or an earlier one) falls below
    short, _ = greedy_self_draft(m, cache, ids[-1:], 8, [0, 1], None, confidence=thr)
    n = min(len(top), int((top >= thr).long().cumprod(0).sum()) + 1)  # the first unsure one too
    assert 1 <= n <= 4 and short.tolist() == toks[:n].tolist()


def test_adaptive_draft_length_is_the_default() -> None:
    """Without a draft confidence both methods decide draft lengths with a DraftStop priced by
    draft_cost and the target's cost table (swift re-prices it for the skip set in use); a given
    confidence keeps the threshold. The stop decides: free drafting drafts the whole budget, a
    draft token dearer than a target step drafts one."""
    from genrefine.costs import target_costs
    from genrefine.methods.parts.draft_size import DraftStop

    m = native("llama")
    table = target_costs(m)
    ee = build_method("early-exit-draft", m).drafters[0]
    assert isinstance(ee.stop, DraftStop)
    assert ee.stop.draft_cost == pytest.approx(ee.cost * table(1))
    sw = build_method("swift", m).drafters[0]
    assert isinstance(sw.stop, DraftStop)
    for name in ("early-exit-draft", "swift"):
        assert build_method(name, m, MethodOptions(draft_confidence=0.5)).drafters[0].stop is None
    ids = torch.tensor(PROMPTS["random"])
    cache = m.new_cache(64)
    m.forward(ids[:-1], cache)
    ctx = Context(ids, len(ids), cache)
    sw.skip = frozenset({1})
    sw.propose(ctx, 4)
    assert sw.stop.draft_cost == pytest.approx(sw.cost(frozenset({1})) * table(1))
    ee.stop = DraftStop(lambda n: 1.0, 0.0)
    assert len(ee.propose(ctx, 7)) == 7
    ee.stop = DraftStop(lambda n: 1.0, 10.0)
    assert len(ee.propose(ctx, 7)) == 1
    assert cache.length == len(ids) - 1  # the target's cache as it was


def test_drafter_arguments() -> None:
    m = native("llama")
    with pytest.raises(ConfigError, match="exit layer"):
        EarlyExitDrafter(m, m.num_layers)
    with pytest.raises(ConfigError, match="skip set"):
        SkipLayerDrafter(m, skip=[0])
    with pytest.raises(ConfigError, match="draft vocabulary"):
        EarlyExitDrafter(m, 1, torch.tensor([5, 1000]))
    with pytest.raises(ConfigError, match="exit-layer"):
        MethodOptions(exit_layer=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        build_method("swift", m, MethodOptions(draft_vocab=40))
    # a cheaper draft costs less; the full model with the full head costs 1
    assert draft_cost(m, range(m.num_layers), m.vocab_size) == pytest.approx(1.0)
    assert draft_cost(m, [0], 40) < draft_cost(m, [0, 1], 40) < draft_cost(m, [0, 1], 97)


# --------------------------------------------------------------------------- SWIFT's search
def test_skip_set_search_moves_and_repeats() -> None:
    m = native("llama")
    ids = PROMPTS["random"]
    ref = reference("llama", tuple(ids), 120)

    def go():
        d = SkipLayerDrafter(m, probe_every=2, trial_steps=2)
        assert d.skip == frozenset({2})  # the middle layer L // 2
        out = run(m, _method(d), ids, 120)[0]
        return out, d.history

    out, history = go()
    assert out == ref
    assert len(history) > 1 and len({s for _, s in history}) > 1  # adopted another set
    assert all(s and s <= {1, 2} for _, s in history)  # first and last layers always run
    assert go() == (out, history)  # deterministic


def test_skip_set_trials() -> None:
    """Hand-fed steps: the candidate flips one layer in the direction the acceptance rate asks
    for, and replaces the incumbent only on a better score."""
    from genrefine.methods.base import StepFeedback
    from genrefine.types import Draft, VerifyResult

    m = native("llama")

    def step(d, accepted: int, drafted: int = 4):
        draft = Draft.chain(list(range(drafted)))
        result = VerifyResult(torch.arange(accepted), torch.zeros(accepted + 1, dtype=torch.long))
        argmax = torch.zeros(drafted + 1, dtype=torch.long)
        d.observe(Context(torch.tensor([1]), 1), StepFeedback(draft, result, argmax))

    d = SkipLayerDrafter(m, skip=[1], probe_every=2, trial_steps=1)
    step(d, 1), step(d, 1)
    # low acceptance asks to run layer 1 again, but nothing skipped is not allowed: any flip
    assert d.trial == frozenset({1, 2})
    step(d, 0)  # worse: rejected
    assert d.skip == frozenset({1}) and d.trial is None
    step(d, 1), step(d, 1)
    assert d.trial == frozenset({1, 2})  # the cursor cycles back
    step(d, 4)  # better: adopted
    assert d.skip == frozenset({1, 2}) and d.history[-1] == (d.steps, frozenset({1, 2}))
    # with a reduced vocabulary the draft may run every layer
    d = SkipLayerDrafter(m, skip=[1], vocab_ids=SUBSET, probe_every=2, trial_steps=1)
    step(d, 1), step(d, 1)
    assert d.trial == frozenset()
    # high acceptance: skip one more
    d = SkipLayerDrafter(m, skip=[1], probe_every=2, trial_steps=1)
    step(d, 4), step(d, 3)
    assert d.trial == frozenset({1, 2})


# --------------------------------------------------------------------------- vocabulary
def test_token_frequencies_and_ranking() -> None:
    tok = byte_tokenizer()
    counts = vocab.token_frequencies(tok, ["aab", "b"], vocab_size=len(tok))
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    assert counts.shape == (len(tok),) and counts.sum() == 4
    assert counts[a] == 2 and counts[b] == 2
    ranking = vocab.rank_tokens(counts, always=[2], last=[0])
    assert ranking[:3].tolist() == [2, min(a, b), max(a, b)]
    assert ranking[-1] == 0 and sorted(ranking.tolist()) == list(range(len(tok)))
    # the default corpus is standard library text, read the same way every time
    texts = vocab.default_corpus()
    assert sum(map(len, texts)) > 100_000 and texts[:3] == vocab.default_corpus()[:3]


def test_frequent_ids_cached_on_disk(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    monkeypatch.setattr(vocab, "default_corpus", lambda: ["the cat sat on the mat. " * 20])
    tok = byte_tokenizer()
    ids = vocab.frequent_ids("model", tok, 8, vocab_size=97)
    assert ids.shape == (8,) and ids.tolist() == sorted(set(ids.tolist()))
    assert {0, 1, 2} <= set(ids.tolist())  # pad, bos, eos always in
    assert tok.convert_tokens_to_ids("t") in ids.tolist()  # among the most frequent
    saved = list((tmp_path / "vocab").glob("*.safetensors"))
    assert len(saved) == 1

    def boom(*a, **k):
        raise AssertionError("recounted instead of loading the cached ranking")

    monkeypatch.setattr(vocab, "token_frequencies", boom)
    assert torch.equal(vocab.frequent_ids("model", tok, 8, vocab_size=97), ids)
    assert vocab.frequent_ids("model", tok, 500, vocab_size=97).shape == (97,)
    # through the method registry (tokenizer passed, as genrefine.load() does): the same key
    assert native("gemma3_text").name == "model"
    m = native("gemma3_text")
    method = build_method("swift", m, MethodOptions(draft_vocab=40), tokenizer=tok)
    assert method.drafters[0].head.ids.shape == (40,)
    ids_ = PROMPTS["repeated"]
    assert run(m, method, ids_)[0] == reference("gemma3_text", tuple(ids_))


# --------------------------------------------------------------------------- CALM (lossy)
@pytest.mark.parametrize("family", FAMILIES)
def test_calm_with_threshold_one_is_ar(family: str) -> None:
    m = native(family)
    ids = PROMPTS["repeated"]
    ref = reference(family, tuple(ids))
    assert default_exit_points(4) == [2, 3] and default_exit_points(18) == [12, 15]
    used: list[int] = []
    stats = Stats("calm")
    out = [t for c in calm_generate(m, ids, NEW, 1.0, stats=stats, layers_used=used) for t in c]
    assert out == ref and used == [m.num_layers] * (NEW - 1)
    assert stats.steps == NEW - 1 and stats.new_tokens == NEW
    method = build_method("calm", m, MethodOptions(calm_threshold=1.0))
    out, stats, reason = run(m, method, ids)
    assert out == ref and reason == "length" and stats.tokens_per_step == 1.0


def test_calm_exits_propagates_state_and_stops() -> None:
    m = native("gemma3_text")
    ids = PROMPTS["random"]
    ref = reference("gemma3_text", tuple(ids))
    # a threshold below 1/vocab: every token exits at the first exit point
    used: list[int] = []
    gen = calm_generate(m, ids, NEW, 0.01, exit_points=[1], layers_used=used)
    out = [t for c in gen for t in c]
    assert len(out) == NEW and used == [1] * (NEW - 1)
    assert out[0] == ref[0] and out != ref  # the prefill's token is the full model's
    # EOS: stops before it, finish reason "stop"; the method plumbing reports it
    eos = out[7]
    cut = out.index(eos)
    method = Method("calm", decode=lambda model, p, n, params, e, stats: calm_generate(
        model, p, n, 0.01, e, stats, params=params, exit_points=[1]))
    got, stats, reason = run(m, method, ids, eos=frozenset({eos}))
    assert got == out[:cut] and reason == "stop"
    got, stats, reason = run(m, method, ids, max_new=5)
    assert got == out[:5] and reason == "length"
    # state propagation: write_kv gives the keys and values the layer itself writes
    cache = m.new_cache(32)
    x2 = m.run_layers(m.embed_tokens(torch.tensor(ids[:9])), cache, 0, [0, 1])
    m.run_layers(x2, cache, 0, [2, 3])
    kv = (cache.keys[2][:, :9].clone(), cache.values[2][:, :9].clone())
    cache.keys[2].zero_(), cache.values[2].zero_()
    m.write_kv(x2, cache, 0, [2])
    assert torch.allclose(cache.keys[2][:, :9], kv[0], atol=1e-5)
    assert torch.allclose(cache.values[2][:, :9], kv[1], atol=1e-5)
    assert cache.length == 0  # the caller moves the length


def test_calm_sampling_repeats() -> None:
    m = native("llama")
    ids = PROMPTS["random"]
    params = SamplingParams(temperature=0.8, seed=5)
    method = build_method("calm", m, MethodOptions(calm_threshold=0.05))
    a = run(m, method, ids, 20, params)[0]
    assert a == run(m, method, ids, 20, params)[0] and len(a) == 20


# --------------------------------------------------------------------------- registry
def test_registry_says_which_are_lossless() -> None:
    assert METHODS["early-exit-draft"].lossless and METHODS["swift"].lossless
    assert not METHODS["calm"].lossless


@pytest.mark.parametrize("name", ["early-exit-draft", "swift", "calm"])
def test_adapter_refusal(name: str) -> None:
    hf = HFModel(tiny_hf_model("llama"))
    with pytest.raises(GenrefineError) as e:
        build_method(name, hf)
    assert str(e.value) == (
        f"method {name} needs the native runtime; this architecture runs through the "
        "transformers adapter"
    )


def test_default_draft_vocabulary_for_large_vocabularies(monkeypatch) -> None:
    """early-exit-draft and swift draft onto the 32768 most frequent tokens of a large vocabulary
    unless told otherwise; small vocabularies, calm, and a missing tokenizer keep all tokens."""
    from types import SimpleNamespace

    import genrefine.vocab
    from genrefine.methods.parts.draft_vocab import DEFAULT_DRAFT_VOCAB, reduced_vocab
    from genrefine.methods.base import MethodOptions

    monkeypatch.setattr(genrefine.vocab, "frequent_ids", lambda name, tok, n, vocab: ("ids", n))
    big, small, tok = SimpleNamespace(vocab_size=262144), SimpleNamespace(vocab_size=32000), object()
    assert reduced_vocab(big, MethodOptions(), tok, default=True) == ("ids", DEFAULT_DRAFT_VOCAB)
    assert reduced_vocab(big, MethodOptions(draft_vocab=1000), tok, default=True) == ("ids", 1000)
    assert reduced_vocab(big, MethodOptions(draft_vocab=262144), tok, default=True) is None
    assert reduced_vocab(big, MethodOptions(), tok) is None  # calm: no default
    assert reduced_vocab(big, MethodOptions(), None, default=True) is None
    assert reduced_vocab(small, MethodOptions(), tok, default=True) is None
