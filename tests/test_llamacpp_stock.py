"""The stock llama.cpp baseline (``llamacpp_plain``) with fakes: no cmake, no download, no model.

* models/llamacpp_stock.py: the library is built once per CPU model and version and then found in
  the cache; what is missing or fails says why in one line, and a failed build is tried again;
* bench/baselines.py's LlamaCppStockBackend speaks to its child process (llamacpp_worker.py's
  ``serve`` over a fake ``Llama``) in the stock library's environment, and a crashed child
  is reported in one line;
* the bench goes on without ``llamacpp_plain`` when the library is unavailable, and runs it (with
  ``llamacpp_exact`` beside it) when it is there.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from genrefine.bench import runner
from genrefine.bench.backends import TurnResult
from genrefine.bench.baselines import WORKER, LlamaCppStockBackend
from genrefine.bench.llamacpp_worker import generate_plain, serve
from genrefine.cli import main
from genrefine.models import llamacpp_stock as stock
from genrefine.models.llamacpp import TILED_ENV
from genrefine.models.llamacpp_stock import StockUnavailable

from tiny import save_tiny_model_dir


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stock, "llama_cpp_version", lambda: "9.9.9")


def fake_build(calls):
    """A _build that writes what cmake would: libllama.so and a libggml beside it."""

    def build(src, build, log):
        calls.append(src)
        (build / "bin").mkdir(parents=True)
        for name in ("libllama.so.0.5.0", "libggml.so.0.1"):
            (build / "bin" / name).write_bytes(b"\x7fELF")
        (build / "bin" / "libllama.so").symlink_to("libllama.so.0.5.0")

    return build


# ----------------------------------------------------------------------------- the library
def test_stock_library_is_built_once_per_cpu_and_then_found(monkeypatch):
    calls, notes = [], []
    monkeypatch.setattr(stock, "_sources", lambda version, tmp, log: tmp / "src")
    monkeypatch.setattr(stock, "_build", fake_build(calls))
    lib = stock.stock_library(notes.append)
    assert (lib / "libllama.so").is_symlink() and (lib / "libggml.so.0.1").is_file()
    info = json.loads((lib.parent / stock.INFO).read_text())
    assert info["llama_cpp_python"] == "9.9.9" and "-DGGML_NATIVE=OFF" in info["cmake_args"]
    assert len(calls) == 1 and "building a stock llama.cpp" in notes[0]
    assert stock.stock_library(notes.append) == lib and len(calls) == 1  # found, not rebuilt
    monkeypatch.setattr(stock, "cpu_model", lambda: "another CPU")
    assert stock.stock_library(notes.append) != lib and len(calls) == 2  # another machine's key


def test_stock_library_says_why_it_is_unavailable_and_tries_again(monkeypatch):
    monkeypatch.setattr(stock.shutil, "which", lambda tool: None if tool == "cmake" else "/bin/x")
    with pytest.raises(StockUnavailable, match="needs 'cmake' on PATH"):
        stock.stock_library(lambda msg: None)
    monkeypatch.setattr(stock.shutil, "which", lambda tool: "/bin/x")
    monkeypatch.setattr(stock, "_sources", lambda version, tmp, log: tmp)

    def failing(src, build, log):  # a compiler error: the real _run on a failing command
        stock._run([sys.executable, "-c", "import sys; sys.exit(3)"], log, "the stock llama.cpp build")

    monkeypatch.setattr(stock, "_build", failing)
    with pytest.raises(StockUnavailable) as e:
        stock.stock_library(lambda msg: None)
    msg = str(e.value)
    assert "\n" not in msg and "the stock llama.cpp build failed (exit 3; log: " in msg
    assert not (stock.stock_dir() / stock.INFO).exists()  # unfinished: the next use builds again
    calls = []
    monkeypatch.setattr(stock, "_build", fake_build(calls))
    assert (stock.stock_library(lambda msg: None) / "libllama.so").exists() and len(calls) == 1


def test_stock_library_needs_llama_cpp_python(monkeypatch):
    monkeypatch.undo()  # the real version lookup, on a package that is not there
    monkeypatch.setattr(stock.metadata, "version", _not_found)
    with pytest.raises(StockUnavailable, match=r"llama-cpp-python is not installed"):
        stock.stock_library()


def _not_found(name):
    raise stock.metadata.PackageNotFoundError(name)


@pytest.mark.parametrize(
    "flags, want",
    [
        ("sse4_2 avx avx2 fma f16c", ()),  # llama.cpp's own default without GGML_NATIVE: AVX2
        ("avx2 avx512f avx512cd avx512vl avx512dq", ()),  # no avx512bw: ggml's AVX512 needs it
        ("avx2 avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni amx_int8",
         ("-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON")),  # AMX stays off
    ],
)
def test_the_stock_build_names_the_instruction_sets_the_cpu_has(flags, want):
    assert stock.isa_args(frozenset(flags.split())) == want


def test_stock_env_names_the_library_and_leaves_tiling_on(tmp_path):
    env = stock.stock_env(tmp_path, {"PATH": "/bin", TILED_ENV: "0"})
    assert env == {"PATH": "/bin", stock.LIB_ENV: str(tmp_path)}


# ----------------------------------------------------------------------------- the child process
class FakeLlama:
    """Llama's generate as the worker uses it: counts up from the last prompt token."""

    def __init__(self):
        self.seed = None

    def set_seed(self, seed):
        self.seed = seed

    def reset(self):
        pass

    def generate(self, prompt, **kw):
        assert kw["temp"] in (0.0, 0.5) and kw["repeat_penalty"] == 1.0
        t = prompt[-1]
        while True:
            t += 1
            yield t


def test_generate_plain_stops_at_eos_or_the_token_budget():
    assert generate_plain(FakeLlama(), [3], 4, 0.0, None, frozenset())[::2] == ([4, 5, 6, 7], False)
    assert generate_plain(FakeLlama(), [3], 9, 0.0, None, frozenset({6}))[::2] == ([4, 5], True)


def fake_worker(tmp_path, body: str) -> list[str]:
    """A child command running llamacpp_worker.py's serve() over FakeLlama (``body`` first)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, json, os, sys
        spec = importlib.util.spec_from_file_location("w", {WORKER!r})
        w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_llamacpp_stock import FakeLlama
        {body}
        print(json.dumps({{"ready": os.environ.get("LLAMA_CPP_LIB_PATH", "") + "|" +
                          os.environ.get({TILED_ENV!r}, "unset")}}), flush=True)
        w.serve(FakeLlama(), sys.stdin, lambda s: print(s, flush=True))
    """))
    return [sys.executable, str(script)]


def test_stock_backend_runs_its_worker_in_the_stock_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(TILED_ENV, "0")  # as genrefine's own llama.cpp backend leaves it
    b = LlamaCppStockBackend("m.gguf", [9], 64, 2, tmp_path, command=fake_worker(tmp_path, ""))
    assert b.system_info == f"{tmp_path}|unset"  # the stock library, tiled matmuls left on
    r = b.run([1, 2, 5], 10, 0.0, None)
    assert isinstance(r, TurnResult) and r.token_ids == [6, 7, 8] and r.ended_eos
    assert r.prompt_tokens == 3 and r.seconds >= 0
    assert b.run([1], 2, 0.5, 7).token_ids == [2, 3]
    b.close()
    assert b.proc.poll() == 0


def test_a_crashed_stock_worker_is_reported_in_one_line(tmp_path):
    cmd = fake_worker(tmp_path, "sys.stderr.write('Illegal instruction\\n'); sys.exit(132)")
    with pytest.raises(StockUnavailable) as e:
        LlamaCppStockBackend("m.gguf", [9], 64, 2, tmp_path, command=cmd)
    assert str(e.value) == (
        "the stock llama.cpp process could not start: it exited (132): Illegal instruction"
    )


# ----------------------------------------------------------------------------- the bench
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_stock"), "llama")


@pytest.fixture()
def bench_on_tiny(tmp_path, tiny_dir, monkeypatch, capsys):
    """``genrefine bench`` on the tiny model with the llama.cpp baselines faked (the GGUF check
    passed, the exact backend replaced): returns (exit code, report methods, stderr)."""
    import genrefine.models.loading as loading

    real_check = loading.check_backend
    monkeypatch.setattr(
        loading, "check_backend", lambda name, src: None if name == "llama.cpp" else real_check(name, src)
    )
    monkeypatch.setattr(runner, "LlamaCppExactBackend", Echo)
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["abc abc abc"]}) + "\n")

    def bench(methods):
        out = tmp_path / "b.json"
        code = main(["bench", "--questions", str(qfile), "--model", str(tiny_dir), "--dtype",
                     "float32", "--methods", methods, "--quick", "--fresh", "--json", str(out)])
        err = capsys.readouterr().err
        return code, (list(json.loads(out.read_text())["methods"]) if code == 0 else None), err

    return bench


class Echo:
    """A llama.cpp baseline that answers every prompt with its last token."""

    def __init__(self, model_path, eos_ids, n_ctx, n_threads, lib=None):
        self.lib = lib

    def run(self, prompt_ids, max_new_tokens, temperature, seed):
        return TurnResult([prompt_ids[-1]], 0.01, False, len(prompt_ids))


def test_bench_goes_on_without_an_unavailable_stock_baseline(bench_on_tiny, monkeypatch):
    def unavailable(notice=None):
        raise StockUnavailable("building stock llama.cpp needs 'cmake' on PATH")

    monkeypatch.setattr(stock, "stock_library", unavailable)
    code, methods, err = bench_on_tiny("llamacpp_plain,llamacpp_exact")
    assert code == 0, err
    assert methods == ["ar", "llamacpp_exact"]
    assert (
        "llamacpp_plain is unavailable and left out of this run: building stock llama.cpp needs "
        "'cmake' on PATH" in err
    )


def test_bench_runs_the_stock_baseline_on_the_stock_library(bench_on_tiny, monkeypatch, tmp_path):
    made = []
    monkeypatch.setattr(stock, "stock_library", lambda notice=None: tmp_path / "lib")
    monkeypatch.setattr(runner, "LlamaCppStockBackend", lambda *a: made.append(a) or Echo(*a))
    code, methods, err = bench_on_tiny("llamacpp_plain,llamacpp_exact")
    assert code == 0, err
    assert methods == ["ar", "llamacpp_plain", "llamacpp_exact"]
    assert len(made) == 1 and made[0][-1] == tmp_path / "lib"
