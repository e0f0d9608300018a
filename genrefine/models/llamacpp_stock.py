"""A stock llama.cpp library, built once per machine, for the honest baseline ``llamacpp_plain``.

genrefine's own llama-cpp-python is built for exactness (``llamacpp.CMAKE_ARGS``: no llamafile
matmuls) and runs with the other fast paths off (no repacked weights, no tiled matmuls). A user's
``pip install llama-cpp-python`` has all three. One process loads one build of the library, so the
stock one lives beside genrefine's: :func:`stock_library` builds ``libllama`` / ``libggml`` from the
llama.cpp sources of the *installed* llama-cpp-python version (the same C API: the bindings match)
with llama.cpp's default options, only ``GGML_NATIVE`` off and the CPU's instruction sets named
instead (:func:`cmake_args`), into
``cache_root()/llamacpp-stock/<key>/lib``, keyed by CPU model, version and options. A process that
sets ``LLAMA_CPP_LIB_PATH`` to that folder before importing ``llama_cpp`` runs the stock kernels
(:func:`stock_env`; the bench runs its baseline in such a child process).

The first use downloads the sources (``pip download``, the sdist) and builds them with cmake:
minutes, announced through ``notice``; later uses find the folder. Anything missing (cmake, a
compiler, the network, llama-cpp-python itself) raises :class:`StockUnavailable` with a one-line
reason; the build's log stays in the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from ..diskcache import atomic_path, cache_root, cpu_flags, cpu_model, isa_args, write_text
from ..errors import ModelLoadError

#: llama.cpp's own defaults (llamafile sgemm, repacking, tiled matmuls, OpenMP) but for
#: GGML_NATIVE, which died with an illegal instruction on the CI machines: the instruction sets a
#: native build would use come from the CPU's flags instead (:func:`isa_args`). The rest only skips
#: what the Python bindings do not load (tools, tests, curl, the common library).
STOCK_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",  # libllama finds the libggml beside it, not genrefine's
)
LIB_ENV = "LLAMA_CPP_LIB_PATH"  # llama_cpp/llama_cpp.py loads libllama from this folder
INFO = "build.json"  # written last: a folder without it is not a finished build
BUILD_LOG = "build.log"


class StockUnavailable(ModelLoadError):
    """The stock llama.cpp library is not built here and cannot be (the message says why)."""


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (StockUnavailable when it is not installed)."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise StockUnavailable("llama-cpp-python is not installed (the genrefine[llamacpp] extra)") from None


def cmake_args() -> tuple[str, ...]:
    """The stock build's cmake options on this machine."""
    return STOCK_CMAKE_ARGS + isa_args(cpu_flags())


def stock_dir(version: str | None = None) -> Path:
    """The cache folder of the stock build for this CPU model and llama-cpp-python version."""
    version = version or llama_cpp_version()
    key = hashlib.sha256("\n".join((cpu_model(), version, *cmake_args())).encode()).hexdigest()
    return cache_root() / "llamacpp-stock" / f"{version}-{key[:12]}"


def stock_library(notice: Callable[[str], None] | None = None) -> Path:
    """The folder holding the stock ``libllama.so`` and its ``libggml*``: built on first use.

    Raises :class:`StockUnavailable` (one line) when it is not there and cannot be built."""
    version = llama_cpp_version()
    root = stock_dir(version)
    lib = root / "lib"
    if (root / INFO).is_file() and (lib / "libllama.so").is_file():
        return lib
    say = notice or (lambda msg: print(f"genrefine: {msg}", file=sys.stderr, flush=True))
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise StockUnavailable(f"building stock llama.cpp needs {tool!r} on PATH")
    say(
        f"building a stock llama.cpp (llama-cpp-python {version}'s sources, default kernels) "
        f"once for this CPU into {root}: several minutes ..."
    )
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / BUILD_LOG
    try:
        with tempfile.TemporaryDirectory(prefix="genrefine-llamacpp-") as tmp, open(log_path, "w") as log:
            src = _sources(version, Path(tmp), log)
            build = Path(tmp) / "build"
            _build(src, build, log)
            install(build, root)
    except (OSError, tarfile.TarError) as e:
        raise StockUnavailable(f"building stock llama.cpp failed: {e} (log: {log_path})") from e
    seconds = time.perf_counter() - t0
    info = json.loads((root / INFO).read_text())
    info["seconds"] = round(seconds, 1)
    write_text(root / INFO, json.dumps(info, indent=2) + "\n")
    say(f"stock llama.cpp built in {seconds / 60:.1f} min")
    return lib


def install(build: Path, root: Path) -> Path:
    """Copy the shared libraries of the cmake build folder ``build`` into ``root/lib`` (in one
    step) and mark the folder finished; returns ``root/lib``."""
    built = sorted(build.glob("bin/lib*.so*")) or sorted(build.rglob("lib*.so*"))
    if not any(p.name == "libllama.so" for p in built):
        raise StockUnavailable(f"the stock llama.cpp build in {build} made no libllama.so")
    with atomic_path(root / "lib") as out:
        out.mkdir()
        for p in built:
            shutil.copy2(p, out / p.name, follow_symlinks=False)  # keeps the .so -> .so.0 links
    write_text(root / INFO, json.dumps({
        "llama_cpp_python": llama_cpp_version(), "cpu": cpu_model(),
        "cmake_args": list(cmake_args()),
    }, indent=2) + "\n")
    return root / "lib"


def stock_env(lib: Path, env: dict | None = None) -> dict:
    """The environment of a child process that runs llama-cpp-python on the stock library ``lib``:
    ``LLAMA_CPP_LIB_PATH`` set, and ggml's tiled-matmul switch left to its default (on)."""
    from .llamacpp import TILED_ENV

    out = dict(os.environ if env is None else env)
    out[LIB_ENV] = str(lib)
    out.pop(TILED_ENV, None)  # genrefine's own process sets it to 0 (llamacpp.py)
    return out


def _run(cmd: list[str], log, what: str, cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc != 0:
        raise StockUnavailable(f"{what} failed (exit {rc}; log: {log.name})")


def _sources(version: str, tmp: Path, log) -> Path:
    """llama.cpp's sources as vendored in the llama-cpp-python ``version`` sdist (pip download)."""
    _run(
        [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
         "--no-binary", ":all:", "-q", "-d", str(tmp)],
        log, f"downloading the llama-cpp-python {version} sources",
    )
    sdists = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise StockUnavailable(f"pip downloaded no llama-cpp-python {version} sdist (log: {log.name})")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(tmp, filter="data")
    src = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None or not (src / "CMakeLists.txt").is_file():
        raise StockUnavailable(f"the llama-cpp-python {version} sdist holds no vendor/llama.cpp")
    return src


def _build(src: Path, build: Path, log) -> None:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(build), *gen, *cmake_args()], log, "cmake configure")
    jobs = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    _run(["cmake", "--build", str(build), "--target", "llama", "-j", jobs], log, "the stock llama.cpp build")
