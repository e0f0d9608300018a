"""Retrieval drafting: the suffix array against naive scans, longest-match selection, the
safetensors datastore and its checks, ``index build``, suffix decoding, and greedy identity with
``ar`` through the engine."""

from __future__ import annotations

import functools
import json
import struct

import numpy as np
import pytest
import torch

from genrefine.methods.base import Context, Drafter
from genrefine.methods.parts.datastore import SEP, Datastore, build_datastore, context_lookup, index_build_main, suffix_array, text_files
from genrefine.methods.rest import RetrievalDrafter
from genrefine.engine import Engine, Stats
from genrefine.errors import ConfigError, GenrefineError
from genrefine.methods.base import MethodOptions
from genrefine.registry import build_method
from genrefine.models.runtime import NativeModel
from genrefine.types import SamplingParams
from tiny import byte_tokenizer, tiny_hf_model


def random_docs(seed: int, vocab: int, n_docs: int = 5, max_len: int = 40) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(0, vocab, int(g.integers(0, max_len))).tolist() for _ in range(n_docs)]


def naive_continuations(docs, pattern, max_len):
    """Every occurrence of pattern followed by a token of the same document: what follows."""
    m = len(pattern)
    return [
        d[i + m : i + m + max_len]
        for d in docs
        for i in range(len(d) - m)
        if d[i : i + m] == pattern
    ]


def naive_longest(docs, context, max_match, min_match):
    for m in range(min(max_match, len(context)), min_match - 1, -1):
        if naive_continuations(docs, context[len(context) - m :], 1):
            return m
    return 0


# ---------------------------------------------------------------------------- the index
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("vocab", [2, 3, 7])
def test_suffix_array_sorts_suffixes(seed, vocab):
    ds = Datastore.from_documents(random_docs(seed, vocab))
    t = ds.tokens.tolist()

    def key(i):  # compare up to and including the first separator (separators lowest)
        j = t.index(SEP, i)
        return t[i:j] + [-1]

    keys = [key(int(s)) for s in ds.sa]
    assert keys == sorted(keys)
    assert sorted(ds.sa.tolist()) == [i for i, x in enumerate(t) if x != SEP]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("vocab", [2, 3, 6])
def test_continuations_match_naive_search(seed, vocab):
    docs = random_docs(seed, vocab, n_docs=4 + seed)
    ds = Datastore.from_documents(docs)
    g = np.random.default_rng(100 + seed)
    for _ in range(25):
        pattern = g.integers(0, vocab, int(g.integers(1, 5))).tolist()
        lo, hi = ds.match_range(pattern)
        want = naive_continuations(docs, pattern, 6)
        assert hi - lo == len(want)
        got = ds.continuations(len(pattern), lo, hi, 6, max_candidates=1000)
        assert sorted(got) == sorted(want)  # boundaries respected: no separator, no run-over
        # a sample of the occurrences: distinct occurrences, each a real continuation
        few = ds.continuations(len(pattern), lo, hi, 6, max_candidates=3)
        assert len(few) == min(3, len(want))
        pool = list(want)
        for c in few:
            pool.remove(c)


@pytest.mark.parametrize("seed", range(5))
def test_longest_match_is_the_longest(seed):
    vocab = 3
    docs = random_docs(seed, vocab, n_docs=6, max_len=30)
    ds = Datastore.from_documents(docs)
    g = np.random.default_rng(seed)
    for _ in range(30):
        ctx = g.integers(0, vocab, int(g.integers(0, 12))).tolist()
        for max_match, min_match in [(16, 2), (4, 1), (3, 3)]:
            m, lo, hi = ds.longest_match(ctx, max_match, min_match)
            assert m == naive_longest(docs, ctx, max_match, min_match), (ctx, max_match, min_match)
            if m:
                want = naive_continuations(docs, ctx[len(ctx) - m :], 4)
                assert sorted(ds.continuations(m, lo, hi, 4, 1000)) == sorted(want)
                assert ds.lookup(ctx, 4, 1000, max_match, min_match)[0] == m


def naive_context(tokens, max_len, max_candidates, max_match, min_match):
    """O(L^2) reference: earlier ends of the longest suffix, latest first."""
    n = len(tokens)
    for m in range(min(max_match, n - 1), min_match - 1, -1):
        suffix = tokens[n - m :]
        ends = [e for e in range(n - 2, m - 2, -1) if tokens[e - m + 1 : e + 1] == suffix]
        if ends:
            return m, [tokens[e + 1 : e + 1 + max_len] for e in ends[:max_candidates]]
    return 0, []


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("vocab", [2, 5])
def test_context_lookup_matches_naive(seed, vocab):
    tokens = np.random.default_rng(seed).integers(0, vocab, 50).tolist()
    for length in range(0, len(tokens) + 1, 2):
        prefix = tokens[:length]
        for args in [(5, 64, 16, 2), (3, 2, 4, 1), (8, 3, 2, 2)]:
            got = context_lookup(np.array(prefix, dtype=np.int64), *args)
            assert got == naive_context(prefix, *args), (length, args)


def test_longest_match_prefers_longer_and_skips_document_ends():
    ds = Datastore.from_documents([[5, 1, 2, 3], [9, 2, 3, 7, 8], [1, 2, 3, 4]])
    # "1 2 3" ends document 0 (nothing follows) but continues in document 2
    assert ds.lookup([0, 1, 2, 3], 5, max_match=8, min_match=2) == (3, [[4]])
    # "2 3" alone: documents 1 and 2, latest first
    assert ds.lookup([6, 2, 3], 5, max_match=8, min_match=2) == (2, [[4], [7, 8]])
    assert ds.lookup([3, 4], 5) == (0, [])  # "3 4" ends its document
    assert ds.lookup([7], 5) == (0, [])  # shorter than min_match
    empty = Datastore.from_documents([])
    assert empty.lookup([1, 2], 4) == (0, []) and empty.num_documents == 0


def test_suffix_array_repeats_and_sizes():
    doc = [1, 2] * 50
    ds = Datastore.from_documents([doc, doc, [3]])
    assert ds.num_documents == 3 and ds.num_tokens == 201
    assert ds.sa.dtype == np.int32
    assert suffix_array(np.array([SEP], dtype=np.int32)).tolist() == []
    assert ds.documents() == [doc, doc, [3]]
    with pytest.raises(ConfigError):
        Datastore.from_documents([[1, -1, 2]])


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip_is_safetensors(tmp_path):
    docs = random_docs(0, 9)
    ds = Datastore.from_documents(docs, tokenizer_name="tok-a", vocab_size=9)
    path = ds.save(tmp_path / "store.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert set(header) == {"__metadata__", "tokens", "suffix_array"}
    assert header["__metadata__"]["tokenizer"] == "tok-a"
    assert header["__metadata__"]["vocab_size"] == "9"
    back = Datastore.load(path, tokenizer_name="tok-a", vocab_size=9)
    assert np.array_equal(back.tokens, ds.tokens) and np.array_equal(back.sa, ds.sa)
    assert (back.tokenizer_name, back.vocab_size) == ("tok-a", 9)
    assert back.num_documents == ds.num_documents
    assert back.documents() == [d for d in docs if d]


def test_load_rejects_other_tokenizers_and_other_files(tmp_path):
    path = Datastore.from_documents([[1, 2, 3]], "tok-a", 300).save(tmp_path / "s.safetensors")
    with pytest.raises(GenrefineError, match="'tok-a'.*300.*'tok-b'.*97"):
        Datastore.load(path, tokenizer_name="tok-b", vocab_size=97)
    with pytest.raises(GenrefineError, match="vocabulary 300.*vocabulary 97"):
        Datastore.load(path, tokenizer_name="tok-a", vocab_size=97)
    with pytest.raises(GenrefineError, match="does not exist"):
        Datastore.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x03not a safetensors file at all")
    with pytest.raises(GenrefineError, match="not a genrefine datastore"):
        Datastore.load(junk)
    with pytest.raises(GenrefineError, match="cannot write"):
        Datastore.from_documents([[1]]).save(tmp_path / "no-such-dir" / "x.safetensors")
    bad = Datastore.from_documents([[1, 5]], "tok-a", 3).save(tmp_path / "bad.safetensors")
    with pytest.raises(GenrefineError, match="damaged"):  # an id past the recorded vocabulary
        Datastore.load(bad)


def test_build_datastore_from_folder_and_texts(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "sub" / "b.py").write_text("print('hi')")
    (tmp_path / "c.bin").write_text("skipped")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.md").write_text("skipped")
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.py"]
    ds = build_datastore(tmp_path, tok, progress=False, tokenizer_name="bytes")
    assert ds.num_documents == 2 and ds.vocab_size == len(tok)
    assert [tok.decode(d) for d in ds.documents()] == ["hello world", "print('hi')"]
    ds2 = build_datastore(["hello world", ""], tok, progress=False)
    assert ds2.documents() == [tok("hello world", add_special_tokens=False).input_ids]


def test_index_build_main(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny-model"  # only the tokenizer is read: no weights needed
    byte_tokenizer().save_pretrained(str(model_dir))
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 259}))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "x.md").write_text("# title\nsome text, some text\n")
    out = tmp_path / "idx.safetensors"
    assert index_build_main(corpus, str(model_dir), out) == 0
    line = capsys.readouterr().out.strip()
    assert "documents" in line and "tokens" in line and str(out) in line and "\n" not in line
    ds = Datastore.load(out, tokenizer_name="tiny-model", vocab_size=len(byte_tokenizer()))
    assert ds.num_documents == 1 and ds.num_tokens == len("# title\nsome text, some text\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenrefineError, match="holds no text files"):
        index_build_main(tmp_path / "empty", str(model_dir), out)
    with pytest.raises(GenrefineError, match="does not exist"):
        index_build_main(tmp_path / "nowhere", str(model_dir), out)
    with pytest.raises(GenrefineError, match="cannot write"):
        index_build_main(corpus, str(model_dir), corpus / "x.md" / "idx")
    with pytest.raises(GenrefineError, match="is a folder"):
        index_build_main(corpus, str(model_dir), corpus)


# ---------------------------------------------------------------------------- the drafter
def test_drafter_proposes_a_frequency_tree():
    ds = Datastore.from_documents([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]])
    d = RetrievalDrafter(ds, grow=False, context=False)
    assert isinstance(d, Drafter) and d.name == "rest"
    draft = d.propose(Context(torch.tensor([7, 1, 2]), 3), 8)
    assert draft.probs is None
    assert draft.tokens.tolist() == [3, 4, 9, 5] and draft.parents.tolist() == [-1, 0, 0, -1]
    chain_drafter = RetrievalDrafter(ds, grow=False, context=False, tree=False)
    chain = chain_drafter.propose(Context(torch.tensor([1, 2]), 2), 8)
    assert chain.is_chain and chain.tokens.tolist() == [3, 4]
    assert len(d.propose(Context(torch.tensor([8, 8]), 2), 8)) == 0
    # the context's own match is longer than the datastore's ("1 2"): it wins
    both = RetrievalDrafter(ds, grow=False)
    draft = both.propose(Context(torch.tensor([0, 1, 2, 6, 6, 0, 1, 2]), 8), 8)
    assert draft.tokens.tolist() == [6, 6, 0, 1, 2]
    # equal lengths pool the sources, the context's first
    draft = both.propose(Context(torch.tensor([1, 2, 8, 1, 2]), 5), 8)
    assert draft.tokens.tolist() == [3, 4, 9, 8, 1, 2, 5]  # by count, then the context first
    with pytest.raises(ConfigError):
        RetrievalDrafter(max_match=1, min_match=2)


def test_grow_remembers_finished_generations():
    d = RetrievalDrafter(grow=True)
    assert len(d.propose(Context(torch.tensor([1, 2, 3]), 3), 4)) == 0
    d.reset()  # commits [1, 2, 3]
    assert d.grown is not None and d.grown.documents() == [[1, 2, 3]]
    draft = d.propose(Context(torch.tensor([5, 1, 2]), 3), 4)
    assert draft.tokens.tolist() == [3]
    d.reset()
    d.reset()  # nothing new: nothing added
    assert d.grown.documents() == [[1, 2, 3], [5, 1, 2]]
    small = RetrievalDrafter(grow=True, max_grow_tokens=4)
    small.add_document([1, 2, 3])
    small.add_document([4, 5])
    assert small.grown.documents() == [[4, 5]]


# ---------------------------------------------------------------------------- the engine
@functools.lru_cache(maxsize=None)
def native(family: str = "llama"):
    return NativeModel.from_hf(tiny_hf_model(family))


def generate(model, method, prompt, max_new=32):
    stats = Stats(method.name)
    chunks = Engine(model, method).generate(prompt, max_new, SamplingParams(), stats=stats)
    out = [t for c in chunks for t in c]
    return out, stats


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def test_suffix_decoding_speeds_up_a_repeat(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    m = native()
    want, _ = generate(m, build_method("ar", m), _prompt(3, 12))
    method = build_method("rest", m, MethodOptions(draft_len=16))
    first, s1 = generate(m, method, _prompt(3, 12))
    second, s2 = generate(m, method, _prompt(3, 12))
    assert first == second == want
    assert s2.tokens_per_step > 4.0 and s2.steps < s1.steps
    without = build_method("rest", m, MethodOptions(draft_len=16))
    without.drafters[0].grow = False
    generate(m, without, _prompt(3, 12))
    _, s3 = generate(m, without, _prompt(3, 12))
    assert s3.steps == s1.steps  # the speed-up came from the remembered generation


def test_rest_greedy_equals_ar_with_a_datastore(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    m = native()
    prompts = [_prompt(s, 10) for s in range(3)]
    ar = [generate(m, build_method("ar", m), p)[0] for p in prompts]
    # a corpus that holds the right answers for two prompts and noise, plus wrong continuations
    docs = [
        prompts[0] + ar[0],
        _prompt(9, 50),
        prompts[1][-4:] + ar[1][:5] + [5, 6, 7],
        prompts[1] + ar[1],
    ]
    path = Datastore.from_documents(docs, m.name, m.vocab_size).save(tmp_path / "ds.safetensors")
    method = build_method("rest", m, MethodOptions(datastore=str(path)))
    stats_all = []
    for p, want in zip(prompts, ar):
        got, stats = generate(m, method, p)
        assert got == want
        stats_all.append(stats)
    assert stats_all[0].tokens_per_step > 4.0
    # chains only, as for models that cannot verify trees
    m.supports_trees, before = False, m.supports_trees
    try:
        chain_method = build_method("rest", m, MethodOptions(datastore=str(path), draft_len=6))
        for p, want in zip(prompts, ar):
            assert generate(m, chain_method, p)[0] == want
    finally:
        m.supports_trees = before
    other = Datastore.from_documents(docs, "another-model", m.vocab_size)
    other = other.save(tmp_path / "o.safetensors")
    with pytest.raises(GenrefineError, match="another-model"):
        build_method("rest", m, MethodOptions(datastore=str(other)))
