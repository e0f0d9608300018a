"""The llama.cpp backend (``genrefine/models/llamacpp.py``) on the embedded Gemma 3 270M GGUF.

Everything but the missing-extra message skips unless llama-cpp-python is installed (the
``genrefine[llamacpp]`` extra). llama.cpp loads the 270M GGUF in well under a second, so the fast
suite runs the core checks on the real model:

* hand-built cases: a chain forward's rows equal one-token forwards, rollback frees the cells
  (a re-run gives the same logits), a tree forward's rows equal the chain forward of each node's
  path, ``keep`` leaves the accepted path as the committed prefix;
* ``ar`` equals llama-cpp-python's own greedy completion (``Llama.generate``);
* the lossless methods equal this backend's ``ar`` token for token on one prompt; the slow suite
  repeats it over more prompts and longer generations, with ``sps`` on a llama.cpp draft model;
* methods that need intermediate layers, and a missing extra, fail in one line.
"""

from __future__ import annotations

import sys

import pytest
import torch

from genrefine.cli import main
from genrefine.engine import Engine
from genrefine.errors import GenrefineError
from genrefine.registry import METHODS, build_method
from genrefine.methods.base import MethodOptions
from genrefine.models.llamacpp import INSTALL_HINT, BackendUnavailable, import_llama_cpp, is_available
from genrefine.types import SamplingParams
from genrefine.verify import build_tree

needs_llama = pytest.mark.skipif(
    not is_available(), reason=f"llama-cpp-python is not installed: {INSTALL_HINT}"
)
GREEDY = SamplingParams()
PROMPTS = [
    # copies from its prompt: prompt lookup and retrieval accept long drafts
    "The city council met on Tuesday to discuss the new public library. The library will open in "
    "March and will hold forty thousand books. Summarize: The city council met on Tuesday to",
    "Once upon a time, in a small village by the sea, there lived",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]
# the lossless methods this backend runs (sps needs a draft model: tested on its own)
LOSSLESS = [
    n for n, info in METHODS.items()
    if info.lossless and n != "ar" and not info.native_only and not info.needs_draft_model
]


@pytest.fixture(scope="module")
def model():
    from genrefine.models.default import embedded_model_path
    from genrefine.models.llamacpp import LlamaCppModel

    m = LlamaCppModel(embedded_model_path(), n_ctx=1024)
    yield m
    m.close()


@pytest.fixture(scope="module")
def _cost_cache(tmp_path_factory):
    """``auto`` measures a cost table once per model key: measure into a throwaway cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENREFINE_CACHE", str(tmp_path_factory.mktemp("genrefine-cache")))
        yield


@pytest.fixture(scope="module")
def ar_tokens(model):
    """``(prompt ids, n) -> ar's greedy tokens``, generated once per module: each method's test
    compares with the same reference instead of decoding it again (a CI-time saving: ar's 96
    tokens on three prompts took about 15 s of every long test on an AMD EPYC)."""
    done: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def get(prompt_ids, n=32) -> list[int]:
        key = (tuple(prompt_ids), n)
        if key not in done:
            done[key] = generate(model, build_method("ar", model), prompt_ids, n)
        return done[key]

    return get


def generate(model, method, prompt_ids, n=32) -> list[int]:
    out: list[int] = []
    for chunk in Engine(model, method).generate(prompt_ids, n, GREEDY, frozenset({1, 106})):
        out.extend(chunk)
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Logit rows that agree up to rounding (cells in another order, a build that is not
    batch-invariant): centred, their cosine similarity passes 0.99 (two different positions'
    rows score far below)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return bool(torch.nn.functional.cosine_similarity(a - a.mean(), b - b.mean(), dim=0) > 0.99)


def _rand(n, seed, vocab=200_000) -> torch.Tensor:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the missing extra
def test_missing_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(BackendUnavailable, match=r"pip install 'genrefine\[llamacpp\]'"):
        import_llama_cpp()
    assert not is_available()
    assert main(["generate", "hello", "--backend", "llama.cpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "genrefine[llamacpp]" in err and "GGML_NATIVE=OFF" in err


def test_unknown_backend_is_one_line(capsys):
    assert main(["generate", "hello", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown backend 'vllm'" in err


# ----------------------------------------------------------------------------- hand-built cases
@needs_llama
def test_chain_rows_equal_one_token_forwards(model):
    prompt, seq = _rand(40, 0), _rand(7, 1)
    cache = model.new_cache(64)
    model.forward(prompt, cache, logits_rows=torch.tensor([39]))
    singles = torch.cat([model.forward(t.view(1), cache).logits for t in seq])  # [7, V]
    cache.rollback(7)
    batch = model.forward(seq, cache).logits  # [7, V]
    assert cache.length == 47
    if model.bitwise_exact:
        assert torch.equal(batch, singles)
    else:  # a llama.cpp build with llamafile kernels: rows round differently
        assert _close(batch, singles)


@needs_llama
def test_rollback_frees_cells_and_logits_repeat(model):
    lc = import_llama_cpp()
    prompt, seq = _rand(30, 2), _rand(6, 3)
    cache = model.new_cache(64)
    model.forward(prompt, cache, logits_rows=torch.zeros(0, dtype=torch.long))
    first = model.forward(seq, cache).logits
    cache.rollback(4)
    assert cache.length == 32
    assert lc.llama_memory_seq_pos_max(model._mem, 0) == 31
    again = model.forward(seq[2:], cache).logits
    assert torch.equal(again, first[2:])
    # logits_rows: a subset, in the order asked
    cache.rollback(4)
    rows = model.forward(seq[2:], cache, logits_rows=torch.tensor([3, 0])).logits
    assert torch.equal(rows, first[[5, 2]])
    with pytest.raises(ValueError):
        cache.rollback(cache.length + 1)
    # a newer cache replaces this one
    model.new_cache(8)
    with pytest.raises(RuntimeError, match="one live cache"):
        cache.rollback(1)


@needs_llama
def test_tree_rows_equal_the_chain_of_each_path(model):
    lc = import_llama_cpp()
    prompt = _rand(20, 4)
    #        root
    #       /    \
    #      0      3
    #     / \      \
    #    1   2      4
    #        |
    #        5
    parents = torch.tensor([-1, 0, 0, -1, 3, 2])
    draft = _rand(6, 5)
    root = torch.tensor([7])
    info = build_tree(parents)
    paths = {0: [0], 1: [0, 1], 2: [0, 2], 3: [3], 4: [3, 4], 5: [0, 2, 5]}

    path_rows = {}
    for node, path in paths.items():  # chain forwards of root + each node's path
        chain_cache = model.new_cache(64)
        model.forward(prompt, chain_cache, logits_rows=torch.zeros(0, dtype=torch.long))
        path_rows[node] = model.forward(torch.cat([root, draft[path]]), chain_cache).logits

    cache = model.new_cache(64)
    model.forward(prompt, cache, logits_rows=torch.zeros(0, dtype=torch.long))
    start = cache.length
    positions = start + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
    tree = model.forward(
        torch.cat([root, draft]), cache, positions=positions, tree_mask=info.mask_with_root
    ).logits  # [7, V]
    assert cache.length == start + 7
    for node, rows in path_rows.items():
        assert _close(tree[node + 1], rows[-1]), node
    assert not _close(tree[4], path_rows[4][-1])  # node 3's row is not node 4's
    if model.bitwise_exact:
        # bit for bit where the path's cells are those of its chain forward (the first branch);
        # elsewhere the attention sums run over the cells in another order (module docstring)
        assert torch.equal(tree[0], path_rows[0][0])
        for node in (0, 1):
            assert torch.equal(tree[node + 1], path_rows[node][-1]), node

    # keep root -> 0 -> 2 -> 5: those become the committed prefix, nothing else stays
    cache.keep(start, torch.tensor([0, 1, 3, 6]))
    assert cache.length == start + 4
    for s in range(1, 6):
        assert lc.llama_memory_seq_pos_max(model._mem, s) == -1
    assert lc.llama_memory_seq_pos_max(model._mem, 0) == start + 3
    nxt = model.forward(torch.tensor([11]), cache).logits
    ref = model.new_cache(64)
    model.forward(prompt, ref, logits_rows=torch.zeros(0, dtype=torch.long))
    model.forward(torch.cat([root, draft[[0, 2, 5]]]), ref, logits_rows=torch.zeros(0, dtype=torch.long))
    want = model.forward(torch.tensor([11]), ref).logits
    assert _close(nxt, want)


@needs_llama
def test_keep_a_branch_other_than_the_first_and_reject_non_paths(model):
    prompt = _rand(10, 6)
    parents = torch.tensor([-1, -1, 1])  # root -> 0 ; root -> 1 -> 2
    info = build_tree(parents)
    cache = model.new_cache(32)
    model.forward(prompt, cache, logits_rows=torch.zeros(0, dtype=torch.long))
    positions = 10 + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
    toks = torch.cat([torch.tensor([5]), _rand(3, 7)])
    model.forward(toks, cache, positions=positions, tree_mask=info.mask_with_root)
    with pytest.raises(ValueError, match="path"):
        cache.keep(10, torch.tensor([0, 1, 3]))  # 0 and 2 are on different branches
    cache.keep(10, torch.tensor([0, 2, 3]))
    assert cache.length == 13
    nxt = model.forward(torch.tensor([9]), cache).logits
    ref = model.new_cache(32)
    model.forward(torch.cat([prompt, toks[[0, 2, 3]]]), ref, logits_rows=torch.zeros(0, dtype=torch.long))
    want = model.forward(torch.tensor([9]), ref).logits
    assert _close(nxt, want)


@needs_llama
def test_final_hidden_state_and_refusals(model):
    cache = model.new_cache(32)
    toks = _rand(5, 8)
    out = model.forward(toks, cache, hidden_layers=(model.num_layers,), logits_rows=torch.tensor([4]))
    assert out.hidden[model.num_layers].shape == (5, model.hidden_size)
    assert out.logits.shape == (1, model.vocab_size)
    cache.rollback(5)
    plain = model.forward(toks, cache, logits_rows=torch.tensor([4])).logits
    assert torch.equal(plain, out.logits)
    with pytest.raises(GenrefineError, match="final hidden state"):
        model.forward(toks[:1], cache, hidden_layers=(3,))
    with pytest.raises(GenrefineError, match="native runtime"):
        model.forward(toks[:1], cache, layers=[0, 1])
    for name in ("early-exit-draft", "swift", "calm"):
        with pytest.raises(GenrefineError, match="llama.cpp backend"):
            build_method(name, model)


# ----------------------------------------------------------------------------- greedy identity
@needs_llama
def test_ar_equals_llama_cpp_pythons_greedy_completion(model):
    from genrefine.bench.baselines import plain_llama

    llm = plain_llama(model.path, n_ctx=512, n_threads=model.n_threads)
    prompt = model.tokenize(PROMPTS[1])
    want = []
    for t in llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if t in (1, 106):
            break
        want.append(int(t))
        if len(want) == 40:
            break
    del llm
    assert generate(model, build_method("ar", model), prompt, 40) == want


@needs_llama
def test_the_stock_baselines_worker_runs_llama_cpp_python_in_a_child(model):
    """llamacpp_plain's child process (bench/llamacpp_worker.py run as a script), here on
    genrefine's own library (the stock one is built only when the bench asks for it)."""
    from pathlib import Path

    from genrefine.bench.baselines import LlamaCppStockBackend

    lib = Path(import_llama_cpp().__file__).parent / "lib"
    b = LlamaCppStockBackend(str(model.path), [1, 106], 512, model.n_threads, lib)
    try:
        assert b.system_info == model.system_info.strip()  # the library LLAMA_CPP_LIB_PATH named
        r = b.run(model.tokenize(PROMPTS[1]), 12, 0.0, None)
        assert len(r.token_ids) == 12 or r.ended_eos
        assert r.seconds > 0 and r.prompt_tokens == len(model.tokenize(PROMPTS[1]))
    finally:
        b.close()


@needs_llama
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_methods_equal_ar(model, name, ar_tokens, _cost_cache):
    if not model.bitwise_exact:
        pytest.skip("this llama-cpp-python build rounds batched rows differently: rebuild it "
                    f"with {INSTALL_HINT}")
    prompt = model.tokenize(PROMPTS[0])
    want = ar_tokens(prompt)
    assert generate(model, build_method(name, model), prompt) == want


@needs_llama
def test_rest_with_a_datastore_equals_ar(model, tmp_path, _cost_cache):
    from genrefine.methods.parts.datastore import Datastore

    prompt = model.tokenize(PROMPTS[1])
    want = generate(model, build_method("ar", model), prompt)
    docs = [prompt + want, _rand(40, 9).tolist(), prompt[-4:] + want[:5] + [5, 6, 7]]
    path = Datastore.from_documents(docs, model.name, model.vocab_size).save(tmp_path / "ds.safetensors")
    method = build_method("rest", model, MethodOptions(datastore=str(path)))
    stats_engine = Engine(model, method)
    got: list[int] = []
    for chunk in stats_engine.generate(prompt, 32, GREEDY, frozenset({1, 106})):
        got.extend(chunk)
    if model.bitwise_exact:
        assert got == want


@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_methods_equal_ar_long(model, name, ar_tokens, _cost_cache):
    if not model.bitwise_exact:
        pytest.skip(f"this llama-cpp-python build is not batch-invariant: {INSTALL_HINT}")
    method = build_method(name, model)
    for text in PROMPTS:
        prompt = model.tokenize(text)
        want = ar_tokens(prompt, 96)
        assert generate(model, method, prompt, 96) == want, text[:30]


@pytest.mark.slow
@needs_llama
def test_sps_with_a_llama_cpp_draft_model_equals_ar(model, _cost_cache):
    if "sps" not in METHODS:
        pytest.skip("no sps method in this genrefine")
    if not model.bitwise_exact:
        pytest.skip(f"this llama-cpp-python build is not batch-invariant: {INSTALL_HINT}")
    from genrefine.models.llamacpp import LlamaCppModel

    draft = LlamaCppModel(model.path, name=model.name, n_ctx=1024)  # its own context
    try:
        method = build_method("sps", model, MethodOptions(draft_model=draft))
        for text in PROMPTS[:2]:
            prompt = model.tokenize(text)
            want = generate(model, build_method("ar", model), prompt, 48)
            assert generate(model, method, prompt, 48) == want
    finally:
        draft.close()


# ----------------------------------------------------------------------------- loading, auto
@pytest.mark.slow
@needs_llama
def test_load_with_backend_llama_cpp():
    import genrefine
    from genrefine.models.llamacpp import LlamaCppModel

    gen = genrefine.load(backend="llama.cpp", quiet=True)
    assert isinstance(gen.model, LlamaCppModel)
    out = gen.generate("The capital of France is", max_new_tokens=8, method="pld")
    assert out.token_ids == gen.generate("The capital of France is", max_new_tokens=8).token_ids


@needs_llama
def test_auto_measures_once_and_caches_its_choice(model, tmp_path, monkeypatch):
    from genrefine.models import backend_choice, loading
    from genrefine.models.llamacpp import LlamaCppModel

    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    calls = []

    def fake_load(backend):
        calls.append(backend)
        return model if backend == "llama.cpp" else object()

    monkeypatch.setattr(
        backend_choice, "decode_seconds", lambda m: 0.1 if isinstance(m, LlamaCppModel) else 0.3
    )
    src = loading.resolve_source(None)
    args = (src, "fingerprint", torch.bfloat16, torch.device("cpu"), fake_load, lambda msg: None)
    assert backend_choice.choose_backend(*args) == "llama.cpp"
    assert calls == ["native", "llama.cpp"]
    assert backend_choice.choose_backend(*args) == "llama.cpp"
    assert calls == ["native", "llama.cpp"]  # cached: nothing loaded or measured again


def test_auto_without_the_extra_is_native(monkeypatch):
    from genrefine.models import backend_choice, loading

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    src = loading.resolve_source(None)
    def load(backend):
        raise AssertionError("nothing is loaded when llama.cpp is missing")

    dev = torch.device("cpu")
    assert backend_choice.choose_backend(src, "f", torch.bfloat16, dev, load, print) == "native"


@pytest.mark.parametrize(
    "method, reason", [("swift", "subset of the target's layers"), ("eagle", "trained drafter")]
)
def test_native_only_methods_refused_before_loading(capsys, method, reason):
    rc = main(["generate", "hi", "--backend", "llama.cpp", "--method", method])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    # (without the extra, or with a build this CPU cannot run, that is the one line)
    if "genrefine[llamacpp]" not in err and "illegal instruction" not in err:
        assert "native runtime" in err and reason in err


def test_a_library_built_for_instructions_this_cpu_lacks_is_refused_in_one_line(monkeypatch):
    """An AVX-512 build on an AVX2-only CPU imports, then dies with SIGILL at its first call: the
    probe in a child process turns that into BackendUnavailable with the rebuild command."""
    import signal
    import subprocess

    import genrefine.models.llamacpp as lcp

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, -signal.SIGILL, b"", b"")

    monkeypatch.setattr(lcp, "_RUNS_HERE", [])
    monkeypatch.setattr(lcp.subprocess, "run", fake_run)
    with pytest.raises(BackendUnavailable) as e:
        lcp._check_runs_here()
    assert "illegal instruction" in str(e.value) and "--force-reinstall" in str(e.value)
    assert lcp.CMAKE_ARGS in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BackendUnavailable):  # the verdict is kept: one child per process
        lcp._check_runs_here()
    assert len(calls) == 1

    monkeypatch.setattr(lcp, "_RUNS_HERE", [])
    monkeypatch.setattr(lcp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))
    lcp._check_runs_here()  # a library that runs here passes


def test_the_build_flags_follow_the_cpu():
    from genrefine.models.llamacpp import CMAKE_ARGS
    from genrefine.models.llamacpp_stock import cpu_flags

    assert "-DGGML_AVX2=ON" in CMAKE_ARGS and "-DGGML_LLAMAFILE=OFF" in CMAKE_ARGS
    avx512 = all(f in cpu_flags() for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"))
    assert ("-DGGML_AVX512=ON" in CMAKE_ARGS) == avx512
