"""Quantized weights for the native runtime: a GGUF file's own Q8_0, Q5_0, Q4_K and Q6_K tensors
run by the exact integer kernels of :mod:`genrefine.kernels`.

:class:`QuantWeight` stands where the runtime holds a float weight [n, k]: ``linear`` multiplies,
``rows``/``index_select``/slicing give dequantized float32 rows (embedding lookups, drafters'
reduced heads), and :meth:`QuantWeight.cat` stacks weights along the output dimension (the
fused q/k/v and gate/up projections), keeping one packed segment per run of equal formats.

:func:`load_packed` converts a GGUF file once into the kernels' layout (values and scales as the
file holds them: nothing is rounded again) and caches it as safetensors beside the converted model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..diskcache import atomic_path
from ..kernels import LANES, Packed, dequantize_rows, pack, qlinear

PACKED_FILE = "gguf-packed-v3.safetensors"  # v2: narrow 4/5-bit values; v3: float16 scales


class QuantWeight:
    """A quantized weight [n, k]: packed segments stacked along the output dimension."""

    def __init__(self, segments: list[Packed]) -> None:
        if not segments:
            raise ValueError("a QuantWeight needs at least one segment")
        k = segments[0].k
        if any(s.k != k for s in segments):
            raise ValueError("segments of one QuantWeight must share the input size")
        self.segments = segments
        self.shape = torch.Size([sum(s.n for s in segments), k])
        self.dtype = torch.float32  # what it computes in and hands out
        self.device = torch.device("cpu")

    @property
    def formats(self) -> list[str]:
        return [s.fmt for s in self.segments]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def linear(self, x: Tensor) -> Tensor:
        """x [..., k] -> [..., n] float32 (each segment's rows, in order)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
        outs = [qlinear(x2, s) for s in self.segments]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.reshape(*lead, self.shape[0])

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized float32 rows ``ids`` ([r] long) -> [r, k]."""
        ids = ids.to(torch.long).reshape(-1)
        if len(self.segments) == 1:  # an embedding: no masks to build
            return dequantize_rows(self.segments[0], ids)
        out = torch.empty(ids.shape[0], self.shape[1], dtype=torch.float32)
        start = 0
        for s in self.segments:
            sel = (ids >= start) & (ids < start + s.n)
            if bool(sel.any()):
                out[sel] = dequantize_rows(s, ids[sel] - start)
            start += s.n
        return out

    def index_select(self, dim: int, ids: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("a quantized weight selects rows only (dim 0)")
        return self.rows(ids)

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, slice):
            return self.rows(torch.arange(self.shape[0])[key])
        if isinstance(key, int):
            return self.rows(torch.tensor([key]))[0]
        return self.rows(torch.as_tensor(key))

    def row_range(self, start: int, stop: int | None = None) -> "QuantWeight":
        """Rows ``start:stop`` as a weight of their own (whole segments where they line up)."""
        stop = self.shape[0] if stop is None else stop
        out: list[Packed] = []
        base = 0
        for s in self.segments:
            lo, hi = max(start, base), min(stop, base + s.n)
            if lo < hi:
                if lo == base and hi == base + s.n:
                    out.append(s)
                else:
                    out.append(_repack_rows(s, torch.arange(lo - base, hi - base)))
            base += s.n
        return QuantWeight(out)

    def to(self, *args, **kwargs) -> "QuantWeight":
        """Quantized weights stay as they are (CPU, their own formats)."""
        return self

    def contiguous(self) -> "QuantWeight":
        return self

    @staticmethod
    def cat(weights: list["QuantWeight"]) -> "QuantWeight":
        """Stack along the output dimension; neighbouring segments of one format merge."""
        segs: list[Packed] = []
        for w in weights:
            for s in w.segments:
                if segs and _mergeable(segs[-1], s):
                    segs[-1] = _merge(segs[-1], s)
                else:
                    segs.append(s)
        return QuantWeight(segs)


def _mergeable(a: Packed, b: Packed) -> bool:
    return (
        a.n % LANES == 0
        and (a.group, a.zero, a.signed, a.fmt, a.bits) == (b.group, b.zero, b.signed, b.fmt, b.bits)
        and (a.c.numel() == 0) == (b.c.numel() == 0)
        and a.a.dtype == b.a.dtype
        and a.k == b.k
    )


def _merge(a: Packed, b: Packed) -> Packed:
    c = torch.cat([a.c, b.c]) if a.c.numel() else a.c
    return Packed(
        torch.cat([a.w, b.w]), torch.cat([a.a, b.a]), c, a.group, a.zero, a.signed, a.n + b.n, a.fmt,
        a.bits,
    )


def _repack_rows(s: Packed, rows: Tensor) -> Packed:
    from ..kernels import unpack_rows

    v, a, c = unpack_rows(s, rows)
    v = v + s.zero
    values = v.to(torch.int8) if s.signed else v.to(torch.uint8)
    return pack(values, a, c, s.group, s.zero, s.fmt)


def from_decoded(d) -> QuantWeight:
    """A :class:`QuantWeight` from a decoded GGUF tensor (``gguf_blocks.DecodedTensor``)."""
    values = torch.from_numpy(d.values)
    offset = None if d.offset is None else torch.from_numpy(d.offset)
    return QuantWeight([pack(values, torch.from_numpy(d.scale), offset, d.group, d.zero, d.fmt)])


# ---------------------------------------------------------------------------- cache
def _save(weights: dict[str, QuantWeight], path: Path) -> None:
    import json

    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    meta: dict[str, list] = {}
    for name, w in weights.items():
        entries = []
        for i, s in enumerate(w.segments):
            key = f"{name}#{i}"
            tensors[key + ".w"] = s.w
            tensors[key + ".a"] = s.a
            if s.c.numel():
                tensors[key + ".c"] = s.c
            entries.append([s.group, s.zero, s.signed, s.n, s.fmt, s.bits])
        meta[name] = entries
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"segments": json.dumps(meta)})


def _load(path: Path) -> dict[str, QuantWeight]:
    import json

    from safetensors import safe_open

    out: dict[str, QuantWeight] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["segments"])
        keys = set(f.keys())
        for name, entries in meta.items():
            segs = []
            for i, (group, zero, signed, n, fmt, bits) in enumerate(entries):
                key = f"{name}#{i}"
                c = f.get_tensor(key + ".c") if key + ".c" in keys else torch.empty(0)
                segs.append(
                    Packed(f.get_tensor(key + ".w"), f.get_tensor(key + ".a"), c, group, zero, signed, n,
                           fmt, bits)
                )
            out[name] = QuantWeight(segs)
    return out


def load_packed(gguf_path: Path, cache_dir: Path, notice=None) -> dict[str, QuantWeight]:
    """The GGUF file's quantized 2-D weights under transformers' names, packed once and cached
    in ``cache_dir`` (float weights are not here: the converted model has them exactly)."""
    from .gguf_blocks import DecodedTensor, read_quantized

    path = cache_dir / PACKED_FILE
    if path.is_file():
        try:
            return dict(_load(path))
        except (OSError, ValueError, KeyError):
            pass  # damaged: convert again
    if notice is not None:
        notice(f"packing {gguf_path.name}'s quantized weights for the integer kernels (once) ...")
    out = {
        name: from_decoded(t)
        for name, t in read_quantized(gguf_path).items()
        if isinstance(t, DecodedTensor)
    }
    _save(out, path)
    for stale in cache_dir.glob("gguf-packed-v*.safetensors"):  # earlier layouts of the same file
        if stale.name != PACKED_FILE:
            stale.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------- float weights
FORMATS = ("q8_0", "q4_k", "q6_k")


def quantize_weight(w: Tensor, fmt: str = "q8_0") -> QuantWeight:
    """Quantize a float weight [n, k] (k a multiple of 32) into one of the kernels' shapes, the
    way llama.cpp's reference quantizers round (for models without a GGUF file, and tests):

    * ``q8_0``: signed bytes, one scale per 32 (``amax / 127``);
    * ``q4_k``: 0..15 with a scale and an offset per 32 (min/max over the block);
    * ``q6_k``: 0..63 around 32, one scale per 16.
    """
    w = w.detach().to(torch.float32)
    n, k = w.shape
    if k % 32:
        raise ValueError(f"input size {k} is not a multiple of 32")
    if fmt == "q8_0":
        b = w.reshape(n, k // 32, 32)
        d = b.abs().amax(-1) / 127.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(b * inv[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
        return QuantWeight([pack(q, d, None, 32, 0, fmt)])
    if fmt == "q4_k":
        b = w.reshape(n, k // 32, 32)
        lo = b.amin(-1).clamp(max=0.0)
        d = (b.amax(-1) - lo) / 15.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round((b - lo[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
        return QuantWeight([pack(q.reshape(n, k), d, -lo, 32, 0, fmt)])
    if fmt == "q6_k":
        b = w.reshape(n, k // 16, 16)
        d = b.abs().amax(-1) / 31.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = (torch.round(b * inv[..., None]).clamp(-32, 31) + 32).to(torch.uint8)
        return QuantWeight([pack(q.reshape(n, k), d, None, 16, 32, fmt)])
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def linear_names(sd: dict[str, Tensor], embedding: bool = True) -> list[str]:
    """The 2-D projection (and, with ``embedding``, input embedding) weights of a
    transformers-style state dict, sorted."""
    return sorted(
        k for k, v in sd.items()
        if v.dim() == 2 and k.endswith(".weight") and "norm" not in k
        and (embedding or "embed_tokens" not in k)
    )


def quantize_linears(sd: dict[str, Tensor], formats: tuple[str, ...] = ("q8_0",),
                     embedding: bool = True) -> dict[str, QuantWeight]:
    """Quantize every 2-D projection and (with ``embedding``) the embedding of a
    transformers-style state dict, cycling through ``formats`` weight by weight (several formats
    exercise mixed fused projections)."""
    return {name: quantize_weight(sd[name], formats[i % len(formats)])
            for i, name in enumerate(linear_names(sd, embedding))}
