"""gguf_blocks: a GGUF's quantized weights as integers and exact scales.

Fast tests write small GGUF files whose blocks are random bytes (every bit pattern of the integer
fields; the fp16 scales random finite values, subnormals, negatives and zeros included) and check
``scale * (values - zero) - offset`` bit for bit against ``gguf.quants.dequantize``, which follows
ggml's reference dequantizers. Bit-exact holds for all four formats: every product involved is
exact in float32 (fp16 significand 11 bits, sub-scale at most 7, q - zero at most 6), so the order
of the multiplications cannot matter; the one rounding step, Q4_K's ``- dmin * m``, is the same
subtraction in both. The slow tests do the same for every 2-D weight of the embedded model and
compare with the float32 weights transformers produced (the project's converted cache).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from genrefine.models.gguf_blocks import DecodedTensor, decode_tensor, read_quantized

BLOCK = {T.Q8_0: (32, 34), T.Q5_0: (32, 22), T.Q4_K: (256, 144), T.Q6_K: (256, 210)}
F16_FIELDS = {T.Q8_0: [0], T.Q5_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}  # byte offsets of fp16 scales


def random_blocks(qtype, n: int, k: int, rng) -> np.ndarray:
    """Random valid blocks for ``n`` rows of ``k`` weights (# [n, k // block * bytes] uint8)."""
    block, nbytes = BLOCK[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = rng.standard_normal((n, k // block)) * 10.0 ** rng.uniform(-8, 2, (n, k // block))
        d[rng.random(d.shape) < 0.05] = 0.0
        raw[..., off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def write_gguf(path, tensors: dict, arch: str = "gemma3", kv: dict | None = None):
    """A GGUF file holding ``tensors`` (name -> (array, raw type or None)); returns its reader."""
    w = GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        w.add_uint32(key, value)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFReader(str(path))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def combine(d: DecodedTensor) -> np.ndarray:
    """``scale * (values - zero) - offset`` in float32, written out here (# [N, K])."""
    n, k = d.values.shape
    q = d.values.astype(np.float32) - np.float32(d.zero)
    w = np.repeat(d.scale, d.group, axis=1) * q
    if d.offset is not None:
        w = w - np.repeat(d.offset, d.group, axis=1)
    return w.reshape(n, k)


FORMATS = {T.Q8_0: ("q8_0", np.int8, -128, 127), T.Q5_0: ("q5_0", np.uint8, 0, 31),
           T.Q4_K: ("q4_k", np.uint8, 0, 15), T.Q6_K: ("q6_k", np.uint8, 0, 63)}


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_random_blocks_match_gguf_dequantize_bitwise(qtype, tmp_path):
    rng = np.random.default_rng(int(qtype))
    n, k = 24, 512
    raw = random_blocks(qtype, n, k, rng)
    (t,) = write_gguf(tmp_path / "x.gguf", {"w": (raw, qtype)}).tensors
    d = decode_tensor(t)
    fmt, dtype, lo, hi = FORMATS[qtype]
    assert (d.fmt, d.values.dtype, d.values.shape) == (fmt, dtype, (n, k))
    assert d.values.min() >= lo and d.values.max() <= hi
    assert d.scale.dtype == np.float32 and d.scale.shape == (n, k // d.group)
    assert (d.offset is not None) == (qtype == T.Q4_K)
    ref = dequantize(raw, qtype).reshape(n, k)
    assert np.array_equal(bits(combine(d)), bits(ref))
    assert np.array_equal(bits(d.dequantize()), bits(ref))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0], ids=lambda t: t.name)
def test_quantized_weights_decode_to_gguf_dequantize(qtype, tmp_path):
    """Blocks as gguf's quantizer writes them (ggml's rounding), not only random bytes."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    raw = quantize(w, qtype)
    (t,) = write_gguf(tmp_path / "x.gguf", {"w": (raw, qtype)}).tensors
    d = decode_tensor(t)
    assert np.array_equal(bits(combine(d)), bits(dequantize(raw, qtype)))
    assert np.abs(d.dequantize() - w).max() < 0.1 * np.abs(w).max()


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_scaled_values_are_exact(qtype, tmp_path):
    """``scale * (values - zero)`` loses nothing in float32: the same product in float64 agrees."""
    rng = np.random.default_rng(3)
    raw = random_blocks(qtype, 8, 512, rng)
    (t,) = write_gguf(tmp_path / "x.gguf", {"w": (raw, qtype)}).tensors
    d = decode_tensor(t)
    q = d.values.astype(np.int64) - d.zero
    s32 = np.repeat(d.scale, d.group, axis=1)
    assert np.array_equal(s32 * q.astype(np.float32), s32.astype(np.float64) * q)
    if d.offset is not None:  # q4_k's offset: dmin * m exact as well (dmin and m from the bytes)
        blocks = raw.reshape(8, -1, 144)
        dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        m = d.offset.reshape(8, -1, 8).astype(np.float64) / np.where(dmin == 0, 1, dmin)[..., None]
        assert np.array_equal(m, np.round(m)) and m.min() >= 0 and m.max() <= 63


def test_q6_k_product_order_does_not_matter(tmp_path):
    """ggml computes ``(d * sc) * q`` for Q6_K; ``d * (sc * q)`` gives the same float32 bits."""
    rng = np.random.default_rng(11)
    n = 8
    raw = random_blocks(T.Q6_K, n, 512, rng)
    (t,) = write_gguf(tmp_path / "x.gguf", {"w": (raw, T.Q6_K)}).tensors
    dec = decode_tensor(t)
    blocks = raw.reshape(n, -1, 210)
    d = np.repeat(blocks[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32), 256, axis=1)
    sc = np.repeat(blocks[..., 192:208].copy().view(np.int8).reshape(n, -1).astype(np.float32), 16, axis=1)
    q = dec.values.astype(np.float32) - 32
    assert np.array_equal(bits(d * (sc * q)), bits((d * sc) * q))
    assert np.array_equal(bits(d * (sc * q)), bits(dequantize(raw, T.Q6_K)))


def test_unsupported_type_raises_naming_it(tmp_path):
    raw = quantize(np.ones((4, 64), np.float32), T.Q4_0)
    path = tmp_path / "x.gguf"
    (t,) = write_gguf(path, {"blk.0.attn_q.weight": (raw, T.Q4_0)}).tensors
    with pytest.raises(ValueError, match="Q4_0"):
        decode_tensor(t)
    with pytest.raises(ValueError, match="Q4_0"):
        read_quantized(path)


def test_read_quantized_names_and_float_weights(tmp_path):
    rng = np.random.default_rng(5)
    f16 = rng.standard_normal((8, 32)).astype(np.float16)
    bf16 = rng.standard_normal((8, 64)).astype(np.float32)
    bf16_raw = (bf16.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(8, 128)
    tensors = {
        "token_embd.weight": (random_blocks(T.Q8_0, 16, 64, rng), T.Q8_0),
        "output.weight": (f16, None),
        "output_norm.weight": (np.ones(64, np.float32), None),
        "blk.0.attn_q.weight": (random_blocks(T.Q5_0, 8, 64, rng), T.Q5_0),
        "blk.0.attn_k.weight": (rng.standard_normal((4, 64)).astype(np.float32), None),
        "blk.0.attn_v.weight": (bf16_raw, T.BF16),
        "blk.0.attn_output.weight": (random_blocks(T.Q4_K, 64, 256, rng), T.Q4_K),
        "blk.0.ffn_gate.weight": (random_blocks(T.Q6_K, 4, 256, rng), T.Q6_K),
        "blk.0.ffn_up.weight": (random_blocks(T.Q5_0, 4, 64, rng), T.Q5_0),
        "blk.1.ffn_down.weight": (random_blocks(T.Q4_K, 8, 256, rng), T.Q4_K),
        "blk.1.attn_norm.weight": (np.ones(64, np.float32), None),
    }
    path = tmp_path / "m.gguf"
    reader = write_gguf(path, tensors)
    sd = read_quantized(path)
    assert sorted(sd) == sorted([
        "model.embed_tokens.weight", "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ])
    assert sd["model.layers.0.self_attn.v_proj.weight"].dtype == np.float32
    assert np.array_equal(bits(sd["model.layers.0.self_attn.v_proj.weight"]), bf16.view(np.uint32) >> 16 << 16)
    assert np.array_equal(sd["lm_head.weight"], f16.astype(np.float32))
    assert np.array_equal(sd["model.layers.0.self_attn.k_proj.weight"], tensors["blk.0.attn_k.weight"][0])
    assert sd["model.layers.1.mlp.down_proj.weight"].fmt == "q4_k"
    for t in reader.tensors:  # the quantized ones: the same numbers as gguf's dequantize
        if t.tensor_type in BLOCK:
            hf = {"token_embd.weight": "model.embed_tokens.weight"}.get(t.name)
            if hf is None:
                i, kind = t.name.split(".")[1:3]
                part = {"attn_q": "self_attn.q_proj", "attn_output": "self_attn.o_proj",
                        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[kind]
                hf = f"model.layers.{i}.{part}.weight"
            ref = dequantize(t.data, t.tensor_type)
            assert np.array_equal(bits(sd[hf].dequantize()), bits(ref))


def test_llama_q_and_k_rows_in_transformers_order(tmp_path):
    """llama.cpp permutes a Llama's q/k rows; transformers undoes it, and read_quantized does too."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(9)
    heads, kv_heads, head_dim, hidden = 4, 2, 8, 64
    q = random_blocks(T.Q4_K, heads * head_dim, 256, rng)
    k = random_blocks(T.Q8_0, kv_heads * head_dim, hidden, rng)
    v = random_blocks(T.Q8_0, kv_heads * head_dim, hidden, rng)
    path = tmp_path / "llama.gguf"
    write_gguf(
        path,
        {"blk.0.attn_q.weight": (q, T.Q4_K), "blk.0.attn_k.weight": (k, T.Q8_0), "blk.0.attn_v.weight": (v, T.Q8_0)},
        arch="llama",
        kv={"llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads},
    )
    sd = read_quantized(path)
    proc = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for name, raw, qtype in [("q", q, T.Q4_K), ("k", k, T.Q8_0), ("v", v, T.Q8_0)]:
        gguf_name = f"blk.0.attn_{name}.weight"
        want = proc.process(dequantize(raw, qtype), gguf_name).weights
        got = sd[f"model.layers.0.self_attn.{name}_proj.weight"].dequantize()
        assert np.array_equal(bits(got), bits(want)), name
    assert not np.array_equal(dequantize(q, T.Q4_K), sd["model.layers.0.self_attn.q_proj.weight"].dequantize())


# --- the embedded model (slow: GGUFReader alone parses its 262k-token vocabulary for seconds) ---


@pytest.fixture(scope="module")
def embedded():
    from genrefine.models.default import embedded_model_path

    path = embedded_model_path()
    return path, GGUFReader(str(path))


@pytest.mark.slow
def test_embedded_every_weight_matches_gguf_dequantize(embedded):
    _, reader = embedded
    fmts = set()
    for t in reader.tensors:
        if len(t.shape) == 2:
            d = decode_tensor(t)
            fmts.add(d.fmt)
            assert np.array_equal(bits(d.dequantize()), bits(dequantize(t.data, t.tensor_type))), t.name
    assert fmts == {"q8_0", "q5_0", "q4_k", "q6_k"}


@pytest.mark.slow
def test_embedded_weights_equal_transformers_conversion(embedded):
    """Every linear weight equals the float32 weight transformers gave the converted cache."""
    from safetensors import safe_open

    from genrefine.models.loading import converted_dir, load_model, resolve_source

    path, _ = embedded
    st = converted_dir(resolve_source(None)) / "model.safetensors"
    if not st.exists():
        load_model(quiet=True)  # converts once through transformers
    sd = read_quantized(path)
    assert len(sd) == 1 + 7 * 18  # tied lm_head: only the embedding
    with safe_open(str(st), "np") as f:
        for name, w in sd.items():
            ref = f.get_tensor(name)
            assert ref.dtype == np.float32 and ref.shape == w.values.shape, name
            assert np.array_equal(bits(w.dequantize()), ref.view(np.uint32)), name


def test_packed_cache_keeps_narrow_values_and_half_scales(tmp_path):
    """load_packed writes the kernels' layout once (Q5_0 and Q4_K narrow, Q8_0 and Q5_0 scales in
    float16), reads back the same weights from its cache, and drops an earlier layout's file."""
    import torch

    from genrefine.kernels import qlinear
    from genrefine.models.quant import PACKED_FILE, load_packed

    rng = np.random.default_rng(21)
    tensors = {
        "token_embd.weight": (random_blocks(T.Q8_0, 16, 64, rng), T.Q8_0),
        "blk.0.attn_q.weight": (random_blocks(T.Q5_0, 8, 64, rng), T.Q5_0),
        "blk.0.attn_output.weight": (random_blocks(T.Q4_K, 64, 256, rng), T.Q4_K),
        "blk.0.ffn_down.weight": (random_blocks(T.Q6_K, 4, 256, rng), T.Q6_K),
    }
    path = tmp_path / "m.gguf"
    write_gguf(path, tensors)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "gguf-packed-v1.safetensors").write_bytes(b"stale")
    first = load_packed(path, cache)
    assert sorted(p.name for p in cache.iterdir()) == [PACKED_FILE]
    again = load_packed(path, cache)
    bits = {}
    for name, w in first.items():
        seg = w.segments[0]
        bits[seg.fmt] = (seg.bits, seg.a.dtype)
        other = again[name].segments[0]
        assert (other.bits, other.a.dtype) == (seg.bits, seg.a.dtype)
        x = torch.randn(3, seg.k, generator=torch.Generator().manual_seed(22))
        assert torch.equal(qlinear(x, seg), qlinear(x, other))
    assert bits["q5_0"] == (5, torch.float16) and bits["q8_0"] == (8, torch.float16)
    assert bits["q4_k"][0] == 4 and bits["q6_k"][0] == 8


def test_one_gguf_parse_shares_a_reader_per_file_and_restores_the_class(tmp_path):
    """A first load parses the GGUF's metadata once, not once for each of transformers' config,
    tokenizer and weights (genrefine.models.loading.one_gguf_parse)."""
    import gguf

    from genrefine.models.loading import one_gguf_parse

    path = tmp_path / "a.gguf"
    write_gguf(path, {"w": (np.ones((2, 32), np.float32), None)})
    original = gguf.GGUFReader
    with one_gguf_parse():
        a = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is a  # the same file, as a str or a Path
        with one_gguf_parse():  # nested: the outer block's readers
            assert gguf.GGUFReader(str(path)) is a
        assert gguf.GGUFReader(str(path), "c") is not a  # another mode is another reader
        assert a.tensors[0].name == "w"
    assert gguf.GGUFReader is original
    with pytest.raises(RuntimeError), one_gguf_parse():
        raise RuntimeError("a failed load")
    assert gguf.GGUFReader is original  # restored after an error too
    assert gguf.GGUFReader(str(path)) is not gguf.GGUFReader(str(path))
