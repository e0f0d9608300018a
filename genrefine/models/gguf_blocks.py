"""A GGUF file's quantized weights as integers and exact scales, for integer kernels.

transformers (and ``gguf.quants.dequantize``) turn every quantized block into float32 weights; a
kernel that multiplies by those floats has lost the block structure and cannot go back to the
integers without re-rounding. Here each supported block format is split into

* ``values``: the integers as stored (``[N, K]``: N rows of K weights, as a linear layer's
  ``weight``), with an integer ``zero`` point per format;
* ``scale`` (and for Q4_K ``offset``): one float32 per sub-block of ``group`` weights.

so that the weight ggml's reference dequantizer gives is ``scale * (values - zero) - offset``
within each sub-block. Every scale is an exact float32 product of the file's fp16 super-scale and
its small integer sub-scale (fp16 has an 11-bit significand, the sub-scales at most 7 bits), and
``scale * (values - zero)`` is exact too (at most 11 + 7 + 5 = 23 significant bits for Q6_K): no
rounding happens anywhere except Q4_K's final subtraction of ``offset``, which ggml does the same
way.

Block layouts (ggml's ``ggml-quants.c``, ``dequantize_row_*``; QK_K = 256):

* Q8_0, 32 weights in 34 bytes: fp16 ``d``, 32 int8 ``q``; ``w = d * q``.
* Q5_0, 32 weights in 22 bytes: fp16 ``d``, 4 bytes ``qh`` (little-endian uint32), 16 bytes
  ``qs``. Weight ``i < 16`` is the low nibble of ``qs[i]`` with bit ``i`` of ``qh`` as bit 4, weight
  ``i + 16`` the high nibble with bit ``i + 16``; ``w = d * (q - 16)``.
* Q4_K, 256 weights in 144 bytes: fp16 ``d``, fp16 ``dmin``, 12 bytes packing eight 6-bit scales
  ``sc`` and mins ``m``, 128 bytes ``qs``. Chunk ``c`` of 64 weights reads 32 bytes: low nibbles
  are sub-block ``2c``, high nibbles sub-block ``2c + 1``; ``w = (d * sc) * q - dmin * m``.
* Q6_K, 256 weights in 210 bytes: 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits),
  16 int8 scales, fp16 ``d``; sixteen sub-blocks of 16, ``w = (d * sc) * (q - 32)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

QK_K = 256

_GROUP = {"q8_0": 32, "q5_0": 32, "q4_k": 32, "q6_k": 16}
_ZERO = {"q8_0": 0, "q5_0": 16, "q4_k": 0, "q6_k": 32}
_BLOCK = {"q8_0": (32, 34), "q5_0": (32, 22), "q4_k": (QK_K, 144), "q6_k": (QK_K, 210)}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass
class DecodedTensor:
    """One quantized 2-D weight as stored: integers, a zero point and per-sub-block scales.

    The dequantized weight of row ``n``, column ``k`` is
    ``scale[n, k // group] * (values[n, k] - zero) - offset[n, k // group]`` (no ``offset`` term
    when it is None), computed in float32; this equals ggml's reference dequantization.
    """

    fmt: str  # "q8_0", "q5_0", "q4_k" or "q6_k"
    # values: [N, K] int8 for q8_0 (the signed q); uint8 for the others, the stored unsigned q
    # (q5_0 0..31, q4_k 0..15, q6_k 0..63)
    values: np.ndarray
    group: int  # weights per scale: 32 (q8_0, q5_0, q4_k) or 16 (q6_k)
    zero: int  # integer zero point: q8_0 0, q5_0 16, q4_k 0, q6_k 32
    scale: np.ndarray  # [N, K // group] float32: d (q8_0, q5_0), d * sc_j (q4_k, q6_k), exact
    offset: np.ndarray | None  # [N, K // group] float32: dmin * m_j for q4_k (exact); else None

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[N, K]``, as ggml's reference dequantizer computes it."""
        n, k = self.values.shape
        q = self.values.astype(np.float32) - np.float32(self.zero)
        q = q.reshape(n, k // self.group, self.group)
        w = self.scale[..., None] * q
        if self.offset is not None:
            w = w - self.offset[..., None]
        return w.reshape(n, k)

    def permute_rows(self, perm: np.ndarray) -> DecodedTensor:
        """The same tensor with row ``i`` taken from row ``perm[i]`` (# perm: [N])."""
        return DecodedTensor(
            self.fmt,
            self.values[perm],
            self.group,
            self.zero,
            self.scale[perm],
            None if self.offset is None else self.offset[perm],
        )


def _f16(b: np.ndarray) -> np.ndarray:
    """Two little-endian bytes on the last axis (# b: [..., 2] uint8) as float32 (# [...])."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _q8_0(blocks: np.ndarray):  # blocks: [N, nb, 34]
    n, nb, _ = blocks.shape
    d = _f16(blocks[..., 0:2])  # [N, nb]
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, nb * 32)
    return q, d, None


def _q5_0(blocks: np.ndarray):  # blocks: [N, nb, 22]
    n, nb, _ = blocks.shape
    d = _f16(blocks[..., 0:2])  # [N, nb]
    hbits = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # [N, nb, 32]: bit i of qh
    qs = blocks[..., 6:22]  # [N, nb, 16]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32]
    q = low | (hbits << 4)
    return q.reshape(n, nb * 32), d, None


def _q4_k(blocks: np.ndarray):  # blocks: [N, nb, 144]
    n, nb, _ = blocks.shape
    d = _f16(blocks[..., 0:2])  # [N, nb]
    dmin = _f16(blocks[..., 2:4])
    s = blocks[..., 4:16]  # [N, nb, 12]: get_scale_min_k4
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)  # [N, nb, 8]
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:144].reshape(n, nb, 4, 1, 32)  # chunk c of 64 weights: 32 bytes
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3)  # [N, nb, 4, 2, 32]: sub-block 2c, 2c + 1
    scale = d[..., None] * sc.astype(np.float32)  # exact: 11 x 6 bits
    offset = dmin[..., None] * m.astype(np.float32)
    return q.reshape(n, nb * QK_K), scale.reshape(n, nb * 8), offset.reshape(n, nb * 8)


def _q6_k(blocks: np.ndarray):  # blocks: [N, nb, 210]
    n, nb, _ = blocks.shape
    ql = blocks[..., 0:128].reshape(n, nb, 2, 1, 64)  # two halves of 128 weights
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8)  # [N, nb, 16]
    d = _f16(blocks[..., 208:210])  # [N, nb]
    # within a half, weight 32 * j + l (j = 0..3, l = 0..31): ql[l] low, ql[l + 32] low, ql[l] high,
    # ql[l + 32] high nibble for j = 0, 1, 2, 3, with bits 2j, 2j + 1 of qh[l] on top
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(n, nb, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3  # [N, nb, 2, 4, 32]
    q = low | (high << 4)
    scale = d[..., None] * sc.astype(np.float32)  # exact: 11 x 7 bits (and the sign)
    return q.reshape(n, nb * QK_K), scale.reshape(n, nb * 16), None


_DECODERS = {"q8_0": _q8_0, "q5_0": _q5_0, "q4_k": _q4_k, "q6_k": _q6_k}


def decode_tensor(tensor) -> DecodedTensor:
    """Decode one quantized 2-D tensor of a ``gguf.GGUFReader`` into integers and scales.

    ``tensor`` is a ``gguf.ReaderTensor`` of type Q8_0, Q5_0, Q4_K or Q6_K with GGUF's shape
    ``(ne0, ne1) = (K, N)``: N rows of K weights, the layout of a linear layer's ``weight``. The
    arrays returned are new (not views of the file's memory map). Any other type, or a tensor that
    is not 2-D, raises ValueError naming it.
    """
    type_name = tensor.tensor_type.name
    fmt = type_name.lower()
    if fmt not in _DECODERS:
        raise ValueError(
            f"tensor {tensor.name!r} has type {type_name}: "
            "only Q8_0, Q5_0, Q4_K and Q6_K decode to blocks"
        )
    shape = [int(x) for x in tensor.shape]
    if len(shape) != 2:
        raise ValueError(f"tensor {tensor.name!r} ({type_name}) has shape {shape}: not 2-D")
    k, n = shape
    block, nbytes = _BLOCK[fmt]
    if k % block:
        raise ValueError(f"tensor {tensor.name!r} ({type_name}): row length {k} % {block} != 0")
    raw = np.asarray(tensor.data).view(np.uint8).reshape(n, k // block, nbytes)
    values, scale, offset = _DECODERS[fmt](raw)
    return DecodedTensor(
        fmt=fmt,
        values=np.ascontiguousarray(values),
        group=_GROUP[fmt],
        zero=_ZERO[fmt],
        scale=np.ascontiguousarray(scale, dtype=np.float32),
        offset=None if offset is None else np.ascontiguousarray(offset, dtype=np.float32),
    )


def _float_tensor(tensor) -> np.ndarray:
    """An F32/F16/BF16 2-D tensor as float32 ``[N, K]``."""
    k, n = (int(x) for x in tensor.shape)
    name = tensor.tensor_type.name
    data = np.asarray(tensor.data)
    if name == "F32":
        out = data.view(np.float32)
    elif name == "F16":
        out = data.view(np.float16).astype(np.float32)
    else:  # BF16: the top half of a float32
        out = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.array(out.reshape(n, k), dtype=np.float32)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def _field(reader, key: str):
    """A scalar metadata value (a string or a number), None when absent."""
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    part = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part[0].item()


def _unpermute_qk(n_rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's q/k permutation for Llama (transformers' reverse permute).

    The converter interleaved each head's two rotary halves; ``perm[i]`` is the GGUF row that
    transformers' row ``i`` comes from (# [n_rows]).
    """
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(n_rows)


def read_quantized(path) -> dict[str, DecodedTensor | np.ndarray]:
    """Every 2-D linear weight of a Gemma/Llama-style GGUF file, under transformers' names.

    ``token_embd.weight`` becomes ``model.embed_tokens.weight``, ``output.weight``
    ``lm_head.weight`` (absent when the file ties it to the embedding), and ``blk.{i}``'s
    ``attn_q/attn_k/attn_v/attn_output`` and ``ffn_gate/ffn_up/ffn_down`` become
    ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` and
    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``.
    Quantized weights come back as :class:`DecodedTensor`, F32/F16/BF16 ones as float32 arrays
    ``[N, K]``. 1-D tensors (norms) and 2-D tensors outside these names are left out. As in
    transformers, a ``llama`` file's q/k rows are put back in Hugging Face's order. A quantized
    type other than Q8_0, Q5_0, Q4_K, Q6_K raises ValueError naming the tensor and type.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    heads = kv_heads = None
    if arch == "llama":
        heads = _field(reader, "llama.attention.head_count")
        kv_heads = _field(reader, "llama.attention.head_count_kv") or heads
    out: dict[str, DecodedTensor | np.ndarray] = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        name = _hf_name(t.name)
        if name is None:
            continue
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            w: DecodedTensor | np.ndarray = _float_tensor(t)
        else:
            w = decode_tensor(t)
        if heads and (".attn_q." in t.name or ".attn_k." in t.name):
            perm = _unpermute_qk(int(t.shape[1]), int(heads if ".attn_q." in t.name else kv_heads))
            w = w.permute_rows(perm) if isinstance(w, DecodedTensor) else w[perm]
        out[name] = w
    return out
