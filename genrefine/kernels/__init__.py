"""Exact weight-only quantized matmuls for the CPU: :func:`qlinear`.

A weight is stored as integer values ``q`` (a byte each, or 4 or 5 bits where they are small
enough) in sub-blocks of ``group`` (16 or 32) along the input dimension, with a scale ``a``
(float32, or float16 where every scale is one exactly) and optional offset ``c`` per sub-block and
an integer ``zero`` for the whole tensor: the weight is ``a * (q - zero) - c``, exactly as a GGUF
file's Q8_0, Q5_0, Q4_K and Q6_K blocks define it (nothing is rounded again when they are
converted, see ``genrefine/models/quant.py``). The input rows are quantized to int8 per 32-wide
block (``dx = amax / 127``, ``xq = round_half_even(x / dx)``, as llama.cpp does for its dot
products), and each output is::

    acc = 0
    for each sub-block j, in order:
        I = sum((q - zero) * xq)          # integers: exact whatever the summation order
        X = sum(xq)
        t = a_j * float(I)  [- c_j * float(X) when there are offsets]
        acc = acc + dx * t                 # float32, every operation rounded on its own

This arithmetic does not depend on how many rows are computed together nor on which instruction
set runs it, so outputs are batch-invariant by construction (no probe) and equal across the
paths: AMX tiles (16-row chunks), AVX-512 VNNI, AVX2 and plain C++ in ``qmatmul.cpp``, chosen at
run time from the CPU's features (built once per machine on first use with torch's extension
tooling and cached), and :func:`qlinear_reference`, a pure-PyTorch fallback used when nothing can
be built. The same extension holds the quantized runtime's one-call RMSNorm and rotary embedding
and its exact attention (:func:`attend`).

Layout (:class:`Packed`): output rows come in groups of 16 interleaved four bytes at a time, so
that one 64-byte load holds four consecutive inputs of 16 output rows and one instruction
(``vpdpbusd``) multiplies them by four broadcast inputs: each weight block is read once for all
rows of ``x`` (weight reuse) and no horizontal sums are needed. Values below 16 or 32 are kept
narrower (:func:`narrow_block`) and widened in registers, since one-row decoding is bound by
reading the weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..diskcache import cache_root

LANES = 16  # output rows per group
XBLOCK = 32  # activation quantization block
ISAS = {"generic": 0, "avx2": 1, "avx512-vnni": 2, "amx": 3}
_SOURCE = Path(__file__).with_name("qmatmul.cpp")


@dataclass
class Packed:
    """One quantized weight [n, k] in the kernel's layout (see the module docstring).

    w: uint8 [n_groups, k / group, group / 4, 16, 4] (``bits`` 8), or the same bytes stored
    narrower, [n_groups, k / group, block_bytes(group, bits)] (``bits`` 4 or 5, unsigned values
    below 16 or 32: see :func:`narrow_block`); a: [n_groups, k / group, 16], float16 where every
    scale is exactly a float16 (Q8_0's and Q5_0's are: the file stores them so), else float32;
    c: float32 [n_groups, k / group, 16] or an empty tensor; rows past ``n`` in the last group
    are zero.
    """

    w: Tensor
    a: Tensor
    c: Tensor
    group: int
    zero: int
    signed: bool  # q are int8 (stored as their bytes); else uint8
    n: int
    fmt: str = ""  # where the values came from, e.g. "q4_k" (for display)
    bits: int = 8  # bits per stored value: 8, or 4 / 5 for small unsigned values

    @property
    def k(self) -> int:
        return int(self.w.shape[1]) * self.group

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.a, self.c))


def pack(
    values: Tensor, scale: Tensor, offset: Tensor | None, group: int, zero: int, fmt: str = ""
) -> Packed:
    """Pack ``values`` ([n, k] int8 or uint8), ``scale`` and ``offset`` ([n, k / group] float32)
    into the kernel's layout. uint8 values must be at most 128 (the AVX2 path's bound)."""
    if group not in (16, 32):
        raise ValueError(f"group must be 16 or 32, got {group}")
    n, k = values.shape
    if k % XBLOCK or k % group:
        raise ValueError(f"input size {k} is not a multiple of {XBLOCK}")
    signed = values.dtype == torch.int8
    top = int(values.max()) if values.numel() else 0
    if not signed:
        if values.dtype != torch.uint8:
            raise ValueError(f"values must be int8 or uint8, got {values.dtype}")
        if top > 128:
            raise ValueError("uint8 values above 128 are not supported (store them as int8)")
    ng = -(-n // LANES)
    pad = ng * LANES - n
    raw = values.view(torch.uint8) if signed else values
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad, k)])
    nb = k // group
    w = raw.reshape(ng, LANES, nb, group // 4, 4).permute(0, 2, 3, 1, 4).contiguous()
    bits = 8
    if not signed and values.numel():
        bits = 4 if top < 16 else 5 if top < 32 else 8
    if bits != 8:
        w = narrow_block(w, bits)

    def lanes(s: Tensor) -> Tensor:
        s = s.to(torch.float32)
        if pad:
            s = torch.cat([s, s.new_zeros(pad, nb)])
        return s.reshape(ng, LANES, nb).permute(0, 2, 1).contiguous()

    c = lanes(offset) if offset is not None else torch.empty(0, dtype=torch.float32)
    a = lanes(scale)
    half = a.to(torch.float16)
    if torch.equal(half.to(torch.float32), a):  # exact: half the bytes, the same numbers
        a = half
    return Packed(w, a, c, group, int(zero), signed, int(n), fmt, bits)


def block_bytes(group: int, bits: int) -> int:
    """Bytes one sub-block of 16 output rows takes with ``bits`` per value."""
    s = group // 4  # 64-byte vectors per sub-block in the byte layout
    return {8: s * 64, 4: s * 32, 5: s * 40}[bits]


def narrow_block(w: Tensor, bits: int) -> Tensor:
    """Byte layout [..., S, 16, 4] (values below 2**bits) -> the narrow layout [..., bytes]:
    byte i of vector h (h < S / 2) holds byte i of vector h in its low nibble and of vector
    h + S / 2 in its high nibble; with 5 bits, 8 more bytes per vector follow, bit i of them
    the fifth bit of byte i (little-endian). Unpacking is a mask and a shift per 64 bytes."""
    lead = w.shape[:-3]
    s = w.shape[-3]
    v = w.reshape(*lead, s, 64)
    low, high = v[..., : s // 2, :], v[..., s // 2 :, :]
    nib = ((low & 15) | ((high & 15) << 4)).reshape(*lead, s * 32)
    if bits == 4:
        return nib.contiguous()
    top = ((v >> 4) & 1).reshape(*lead, s, 8, 8).to(torch.int32)  # [.., S, byte, bit]
    planes = (top << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
    return torch.cat([nib, planes.reshape(*lead, s * 8)], dim=-1).contiguous()


def widen_block(w: Tensor, group: int, bits: int) -> Tensor:
    """:func:`narrow_block` undone: [..., bytes] -> the byte layout [..., S, 16, 4]."""
    if bits == 8:
        return w
    lead = w.shape[:-1]
    s = group // 4
    nib = w[..., : s * 32].reshape(*lead, s // 2, 64)
    v = torch.cat([nib & 15, nib >> 4], dim=-2)  # [..., S, 64]
    if bits == 5:
        planes = w[..., s * 32 :].reshape(*lead, s, 8, 1).to(torch.int32)
        top = ((planes >> torch.arange(8, dtype=torch.int32)) & 1).reshape(*lead, s, 64)
        v = v | (top << 4).to(torch.uint8)
    return v.reshape(*lead, s, LANES, 4)


def unpack_rows(p: Packed, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer values ([r, k] int32, zero already subtracted), scales and offsets ([r, k / group]
    float32) of output rows ``rows`` ([r] long)."""
    g, lane = rows // LANES, rows % LANES
    if p.bits == 8:
        q = p.w[g, :, :, lane, :]  # [r, nb, group / 4, 4]
    else:
        q = widen_block(p.w[g], p.group, p.bits)[torch.arange(rows.shape[0]), :, :, lane, :]
    q = q.reshape(rows.shape[0], p.k)
    v = (q.view(torch.int8) if p.signed else q).to(torch.int32) - p.zero
    a = p.a[g, :, lane].to(torch.float32)
    c = p.c[g, :, lane] if p.c.numel() else None
    return v, a, c


def dequantize_rows(p: Packed, rows: Tensor) -> Tensor:
    """The float32 weights ``a * (q - zero) - c`` of output rows ``rows`` ([r] long) -> [r, k]
    (8-bit layouts in C++ where the extension is loaded: the same arithmetic, the same bits;
    it never builds the extension itself)."""
    if p.bits == 8 and _state.get("ok") is True and rows.device.type == "cpu":
        return torch.ops.genrefine_q.dequant_rows(p.w, p.a, p.c, rows, p.group, p.zero, p.signed, p.n)
    return dequantize_rows_reference(p, rows)


def dequantize_rows_reference(p: Packed, rows: Tensor) -> Tensor:
    """:func:`dequantize_rows` in PyTorch."""
    v, a, c = unpack_rows(p, rows)
    w = a.repeat_interleave(p.group, dim=1) * v.to(torch.float32)
    if c is not None:
        w = w - c.repeat_interleave(p.group, dim=1)
    return w


# ---------------------------------------------------------------------------- reference
def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [m, k] float32 -> (xq [m, k] int8, dx [m, k / 32] float32, sums of xq per 16 [m, k / 16]
    int32): the kernel's activation quantization, op for op."""
    m, k = x.shape
    xb = x.reshape(m, k // XBLOCK, XBLOCK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(m, k)
    xs = xq.reshape(m, k // 16, 16).to(torch.int32).sum(-1, dtype=torch.int32)
    return xq, d, xs


def qlinear_reference(x: Tensor, p: Packed, chunk: int = 4096) -> Tensor:
    """Pure-PyTorch :func:`qlinear` with the same numbers (slower; used where nothing builds)."""
    x = x.to(torch.float32).contiguous()
    m = x.shape[0]
    xq, dx, xs = quantize_rows_reference(x)
    nb, g = p.k // p.group, p.group
    xq64 = xq.to(torch.float64).reshape(m, nb, g).transpose(0, 1)  # [nb, m, g]
    xsum = xs if g == 16 else xs.reshape(m, nb, 2).sum(-1, dtype=torch.int32)  # [m, nb]
    xsum_f = xsum.to(torch.float32)
    dblock = dx[:, (torch.arange(nb) * g) // XBLOCK]  # [m, nb]
    out = torch.empty(m, p.n, dtype=torch.float32)
    for s in range(0, p.n, chunk):
        rows = torch.arange(s, min(p.n, s + chunk))
        v, a, c = unpack_rows(p, rows)  # [r, k]
        v64 = v.to(torch.float64).reshape(-1, nb, g).permute(1, 2, 0)  # [nb, g, r]
        ints = torch.bmm(xq64, v64).to(torch.float32)  # [nb, m, r]: exact integers
        acc = torch.zeros(m, rows.shape[0], dtype=torch.float32)
        for j in range(nb):
            t = a[None, :, j] * ints[j]
            if c is not None:
                t = t - c[None, :, j] * xsum_f[:, j, None]
            acc = acc + dblock[:, j, None] * t
        out[:, s : s + rows.shape[0]] = acc
    return out


# ---------------------------------------------------------------------------- the extension
_lock = threading.Lock()
_state: dict[str, object] = {}


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()


def source_key() -> str:
    """A short hash of the kernels' C++ source: cached timings of quantized models (cost tables,
    the weights choice) name it, so a changed kernel is measured again."""
    return _source_hash()[:12]


def _build_dir() -> Path:
    h = hashlib.sha256(_source_hash().encode())
    h.update(torch.__version__.encode())
    return cache_root() / "kernels" / f"qmatmul-{h.hexdigest()[:16]}"


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ninja package installs it beside
    this interpreter, which is not on PATH when the virtual environment is not activated."""
    import shutil

    if shutil.which("ninja") is None:
        here = os.path.dirname(sys.executable)
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def load_extension(quiet: bool = False) -> bool:
    """Build (once, cached under the genrefine cache) and load the C++ kernels; False, with a
    one-line notice on stderr, when they cannot be built here (the PyTorch fallback then runs).
    ``GENREFINE_KERNELS=reference`` forces the fallback."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok, why = False, ""
        if os.environ.get("GENREFINE_KERNELS", "") == "reference":
            why = "GENREFINE_KERNELS=reference"
        else:
            try:
                from torch.utils import cpp_extension

                _ninja_on_path()
                out = _build_dir()
                out.mkdir(parents=True, exist_ok=True)
                if not quiet and not any(out.glob("*.so")):
                    print(
                        "genrefine: building the quantized CPU kernels (once, cached) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                cpp_extension.load(
                    name="genrefine_qmatmul",
                    sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(out),
                    is_python_module=False,
                    verbose=False,
                )
                ok = True
            except Exception as e:  # no compiler, no ninja, a failed build: all mean the fallback
                first = str(e).strip().splitlines()
                why = first[0][:200] if first else type(e).__name__
        if not ok and not quiet:
            print(
                f"genrefine: the C++ quantized kernels are not available ({why}); "
                "running the pure-PyTorch fallback (same numbers, slower)",
                file=sys.stderr,
                flush=True,
            )
        _state["ok"] = ok
        return ok


def best_isa() -> str:
    """The instruction set :func:`qlinear` uses on this CPU ("reference" without the extension)."""
    if not load_extension(quiet=True):
        return "reference"
    code = int(torch.ops.genrefine_q.best_isa())
    return {v: k for k, v in ISAS.items()}[code]


def qlinear(x: Tensor, p: Packed, isa: str | None = None) -> Tensor:
    """``x`` [m, k] (any float dtype) times the quantized weight ``p`` -> [m, n] float32.

    ``isa``: force one path ("generic", "avx2", "avx512-vnni", "reference"); default the best
    this CPU runs. All paths give the same bits.
    """
    if isa == "reference" or not load_extension():
        return qlinear_reference(x, p)
    code = -1 if isa is None else ISAS[isa]
    return torch.ops.genrefine_q.qlinear(
        x.reshape(-1, x.shape[-1]), p.w, p.a, p.c, p.group, p.zero, p.signed, p.n, p.bits, code
    )


def rmsnorm_reference(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """:func:`rmsnorm` in PyTorch, op for op (16 lanes summed in order, then pairwise)."""
    d = x.shape[-1]
    xr = x.reshape(-1, d // 16, 16)
    lanes = torch.zeros(xr.shape[0], 16, dtype=torch.float32)
    for i in range(d // 16):
        lanes = lanes + xr[:, i] * xr[:, i]
    width = 8
    while width >= 1:
        lanes = torch.cat([lanes[:, :width] + lanes[:, width : 2 * width], lanes[:, 2 * width :]], 1)
        width //= 2
    v = lanes[:, :1] / float(d) + torch.tensor(eps, dtype=torch.float32)
    # the correctly rounded float32 square root, as the C++ std::sqrt gives: float32 torch.sqrt
    # goes through MKL, which is not correctly rounded on AMD CPUs (1 in 6 values differed on
    # an EPYC); a float64 square root rounded to float32 is, for every float32 input
    inv = 1.0 / torch.sqrt(v.double()).float()
    y = (x.reshape(-1, d) * inv) * w
    return y.reshape(x.shape)


def rmsnorm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm of float32 rows over the last dim, ``(x * r) * w`` with
    ``r = 1 / sqrt(mean(x**2) + eps)``, in one call; the same bits as
    :func:`rmsnorm_reference` (its order of summation is fixed for every row)."""
    if not load_extension():
        return rmsnorm_reference(x, w, eps)
    return torch.ops.genrefine_q.rmsnorm(x, w, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for float32 ``x`` [..., n, D] and ``cos``/``sin``
    [n, D] in one call: bit for bit the PyTorch expression (each product and sum rounded once)."""
    if not load_extension():
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    return torch.ops.genrefine_q.rope(x, cos, sin)


_NO_TREE = torch.empty(0, dtype=torch.bool)  # "a causal chain" for the C++ ops
_NO_TIMING = torch.empty(0, dtype=torch.float64)


def _attention_args(start, positions, tree, window, scale, softcap) -> tuple:
    """The attention arguments :func:`attend` and :func:`fused_layer` pass to C++, as it takes them."""
    return (
        int(start), positions.to("cpu", torch.long),
        _NO_TREE if tree is None else tree.to("cpu", torch.bool), int(window or 0), float(scale),
        float(softcap or 0.0),
    )


def attend(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    start: int,
    positions: Tensor,
    tree: Tensor | None,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> Tensor:
    """Exact attention for ``q`` [H, n, D] (new tokens at slots ``start ..``, positions
    ``positions``) over a cache's ``keys``/``values`` [KV, S, D], all float32: each row sees the
    prefix (slot = position) and the new tokens ``tree`` [n, n] bool lets it see (None: a causal
    chain), within ``window``, in position order, and is computed the same way whatever else is
    in the call (see qmatmul.cpp). Needs the C++ extension (:func:`load_extension`)."""
    return torch.ops.genrefine_q.attend(
        q, keys, values, *_attention_args(start, positions, tree, window, scale, softcap)
    )


def layer_arguments(weights: list, norms: list[Tensor | None]) -> tuple:
    """The constant arguments of :func:`fused_layer` for one decoder layer, built once: the
    segments of ``weights`` (qkv, o, gate_up, down: QuantWeight-like, with ``.segments`` of
    :class:`Packed`) and the six norm weights (input, post-attention, pre-FFN, post-FFN, q, k;
    None where the model has none)."""
    ws, a_s, cs, meta = [], [], [], []
    for w in weights:
        meta.append(len(w.segments))
        for s in w.segments:
            ws.append(s.w)
            a_s.append(s.a)
            cs.append(s.c)
            meta.extend([s.group, s.zero, int(s.signed), s.n, s.bits])
    empty = torch.empty(0, dtype=torch.float32)
    return ws, a_s, cs, meta, [empty if t is None else t for t in norms]


def fused_layer(
    x: Tensor,
    args: tuple,
    eps: float,
    keys: Tensor,
    values: Tensor,
    start: int,
    positions: Tensor,
    tree: Tensor | None,
    window: int | None,
    scale: float,
    softcap: float | None,
    cos: Tensor,
    sin: Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    gelu: bool,
    timing: Tensor | None = None,
) -> Tensor:
    """One decoder layer of a quantized float32 model in one call: RMSNorm, the fused q/k/v
    matmul, q/k norms, rotary embedding, the new keys and values written into ``keys``/``values``
    (a cache's [KV, S, D] tensors) at slots ``start ..``, exact attention (:func:`attend`), the
    output matmul, the (sandwich) norms and residuals, and the gated MLP. The same kernels in the
    same order as the runtime's op-by-op path, so the same bits. ``args``:
    :func:`layer_arguments`; ``timing``: float64 [2] that gains the seconds spent in matmuls and
    in attention. Needs the C++ extension (:func:`load_extension`)."""
    ws, a_s, cs, meta, norms = args
    return torch.ops.genrefine_q.layer(
        x, ws, a_s, cs, meta, norms, float(eps), keys, values,
        *_attention_args(start, positions, tree, window, scale, softcap),
        cos, sin, int(heads), int(kv_heads), int(head_dim), bool(gelu),
        _NO_TIMING if timing is None else timing,
    )


def layer_stack(
    layer_args: Sequence[tuple], heads: int, kv_heads: int, head_dim: int, gelu: bool, eps: float,
    scale: float, softcap: float | None,
):
    """Every decoder layer of a quantized float32 model bound once (``layer_args``: one
    :func:`layer_arguments` per layer), for :func:`run_layer_stack`: the same computation as
    :func:`fused_layer` layer by layer, in one call per forward instead of one per layer."""
    ws, a_s, cs, meta, norms = [], [], [], [], []
    for w, a, c, m, nm in layer_args:
        ws += w
        a_s += a
        cs += c
        meta += m
        norms += nm
    return torch.classes.genrefine_q.LayerStack(
        ws, a_s, cs, meta, norms, int(heads), int(kv_heads), int(head_dim), bool(gelu), float(eps),
        float(scale), float(softcap or 0.0),
    )


def run_layer_stack(
    stack,
    x: Tensor,
    first: int,
    last: int,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    start: int,
    positions: Tensor,
    tree: Tensor | None,
    windows: Sequence[int],
    ropes: Sequence[int],
    cos: Sequence[Tensor],
    sin: Sequence[Tensor],
    timing: Tensor | None = None,
) -> Tensor:
    """``x`` through layers ``first .. last - 1`` of a :func:`layer_stack`: layer i writes its new
    keys and values into ``keys[i]``/``values[i]`` at slots ``start ..``, attends within
    ``windows[i]`` (0: all) and takes the rotary tables ``cos[ropes[i]]``/``sin[ropes[i]]``;
    ``timing`` as in :func:`fused_layer`."""
    return stack.run(
        x, int(first), int(last), list(keys), list(values), int(start), positions.to("cpu", torch.long),
        _NO_TREE if tree is None else tree.to("cpu", torch.bool), [int(w) for w in windows],
        [int(r) for r in ropes], list(cos), list(sin), _NO_TIMING if timing is None else timing,
    )


def run_layer_stack_batch(
    stack,
    x: Tensor,
    keys: Sequence[Sequence[Tensor]],
    values: Sequence[Sequence[Tensor]],
    starts: Sequence[int],
    positions: Sequence[Tensor],
    trees: Sequence[Tensor | None],
    sizes: Sequence[int],
    windows: Sequence[int],
    ropes: Sequence[int],
    cos: Sequence[Tensor],
    sin: Sequence[Tensor],
    timing: Tensor | None = None,
) -> Tensor:
    """Every layer of a :func:`layer_stack` for the rows of several sequences in one call: ``x``
    holds sequence b's ``sizes[b]`` rows after those of the sequences before it; everything but
    attention runs on all rows at once, and sequence b writes and attends over its own cache
    (``keys[b][i]``/``values[b][i]`` for layer i) at slots ``starts[b] ..`` with ``positions[b]``
    and ``trees[b]`` (None: a chain), as :func:`run_layer_stack` does for one. ``cos``/``sin``:
    every row's rotary tables, in the rows' order. Each sequence's rows get the bits its own
    :func:`run_layer_stack` gives them, since every kernel is row-invariant."""
    return stack.run_batch(
        x, [t for per in keys for t in per], [t for per in values for t in per],
        [int(s) for s in starts], [p.to("cpu", torch.long) for p in positions],
        [_NO_TREE if t is None else t.to("cpu", torch.bool) for t in trees], [int(n) for n in sizes],
        [int(w) for w in windows], [int(r) for r in ropes], list(cos), list(sin),
        _NO_TIMING if timing is None else timing,
    )


def argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(dim=-1)`` with the same answer (the first largest value; a NaN counts as
    largest), from the C++ kernel for float32 CPU logits: a vector max and a search per chunk of
    the vocabulary, on all threads (torch's takes about 0.3 ms per 262,144-token row here). It
    never builds the extension itself: where nothing has loaded it (float models), torch's runs."""
    if (
        logits.dtype != torch.float32
        or logits.device.type != "cpu"
        or logits.dim() == 0
        or logits.shape[-1] == 0
        or _state.get("ok") is not True
    ):
        return logits.argmax(dim=-1)
    lead = logits.shape[:-1]
    return torch.ops.genrefine_q.argmax_rows(logits.reshape(-1, logits.shape[-1])).reshape(lead)
