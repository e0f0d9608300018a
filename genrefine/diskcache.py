"""What genrefine keeps on disk between runs, and how it writes files.

The bottom layer for everything converted or measured once and cached: converted models,
tokenizer rankings, cost tables, invariance probes, backend choices, training recordings. Nothing
here imports the rest of genrefine.

* :func:`cache_root`: ``$GENREFINE_CACHE``, default ``~/.cache/genrefine``.
* :func:`machine_key`: a description of this machine (CPU model, torch threads, GPU name), the
  part of a cache key that makes a measurement valid only where it was taken.
* :func:`atomic_path`, :func:`write_text`, :func:`save_tensors`: write a file (or a folder) under a
  temporary name beside its destination and move it into place in one step, so a reader never
  sees half a file and an interrupted run leaves the old one.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def cache_root() -> Path:
    """``$GENREFINE_CACHE``, default ``~/.cache/genrefine``."""
    env = os.environ.get("GENREFINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genrefine"


#: ggml's x86 options and the /proc/cpuinfo flags each needs (AMX is left out, as in genrefine's
#: own build; without GGML_NATIVE, llama.cpp's default is AVX2 without AVX-512)
ISA_OPTIONS = (
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where that file is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: /proc/cpuinfo flags of native bfloat16 arithmetic
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX). Without it torch's
    bfloat16 matmuls cost about a one-row matmul per row (an AMD EPYC, AVX2)."""
    flags = cpu_flags()
    return any(f in flags for f in BF16_FLAGS)


def isa_args(flags: frozenset[str]) -> tuple[str, ...]:
    """The ggml options (``-DGGML_...=ON``) of :data:`ISA_OPTIONS` whose flags the CPU has."""
    return tuple(f"-D{opt}=ON" for opt, need in ISA_OPTIONS if all(f in flags for f in need))


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (lscpu's "Model name")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine_key(device: torch.device | str | None = None) -> str:
    """A description of this machine for cache keys: CPU model, torch threads, GPU name."""
    parts = [cpu_model(), f"threads={torch.get_num_threads()}"]
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(dev))
    return "|".join(parts)


@contextmanager
def atomic_path(path: str | os.PathLike, make_parent: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file or a folder to; when the block ends
    without an error it replaces ``path`` (a folder there is removed first), else it is removed.
    The parent folder is created unless ``make_parent`` is off (a path the user named: a missing
    folder is then an error, as a typo should be)."""
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_tensors(
    path: str | os.PathLike, tensors: dict, metadata: dict | None = None, make_parent: bool = True
) -> Path:
    """Save ``tensors`` (torch tensors, or all numpy arrays) as safetensors with string
    ``metadata`` to ``path`` atomically (``make_parent``: see :func:`atomic_path`)."""
    import numpy as np

    if tensors and all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file

    with atomic_path(path, make_parent) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)
