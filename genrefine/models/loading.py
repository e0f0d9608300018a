"""Resolve a model name, convert it once through transformers, and cache the result on disk.

The first load of a model goes through transformers (which dequantizes GGUF files and knows every
architecture); the native runtime's weights, its config and the tokenizer are then written under
``$GENREFINE_CACHE/models/`` as safetensors and JSON, so later loads skip transformers' model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diskcache import cache_root
from ..errors import ModelLoadError
from .config import ModelConfig, UnsupportedArchitecture, from_hf_config, rope_tables
from .default import EMBEDDED_NAME, embedded_model_path

_FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED = "gguf"  # --dtype gguf: the file's own quantized weights (genrefine/kernels)
Q8 = "q8_0"  # --dtype q8_0: a float checkpoint's projections rounded to Q8_0 at load (same kernels)
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class ModelSource:
    """Where a model comes from."""

    path: Path  # the .gguf file or the Hugging Face directory
    display_name: str
    gguf: bool

    @property
    def load_dir(self) -> str:
        return str(self.path.parent if self.gguf else self.path)

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.path.name} if self.gguf else {}


def resolve_source(spec: str | os.PathLike | None) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`; None means the embedded model."""
    if spec is None or str(spec) == "":
        return ModelSource(embedded_model_path(), EMBEDDED_NAME, gguf=True)
    p = Path(spec).expanduser()
    hint = (
        "give a local Hugging Face model directory (with config.json) or a .gguf file, "
        "or leave out --model to use the embedded Gemma 3 270M"
    )
    if not p.exists():
        raise ModelLoadError(f"model path {str(p)!r} does not exist: {hint}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{str(p)!r} is a directory without config.json: {hint}")
        return ModelSource(p.resolve(), p.name, gguf=False)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{str(p)!r} is not a model file (no GGUF header): {hint}")
    return ModelSource(p.resolve(), p.name, gguf=True)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """``None``/"auto": bfloat16 here (:func:`load_model` decides "auto" for GGUF files on the
    CPU by measurement, see ``weights_choice.py``); "gguf": the GGUF file's own quantized
    weights, run by the integer kernels (returned as the string :data:`QUANTIZED`); "q8_0": a
    float checkpoint's projections rounded to Q8_0 when loaded, run by the same kernels
    (:data:`Q8`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16
    if dtype in (QUANTIZED, "quantized"):
        if torch.device(device).type != "cpu":
            raise ModelLoadError("--dtype gguf runs on the CPU (integer kernels): use --device cpu")
        return QUANTIZED
    if dtype == Q8:
        if torch.device(device).type != "cpu":
            raise ModelLoadError("--dtype q8_0 runs on the CPU (integer kernels): use --device cpu")
        return Q8
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}: choose one of auto, gguf, q8_0, {', '.join(DTYPES)} "
            "(or bf16, fp32, fp16)"
        )
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available: use cpu")
    return d


def _fingerprint(src: ModelSource) -> str:
    h = hashlib.sha256(str(src.path).encode())
    files = [src.path] if src.gguf else sorted(f for f in src.path.iterdir() if f.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def converted_dir(src: ModelSource) -> Path:
    stem = src.path.stem if src.gguf else src.path.name
    return cache_root() / "models" / f"{stem}-{_fingerprint(src)}-v{_FORMAT_VERSION}"


def load_tokenizer(src: ModelSource, hf_config=None):
    """The tokenizer, from the converted cache when there is one. ``hf_config`` (the source's
    transformers config, when the caller has it) spares transformers reading it again: from a
    GGUF every read parses the whole file's metadata, 262,144 vocabulary strings for Gemma 3."""
    from transformers import AutoTokenizer

    cached = converted_dir(src) / "tokenizer"
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(str(cached))
    kw = src.hf_kwargs()
    if hf_config is not None:
        kw["config"] = hf_config
    with one_gguf_parse():  # its config and vocabulary from one parse of a GGUF
        return AutoTokenizer.from_pretrained(src.load_dir, **kw)


def _load_hf(src: ModelSource, dtype: torch.dtype, hf_config=None):
    from transformers import AutoModelForCausalLM

    kw = src.hf_kwargs()
    if hf_config is not None:  # as in load_tokenizer: the config is not built again
        kw["config"] = hf_config
    try:
        with one_gguf_parse():  # config and weights from one parse of a GGUF
            return AutoModelForCausalLM.from_pretrained(src.load_dir, dtype=dtype, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"transformers could not load {src.display_name!r}: {first}") from e


@contextmanager
def one_gguf_parse():
    """Within the block, ``gguf.GGUFReader`` gives one shared reader per file (re-entrant: an
    inner block shares the outer one's readers).

    transformers opens a GGUF once for the config, once for the tokenizer and once for the
    weights, and each opening parses all of its metadata in Python: for Gemma 3 (262,144
    vocabulary strings) about 20 s each on 2 cores, most of a first load. The reader only reads
    (a memory map), so the three can share one."""
    try:
        import gguf
    except ImportError:  # not a GGUF load: nothing to share
        yield
        return
    original = gguf.GGUFReader
    if getattr(original, "genrefine_shared", False):  # an outer block shares already
        yield
        return
    readers: dict = {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    shared.genrefine_shared = True
    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert(src: ModelSource, out: Path, notice) -> None:
    """First load: through transformers, then write the native runtime's files."""
    with one_gguf_parse():
        _convert_files(src, out, notice)


def _convert_files(src: ModelSource, out: Path, notice) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(src.load_dir, **src.hf_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src.display_name!r} has no readable model config: {e}") from e
    cfg = from_hf_config(hf_config)  # may raise UnsupportedArchitecture
    notice(f"converting {src.display_name} once (cached under {out.parent}) ...")
    hf = _load_hf(src, torch.float32, hf_config)
    tok = load_tokenizer(src, hf_config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue
        sd[k] = v.detach().contiguous()
    for key, (inv, scale) in rope_tables(hf_config, cfg.layer_rope).items():
        sd[f"rope.{key}.inv_freq"] = inv.contiguous()
        sd[f"rope.{key}.scale"] = torch.tensor([scale])
    save_file(sd, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(cfg.to_json())
    tok.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "source.json").write_text(json.dumps({"source": str(src.path)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _load_native(src: ModelSource, out: Path, dtype: torch.dtype | str, device: torch.device, notice=None):
    from safetensors import safe_open

    from .runtime import NativeModel

    cfg = ModelConfig.from_json((out / "config.json").read_text())
    quantized = None
    if dtype == QUANTIZED:
        from .quant import load_packed

        quantized = load_packed(src.path, out, notice)
        dtype = torch.float32  # activations, norms, attention and the cache
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if not (quantized and k in quantized)}
    rope = {}
    for key in set(cfg.layer_rope):
        rope[key] = (sd.pop(f"rope.{key}.inv_freq"), float(sd.pop(f"rope.{key}.scale")[0]))
    if dtype == Q8:
        quantized = _quantize_checkpoint(sd, src)
        sd = {k: v for k, v in sd.items() if k not in quantized}
        dtype = torch.float32
    return NativeModel.from_state_dict(
        cfg, sd, rope, dtype, device, name=src.display_name, quantized=quantized
    )


def _quantize_checkpoint(sd: dict, src: ModelSource) -> dict:
    """``--dtype q8_0``: every projection and the output layer of a float checkpoint rounded to
    Q8_0 (a scale per 32 weights, as llama.cpp rounds); the input embedding stays float unless it
    is the output layer too (its rows are looked up, not multiplied)."""
    from .quant import linear_names, quantize_linears

    tied = "lm_head.weight" not in sd
    bad = [k for k in linear_names(sd, embedding=tied) if sd[k].shape[1] % 32]
    if bad:
        raise ModelLoadError(
            f"--dtype q8_0 needs input sizes that are multiples of 32; {src.display_name!r} has "
            f"{bad[0]} {tuple(sd[bad[0]].shape)}: use a float dtype"
        )
    return quantize_linears(sd, ("q8_0",), embedding=tied)


def _auto_weights(src: ModelSource, notice) -> torch.dtype | str:
    """``--dtype auto`` for a GGUF file on the CPU: its quantized weights or bfloat16, the
    faster here (measured once, see ``weights_choice.py``)."""
    from gguf import GGUFReader

    from .weights_choice import choose_weights

    try:
        reader = GGUFReader(src.path)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        hidden = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    except (KeyError, ValueError, OSError, IndexError):
        return torch.bfloat16
    if hidden % 32:
        return torch.bfloat16
    return QUANTIZED if choose_weights(hidden, notice) == "gguf" else torch.bfloat16


BACKENDS = ("native", "hf", "llama.cpp", "auto")
DEFAULT_BACKEND = "native"
_BACKEND_ALIASES = {"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp", "transformers": "hf"}


def resolve_backend(backend: str | None) -> str:
    """``--backend``: native (the PyTorch runtime, transformers adapter for other
    architectures), hf (the transformers adapter), llama.cpp (GGUF files), auto (the faster of
    native and llama.cpp for this model on this machine, measured once); None means native."""
    if backend is None:
        return DEFAULT_BACKEND
    name = _BACKEND_ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return name


def check_backend(backend: str, src: ModelSource) -> None:
    """Fail early when the backend cannot run this model (llama.cpp: GGUF files, the extra)."""
    if backend != "llama.cpp":
        return
    if not src.gguf:
        raise ModelLoadError(
            f"the llama.cpp backend runs GGUF files and {src.display_name!r} is a Hugging Face "
            "directory: give a .gguf file or use --backend native"
        )
    from .llamacpp import import_llama_cpp

    import_llama_cpp()  # BackendUnavailable: how to install the extra


def _load_llamacpp(src: ModelSource, device: str | torch.device | None):
    from .llamacpp import LlamaCppModel

    if device is not None and str(device) not in ("auto", "cpu"):
        raise ModelLoadError(f"the llama.cpp backend runs on the CPU here: use --device cpu (got {device})")
    t0 = time.perf_counter()
    model = LlamaCppModel(src.path, name=src.display_name)
    cached = converted_dir(src) / "tokenizer"
    tok = load_tokenizer(src)
    if not cached.is_dir():  # read from the GGUF (seconds): keep it where later loads look
        tmp = cached.with_name(f"tokenizer.tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    model.load_seconds = time.perf_counter() - t0
    return model, tok


def load_model(
    spec: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quiet: bool = False,
    backend: str | None = None,
):
    """Load a model and its tokenizer.

    Returns ``(model, tokenizer)``. With ``backend`` native (the default) the model is a
    :class:`NativeModel` when the architecture is natively supported, else an :class:`HFModel`
    (with a one-line notice on stderr); hf forces the :class:`HFModel`; llama.cpp gives a
    :class:`~genrefine.models.llamacpp.LlamaCppModel` (GGUF files; ``dtype`` does not apply: the
    file's own quantized weights run); auto picks native or llama.cpp (see ``backend_choice.py``).
    """

    def notice(msg: str) -> None:
        if not quiet:
            print(f"genrefine: {msg}", file=sys.stderr, flush=True)

    backend = resolve_backend(backend)
    src = resolve_source(spec)
    if backend == "auto":
        from .backend_choice import choose_backend

        dev = resolve_device(device)

        def load(name: str):
            return load_model(src.path, dtype=dtype, device=dev, quiet=True, backend=name)[0]

        dt = resolve_dtype(dtype, dev)
        backend = choose_backend(src, _fingerprint(src), dt, dev, load, notice)
    check_backend(backend, src)
    if backend == "llama.cpp":
        return _load_llamacpp(src, device)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if (dtype is None or dtype == "auto") and src.gguf and dev.type == "cpu" and backend == "native":
        dt = _auto_weights(src, notice)
    if dt == QUANTIZED and not src.gguf:
        raise ModelLoadError(
            f"--dtype gguf runs a GGUF file's quantized weights and {src.display_name!r} is a "
            "Hugging Face directory: give a .gguf file or a float dtype"
        )
    if dt == QUANTIZED and backend == "hf":
        raise ModelLoadError("--dtype gguf runs on the native backend: use --backend native")
    if dt == Q8 and (src.gguf or backend == "hf"):
        raise ModelLoadError(
            "--dtype q8_0 rounds a float checkpoint's weights on the native backend: a GGUF file "
            "runs its own quantized weights with --dtype gguf" if src.gguf else
            "--dtype q8_0 runs on the native backend: use --backend native"
        )
    if backend == "hf":
        from .hf import HFModel

        return HFModel(_load_hf(src, dt).to(dev), name=src.display_name), load_tokenizer(src)
    out = converted_dir(src)
    if not (out / "config.json").is_file():
        try:
            _convert(src, out, notice)
        except UnsupportedArchitecture as e:
            if dt == Q8:
                raise ModelLoadError(f"--dtype q8_0 runs on the native runtime and {e}: use a float dtype") from e
            from .hf import HFModel

            notice(f"{e}; using the generic transformers adapter (chain drafts only)")
            hf = _load_hf(src, dt).to(dev)
            return HFModel(hf, name=src.display_name), load_tokenizer(src)
    t0 = time.perf_counter()
    model = _load_native(src, out, dt, dev, notice)
    tok = load_tokenizer(src)
    model.load_seconds = time.perf_counter() - t0
    return model, tok
