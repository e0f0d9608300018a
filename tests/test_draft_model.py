"""Independent draft models (method ``sps``): greedy identity with ``ar`` for draft models that
are always right (the target itself), sometimes right (its first layers) and mostly wrong
(another random model); the draft cache follows the context and feeds only what is new; the
sampled drafts carry the distribution they were drawn from and speculative sampling with them is
exact; different tokenizers are bridged through text (two byte-level vocabularies; a shuffled
character vocabulary with the target re-indexed to it, so that every bridged draft is right) or
refused in one line; the CLI, the bench and the shrink tool.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter

import pytest
import torch

from genrefine.cli import main
from genrefine.methods.base import Context
from genrefine.methods.sps import DraftModelDrafter, make_draft_model_drafter
from genrefine.methods.parts.text_bridge import TextBridgeDrafter, check_bridgeable
from genrefine.engine import Engine, Stats
from genrefine.methods.parts.draft_size import DraftStop
from genrefine.errors import ConfigError
from genrefine.registry import METHODS, build_method, is_lossless
from genrefine.methods.base import FixedPolicy, Method, MethodOptions
from genrefine.models.hf import HFModel
from genrefine.models.loading import load_model
from genrefine.models.runtime import NativeModel
from genrefine.sampling import logits_to_probs
from genrefine.types import Draft, SamplingParams
from genrefine.verify import speculative_plan
from test_verify import assert_lossless, chi_square_ok, emitted_from_plan
from tiny import (
    CHARS,
    ShallowModel,
    byte_tokenizer,
    char_tokenizer,
    reindexed,
    save_tiny_model_dir,
    tiny_hf_model,
)

GREEDY = SamplingParams()
NEW = 40  # past the tiny models' sliding window (6)
FAMILIES = ("llama", "gemma3_text")


@functools.lru_cache(maxsize=None)
def native(family: str, seed: int = 0, vocab: int = 97) -> NativeModel:
    return NativeModel.from_hf(tiny_hf_model(family, seed, vocab))


def _random(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


PROMPTS = {"random": _random(12, 1), "repeated": _random(10, 2) * 4, "one_token": [7]}


def run(m, method, prompt, max_new=NEW, params=GREEDY, eos=frozenset()):
    stats = Stats(method.name)
    engine = Engine(m, method)
    out = [t for c in engine.generate(prompt, max_new, params, eos_ids=eos, stats=stats) for t in c]
    assert stats.new_tokens == len(out) <= max_new
    assert stats.accepted <= stats.drafted
    return out, stats


@functools.lru_cache(maxsize=None)
def reference(m: NativeModel, prompt: tuple[int, ...], max_new: int = NEW) -> list[int]:
    return run(m, build_method("ar", m), list(prompt), max_new)[0]


def sps(target, draft, tokenizer=None, **kw):
    return build_method("sps", target, MethodOptions(draft_model=draft, **kw), tokenizer=tokenizer)


# --------------------------------------------------------------------------- same tokenizer
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_ar(family: str, prompt: str) -> None:
    m = native(family)
    ids = PROMPTS[prompt]
    ref = reference(m, tuple(ids))
    drafts = {
        "itself": m,  # always right
        "first layers": ShallowModel(m, 2),  # sometimes right
        "another model": native("qwen3", seed=1),  # mostly wrong
    }
    cases = [
        ("itself", 8, 0.0), ("itself", 3, 0.4), ("first layers", 5, 0.0),
        ("first layers", 8, None), ("another model", 1, 0.0), ("another model", 6, 0.0),
    ]
    for name, draft_len, conf in cases:
        method = sps(m, drafts[name], draft_len=draft_len, draft_confidence=conf)
        assert isinstance(method.drafters[0], DraftModelDrafter)
        out, stats = run(m, method, ids)
        assert out == ref, (name, draft_len, conf)
        assert stats.drafted > 0, (name, draft_len, conf)
        if name == "itself":
            assert stats.accepted == stats.drafted, (name, draft_len, conf)
            if conf == 0.0:
                assert stats.tokens_per_step > draft_len * 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_draft_vocabulary_drafts_only_its_ids_and_equals_ar(family: str) -> None:
    """A draft model projecting onto a subset of the vocabulary (FR-Spec's reduced head) drafts
    only those ids, and greedy output stays ``ar``'s; ids past the shared vocabulary are dropped
    and a subset with none left is refused."""
    m = native(family)
    ids = PROMPTS["repeated"]
    sub = torch.tensor(sorted(set(ids)) + [1, 2, 500])  # the prompt's tokens (500: out of range)
    for draft in (m, ShallowModel(m, 2)):
        d = DraftModelDrafter(draft, m.vocab_size, confidence=0.0, vocab_ids=sub)
        assert d.runner.head is not None and d.vocab == len(sub) - 1
        out, stats = run(m, Method("sps", [d], FixedPolicy(d, 6), 6), ids)
        assert out == reference(m, tuple(ids)) and stats.drafted > 0
        drafted = d.propose(Context(torch.tensor(ids), 2), 6).tokens.tolist()
        assert drafted and set(drafted) <= set(sub.tolist())
    full = DraftModelDrafter(m, m.vocab_size, vocab_ids=torch.arange(m.vocab_size))
    assert full.runner.head is None  # the whole vocabulary: no reduced head
    with pytest.raises(ConfigError, match="no token id"):
        DraftModelDrafter(m, m.vocab_size, vocab_ids=torch.tensor([500, 600]))
    adapter = HFModel(tiny_hf_model(family))  # cannot project onto a subset: full vocabulary
    assert DraftModelDrafter(adapter, m.vocab_size, vocab_ids=sub).runner.head is None


def test_adaptive_stop_cuts_greedy_drafts_and_stays_equal_to_ar() -> None:
    """sps's default (no draft_confidence): a DraftStop from the target's cost table and the draft
    model's measured time per token. The drafter drafts while the stop says so and proposes the
    prefix it keeps: greedy drafts cut (the rest stays in the draft cache), sampled ones whole;
    the output equals ar's."""

    class KeepTwo(DraftStop):  # drafts on, keeps 2 of greedy drafts
        def more(self, p: float) -> bool:
            super().more(p)
            return True

        def __call__(self, probs=None, whole: bool = False) -> int:
            n = super().__call__(probs, whole=True)
            return n if whole else min(2, n)

    m = native("llama")
    ids = PROMPTS["repeated"]
    method = sps(m, ShallowModel(m, 2))
    d = method.drafters[0]
    assert isinstance(d.stop, DraftStop) and d.stop.draft_cost > 0
    assert sps(m, m, draft_confidence=0.4).drafters[0].stop is None  # a threshold when given
    d.stop = KeepTwo(lambda n: 1.0, 0.0)
    d.reset()
    got = d.propose(Context(torch.tensor(ids), 2), 8)
    assert len(got) == 2 and len(d.stop._paths) == 8  # drafted 8, verifies 2
    sampled = SamplingParams(temperature=1.0, seed=0)
    g = torch.Generator().manual_seed(0)
    assert len(d.propose(Context(torch.tensor(ids), 2, params=sampled, generator=g), 8)) == 8
    out, stats = run(m, method, ids)
    assert out == reference(m, tuple(ids)) and stats.drafted <= 2 * stats.steps


def test_sps_draft_vocab_option_reaches_the_draft_model(monkeypatch, tmp_path) -> None:
    """``--draft-vocab N`` (and the default for large vocabularies) gives a native draft model
    sharing the tokenizer a reduced head; a draft model with another tokenizer keeps all ids."""
    import genrefine.vocab as vocab

    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    monkeypatch.setattr(vocab, "default_corpus", lambda: ["the cat sat on the mat. " * 20])
    tok = byte_tokenizer()
    m = native("gemma3_text")
    method = sps(m, m, tokenizer=tok, draft_vocab=40, draft_confidence=0.0)
    d = method.drafters[0]
    assert isinstance(d, DraftModelDrafter) and d.runner.head.ids.shape == (40,)
    assert torch.equal(d.runner.head.ids.cpu(), vocab.frequent_ids("model", tok, 40, vocab_size=97))
    ids = PROMPTS["repeated"]
    assert run(m, method, ids)[0] == reference(m, tuple(ids))
    assert sps(m, m, tokenizer=tok).drafters[0].runner.head is None  # 97 tokens: no default cut


def test_draft_model_through_the_transformers_adapter() -> None:
    """A draft model the native runtime does not run (here: forced through the adapter)."""
    m = native("gemma3_text")
    ids = PROMPTS["repeated"]
    for draft in (HFModel(tiny_hf_model("gemma3_text")), HFModel(tiny_hf_model("qwen3", 1))):
        out, stats = run(m, sps(m, draft, draft_confidence=0.0), ids)
        assert out == reference(m, tuple(ids)) and stats.drafted > 0
    assert stats.accepted < stats.drafted  # the other model's drafts are often wrong


def test_registry_and_errors() -> None:
    assert METHODS["sps"].lossless and METHODS["sps"].needs_draft_model and is_lossless("sps")
    m = native("llama")
    with pytest.raises(ConfigError, match="method sps needs a draft model: pass --draft-model"):
        build_method("sps", m)
    with pytest.raises(ConfigError, match="draft model must be a model path or a loaded"):
        build_method("sps", m, MethodOptions(draft_model=42))
    with pytest.raises(ConfigError, match="--draft-model is empty"):
        MethodOptions(draft_model="")
    with pytest.raises(ConfigError, match="confidence"):
        DraftModelDrafter(m, 97, confidence=2.0)


class CountingModel:
    """A model that records how many tokens each forward fed."""

    def __init__(self, model) -> None:
        self.model, self.fed = model, []
        for attr in ("vocab_size", "max_context", "device", "dtype"):
            setattr(self, attr, getattr(model, attr))

    def new_cache(self, capacity=None):
        return self.model.new_cache(capacity)

    def forward(self, tokens, cache, **kw):
        self.fed.append(int(tokens.shape[0]))
        return self.model.forward(tokens, cache, **kw)


def greedy_chain(model, ids: list[int], k: int) -> list[int]:
    """k greedy tokens after ``ids`` from a fresh cache, no confidence stop."""
    cache = model.new_cache(len(ids) + k)
    logits = model.forward(torch.tensor(ids), cache).logits[-1:]
    out = []
    for _ in range(k):
        tok = logits.argmax(-1)
        out.append(int(tok))
        logits = model.forward(tok, cache).logits
    return out


def test_draft_cache_follows_the_context_and_feeds_only_what_is_new() -> None:
    draft = CountingModel(native("gemma3_text"))
    d = DraftModelDrafter(draft, 97, confidence=0.0)
    k = 5

    def propose(ctx: list[int], fed: list[int]) -> list[int]:
        draft.fed.clear()
        got = d.propose(Context(torch.tensor(ctx), 1), k)
        assert got.tokens.tolist() == greedy_chain(draft.model, ctx, k) and got.probs is None
        assert draft.fed == fed + [1] * (k - 1), (ctx, draft.fed)
        return got.tokens.tolist()

    ctx = PROMPTS["random"]
    x = propose(ctx, [len(ctx)])
    # all accepted + a bonus: the last draft token and the bonus are fed, nothing else
    ctx = ctx + x + [11]
    x = propose(ctx, [2])
    # two accepted + a bonus: the other draft tokens are rolled back, the bonus is fed
    ctx = ctx + x[:2] + [12]
    x = propose(ctx, [1])
    # a context that shares only its first 3 tokens with the cache
    ctx = ctx[:3] + [50, 51, 52]
    propose(ctx, [3])
    # the same context again: only its last token (whose logits are needed)
    propose(ctx, [1])
    # a new generation with a longer context than the cache was made for: grown and refilled
    d.reset()
    long = _random(300, 9)[:250]
    propose(long, [250])
    assert d.runner.cache.capacity == 256  # the tiny model's whole context
    # no room left in the draft model's context: nothing is drafted
    assert len(d.propose(Context(torch.tensor(_random(300, 9)[:257]), 1), 3)) == 0


def test_confidence_stop_keeps_the_first_unconfident_token() -> None:
    m = native("llama")
    ctx = torch.tensor(PROMPTS["random"])
    full = DraftModelDrafter(m, m.vocab_size, confidence=0.0).propose(Context(ctx, 12), 8)
    d = DraftModelDrafter(m, m.vocab_size, confidence=1.0)
    one = d.propose(Context(ctx, 12), 8)
    assert one.tokens.tolist() == full.tokens[:1].tolist()
    assert d.runner.cache.length == len(ctx)  # the context, no draft token fed


# --------------------------------------------------------------------------- sampling
V = 5  # the toy vocabulary of test_verify's exact-distribution harness
SAMPLED = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7_k3": SamplingParams(temperature=0.7, top_k=3),
    "t1.3_p0.9": SamplingParams(temperature=1.3, top_p=0.9),
}


@functools.lru_cache(maxsize=None)
def target_probs(prefix: tuple[int, ...], params: SamplingParams) -> torch.Tensor:
    m = native("llama", 0, V)
    logits = m.forward(torch.tensor(prefix), m.new_cache(len(prefix))).logits[-1]
    return logits_to_probs(logits, params).double()  # [V]


def target_joint(prefix: tuple[int, ...], params, length: int) -> torch.Tensor:
    out = torch.zeros((V,) * length, dtype=torch.float64)
    for seq in itertools.product(range(V), repeat=length):
        w = 1.0
        for i, y in enumerate(seq):
            w *= float(target_probs(prefix + seq[:i], params)[y])
        out[seq] = w
    return out


def continue_with_target(into: torch.Tensor, ctx, seq: tuple[int, ...], mass: float, params):
    """Add ``mass`` for ``seq`` to the joint ``into``, continuing a short ``seq`` with the target
    (what the next step emits if it is lossless)."""
    if len(seq) >= into.dim():
        into[seq[: into.dim()]] += mass
        return
    p = target_probs(ctx + seq, params)
    for y in range(V):
        if p[y] > 0:
            continue_with_target(into, ctx, seq + (y,), mass * float(p[y]), params)


@pytest.mark.parametrize("subset", [None, (4, 0, 2, 6)], ids=["full", "reduced"])
@pytest.mark.parametrize("pname", list(SAMPLED))
def test_sampled_drafts_are_exact(pname: str, subset) -> None:
    """The drafter's q is the draft model's processed distribution (a draft vocabulary of 7 cut
    to the target's 5, or a reduced head onto ids 0, 2, 4: q is the distribution over those and
    zero elsewhere); chains of 2 tokens drawn from it and verified by speculative sampling give
    exactly the target's joint of the next 3 tokens (enumerated, no sampling)."""
    params = SAMPLED[pname]
    draft = native("qwen3", 1, 7)
    vocab_ids = None if subset is None else torch.tensor(subset)
    d = DraftModelDrafter(draft, V, confidence=0.0, vocab_ids=vocab_ids)
    cols = torch.arange(V) if subset is None else torch.tensor([0, 2, 4])
    g = torch.Generator().manual_seed(0)
    ctx = (1, 3)

    @functools.lru_cache(maxsize=None)
    def q_of(prefix: tuple[int, ...]) -> torch.Tensor:
        got = d.propose(Context(torch.tensor(prefix), 2, params=params, generator=g), 1)
        assert got.probs.shape == (1, V)
        return got.probs[0]

    for prefix in [ctx, ctx + (4,), ctx + (0, 2)]:
        logits = draft.forward(torch.tensor(prefix), draft.new_cache(8)).logits[-1, cols]
        want = torch.zeros(V).index_copy_(0, cols, logits_to_probs(logits, params))
        torch.testing.assert_close(q_of(prefix), want)
    # a chain's second row is q after its first token; its tokens are possible under q
    for _ in range(5):
        chain = d.propose(Context(torch.tensor(ctx), 2, params=params, generator=g), 2)
        x = chain.tokens.tolist()
        assert len(x) == 2 and chain.probs.shape == (2, V) and chain.is_chain
        torch.testing.assert_close(chain.probs[0], q_of(ctx))
        torch.testing.assert_close(chain.probs[1], q_of(ctx + (x[0],)))
        assert all(float(chain.probs[i, t]) > 0 for i, t in enumerate(x))
    # exact: every chain the drafter can draw, weighted by q, verified against the target
    got = torch.zeros((V,) * 3, dtype=torch.float64)
    for x0, x1 in itertools.product(range(V), repeat=2):
        w = float(q_of(ctx)[x0]) * float(q_of(ctx + (x0,))[x1])
        if w == 0.0:
            continue
        draft_ = Draft.chain([x0, x1], torch.stack([q_of(ctx), q_of(ctx + (x0,))]))
        rows = torch.stack([target_probs(ctx + s, params).float() for s in ((), (x0,), (x0, x1))])
        for seq, mass in emitted_from_plan(draft_, speculative_plan(draft_, rows)).items():
            continue_with_target(got, ctx, seq, w * mass, params)
    assert_lossless(got, target_joint(ctx, params, 3))


def test_sampled_drafts_are_drawn_from_q() -> None:
    params = SAMPLED["t1"]
    d = DraftModelDrafter(native("qwen3", 1, 7), V, confidence=0.0)
    g = torch.Generator().manual_seed(5)
    ctx = Context(torch.tensor([1, 3]), 2, params=params, generator=g)
    n = 1500
    drafts = [d.propose(ctx, 1) for _ in range(n)]
    q = drafts[0].probs[0]
    counts = Counter(int(x.tokens[0]) for x in drafts)
    assert chi_square_ok(counts, {y: float(q[y]) for y in range(V)}, n)


@pytest.mark.parametrize("adaptive", [False, True], ids=["threshold", "adaptive"])
def test_engine_sampling_has_the_target_distribution(adaptive: bool) -> None:
    """End to end through the engine (Monte Carlo, seeded): 4 new tokens per run, so the first
    step drafts a chain of 2 with q; their joint matches the target's. A check of the plumbing
    (the sampling parameters and the generator reach the drafter, q reaches the verifier) that
    catches gross errors only; exactness is the enumeration of test_sampled_drafts_are_exact.
    ``adaptive``: a DraftStop whose costs make a chain's second token depend on how sure q was
    for the first, so on the context (drafted only where its top probability is high); sampled
    drafts are never cut after drafting."""
    params = SAMPLED["t0.7_k3"]
    target, draft = native("llama", 0, V), native("qwen3", 1, 7)
    stop = DraftStop(lambda n: 1.0, 0.13) if adaptive else None  # top q here: 0.35 to 0.49
    d = DraftModelDrafter(draft, V, confidence=0.0, stop=stop)  # vocabulary 7 cut to 5: q padded
    method = Method("sps", [d], FixedPolicy(d, 2), 2)
    want = target_joint((1, 3), params, 4)
    probs = {seq: float(want[seq]) for seq in itertools.product(range(V), repeat=4)}
    counts, n, drafted = Counter(), 800, 0
    lengths: list[int] = []
    propose = d.propose
    d.propose = lambda ctx, budget: (lambda x: lengths.append(len(x)) or x)(propose(ctx, budget))
    for seed in range(n):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed)
        out, stats = run(target, method, [1, 3], 4, p)
        counts[tuple(out)] += 1
        drafted += stats.drafted
    if adaptive:  # both lengths occur, decided by the context
        assert {1, 2} <= set(lengths), Counter(lengths)
    else:
        assert drafted >= n * 2  # every run drafted
    assert chi_square_ok(counts, probs, n)


def test_sampling_repeats_and_top_k_one_is_greedy() -> None:
    m = native("llama")
    ids = PROMPTS["repeated"]
    ref = reference(m, tuple(ids))
    for draft in (m, ShallowModel(m, 2)):
        method = sps(m, draft)
        assert run(m, method, ids, params=SamplingParams(temperature=0.8, top_k=1, seed=0))[0] == ref
        seeded = SamplingParams(temperature=0.8, seed=3)
        a = run(m, method, ids, 30, seeded)[0]
        assert a == run(m, method, ids, 30, seeded)[0] and len(a) == 30


# --------------------------------------------------------------------------- different tokenizers
TEXTS = ["Hello world, this is a test.\nAnd more", "the cat sat on the mat. the cat sat on the"]


@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_between_byte_vocabularies_equals_ar(family: str) -> None:
    """Target: byte ids 3..258; draft: the same bytes at ids 8..263 (another random model)."""
    ta, tb = byte_tokenizer(), byte_tokenizer(offset=5)
    m = native(family, 0, len(ta))
    draft = native("qwen3", 2, len(tb))
    drafted = 0
    for text, (draft_len, conf) in itertools.product(TEXTS, [(4, 0.0), (8, None)]):
        ids = ta.encode(text)
        method = sps(m, draft, ta, draft_tokenizer=tb, draft_len=draft_len, draft_confidence=conf)
        d = method.drafters[0]
        assert isinstance(d, TextBridgeDrafter) and d.start == [1]
        out, stats = run(m, method, ids)
        assert out == reference(m, tuple(ids)), (text, draft_len)
        drafted += stats.drafted
    # random bytes are rarely valid UTF-8, so many drafts bring no text; some do
    assert drafted > 0
    # the draft model loaded with its tokenizer through the API path (a loaded pair)
    seeded = SamplingParams(temperature=0.9, seed=1)
    method = sps(m, draft, ta, draft_tokenizer=tb)
    a = run(m, method, ta.encode(TEXTS[0]), 24, seeded)[0]
    assert a == run(m, method, ta.encode(TEXTS[0]), 24, seeded)[0] and len(a) == 24


def test_bridge_with_the_target_reindexed_drafts_right() -> None:
    """The draft model is the target with its vocabulary shuffled: the text bridge must hand the
    target exactly its own greedy continuation, so (nearly) every draft token is accepted."""
    ta, tb = char_tokenizer(), char_tokenizer(order_seed=1)
    assert len(ta) == 97 and ta.get_vocab() != tb.get_vocab()
    m = native("llama")
    draft = NativeModel.from_hf(reindexed(tiny_hf_model("llama"), ta, tb))
    for text in TEXTS:
        ids = ta.encode(text)
        ref = reference(m, tuple(ids))
        for draft_len in (3, 8):
            method = sps(m, draft, ta, draft_tokenizer=tb, draft_len=draft_len, draft_confidence=0.0)
            out, stats = run(m, method, ids)
            assert out == ref
            assert stats.accepted >= 0.9 * stats.drafted and stats.tokens_per_step > 2.5
    # under sampling the bridged drafts are deterministic (probs None) and top_k=1 is greedy
    method = sps(m, draft, ta, draft_tokenizer=tb)
    ids = ta.encode(TEXTS[0])
    params = SamplingParams(temperature=0.8, top_k=1, seed=0)
    assert run(m, method, ids, params=params)[0] == reference(m, tuple(ids))


def test_bridge_text_and_ids_follow_the_context() -> None:
    """Incremental decoding and re-tokenization (a frozen head, an open tail) give the text and
    draft ids a full decode and encode give, also when the context changes."""
    ta, tb = char_tokenizer(), char_tokenizer(order_seed=2)
    d = TextBridgeDrafter(native("llama"), ta, tb, 97, freeze_chars=16)
    text = "The quick brown fox jumps over the lazy dog.\nThen it sleeps, twice: zz zz zz!"
    ids = ta.encode(text)
    for n in list(range(1, len(ids) + 1, 3)) + [5, len(ids)]:
        got = d.context_text(ids[:n])
        assert got == ta.decode(ids[:n], skip_special_tokens=True)
        assert d.draft_ids(got) == tb.encode(got)  # <bos> + one id per character
    assert d._frozen_text  # the head was frozen along the way
    # byte-level: a character split over two tokens decodes once both are there
    bt = byte_tokenizer()
    d = TextBridgeDrafter(native("llama"), bt, byte_tokenizer(offset=3), 97)
    ids = bt.encode("caf\u00e9 ok")
    assert d.context_text(ids[:5]).endswith("\ufffd")
    assert d.context_text(ids) == "caf\u00e9 ok"


def test_unbridgeable_vocabularies_are_refused_in_one_line() -> None:
    m = native("llama")
    ta = char_tokenizer()
    lower = char_tokenizer(chars="\n abcdefghijklmnopqrstuvwxyz.,")  # no capitals, no digits
    with pytest.raises(ConfigError) as e:
        sps(m, native("qwen3", 1, len(lower)), ta, draft_tokenizer=lower)
    msg = str(e.value)
    assert "cannot be bridged" in msg and "draft tokenizer" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="target tokenizer does not reproduce"):
        check_bridgeable(lower, ta)
    # different vocabulary sizes and no tokenizer to bridge them with
    other = native("qwen3", 1, 50)
    with pytest.raises(ConfigError, match="tokenizer is missing"):
        sps(m, other)
    with pytest.raises(ConfigError, match="target model's tokenizer is missing"):
        make_draft_model_drafter(m, other, None, ta)
    # the same tokenizer object, or equal vocabularies: token level even with padded sizes
    assert isinstance(sps(m, native("qwen3", 1, 120), ta, draft_tokenizer=ta).drafters[0],
                      DraftModelDrafter)
    d = sps(m, native("qwen3", 1, 120), ta, draft_tokenizer=char_tokenizer()).drafters[0]
    assert isinstance(d, DraftModelDrafter) and d.vocab == 97
    assert set(CHARS) <= set(ta.get_vocab())


# --------------------------------------------------------------------------- CLI, API, shrink
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sps")
    return {
        "target": save_tiny_model_dir(base / "target", "llama"),
        "draft": save_tiny_model_dir(base / "draft", "qwen3", seed=1),
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_a_draft_model(capsys, tiny_dirs, tmp_path):
    args = ["generate", "hello there", "--model", str(tiny_dirs["target"]), "--dtype", "float32",
            "--max-new-tokens", "16"]
    code, ar_out, err = cli(capsys, *args)
    assert code == 0, err
    code, out, err = cli(capsys, *args, "--method", "sps", "--draft-model", str(tiny_dirs["draft"]))
    assert code == 0 and out == ar_out and "method sps" in err, err
    # a draft model cut from the target (its first 2 layers), then used
    shrunk = tmp_path / "shrunk"
    code, _, err = cli(capsys, "draft-model", "shrink", "--model", str(tiny_dirs["target"]),
                       "--layers", "2", "--out", str(shrunk), "--dtype", "float32")
    assert code == 0 and "not a trained drafter" in err, err
    code, out, err = cli(capsys, *args, "--method", "sps", "--draft-model", str(shrunk))
    assert code == 0 and out == ar_out, err
    code, _, err = cli(capsys, "draft-model", "shrink", "--model", str(tiny_dirs["target"]),
                       "--layers", "2", "--out", str(shrunk))
    assert code == 2 and "not an empty directory" in err


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_shrunk_model_is_the_targets_first_layers(tiny_dirs, tmp_path, family):
    from genrefine.models.shrink import shrink_model

    src = save_tiny_model_dir(tmp_path / f"src-{family}", family)
    out = shrink_model(str(src), 2, tmp_path / f"shrunk-{family}", dtype="float32")
    target, _ = load_model(str(src), dtype="float32", quiet=True)
    shrunk, tok = load_model(str(out), dtype="float32", quiet=True)
    assert shrunk.num_layers == 2 and len(tok) == len(byte_tokenizer())
    x = torch.tensor(_random(20, 4))
    want = target.forward(x, target.new_cache(20), layers=[0, 1]).logits
    got = shrunk.forward(x, shrunk.new_cache(20)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shrink_refuses_too_many_layers(tmp_path):
    from genrefine.models.shrink import shrink_model

    src = save_tiny_model_dir(tmp_path / "src", "llama")
    with pytest.raises(ConfigError, match="--layers must be between 1 and 3"):
        shrink_model(str(src), 4, tmp_path / "x")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "hi", "--method", "sps"], "method sps needs a draft model: add --draft-model"),
        (["generate", "hi", "--method", "sps", "--draft-model", "/no/such/draft"], "does not exist"),
        (["demo", "--methods", "ar,sps"], "method sps needs a draft model"),
        (["draft-model", "shrink", "--layers", "0", "--out", "OUT", "--model", "/no/such"],
         "does not exist"),
    ],
)
def test_cli_errors(capsys, tmp_path, argv, needle):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_bench_sps_and_hf_assisted(capsys, tiny_dirs, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "rag", "turns": ["abc abc abc"]}) + "\n")
    code, _, err = cli(
        capsys, "bench", "--no-progress", "--questions", str(q), "--model",
        str(tiny_dirs["target"]), "--draft-model", str(tiny_dirs["draft"]), "--dtype", "float32",
        "--methods", "sps,hf_generate,hf_assisted", "--quick", "--json", str(tmp_path / "b.json"),
    )
    assert code == 0, err
    r = json.loads((tmp_path / "b.json").read_text())
    m = r["methods"]
    assert list(m) == ["ar", "sps", "hf_generate", "hf_assisted"]
    assert m["sps"]["lossless"] is True and m["sps"]["acceptance_rate"] is not None
    same, compared = m["hf_assisted"]["same_as_reference"]  # against hf_generate's tokens
    assert compared == 1 and m["hf_assisted"]["lossless"] is (same == compared)
    assert r["draft_model"] == str(tiny_dirs["draft"].resolve())
