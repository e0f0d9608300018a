"""The quantized kernels (genrefine/kernels): every instruction-set path and the PyTorch
fallback give the same bits, rows never depend on how many are computed together, and outputs
stay within a stated bound of float64 arithmetic on the dequantized weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from genrefine.kernels import (
    ISAS,
    Packed,
    best_isa,
    dequantize_rows,
    load_extension,
    pack,
    qlinear,
    qlinear_reference,
    quantize_rows_reference,
)
from genrefine.models.quant import QuantWeight, quantize_weight

BUILT = load_extension(quiet=True)
# the paths this CPU can run: the best one and everything below it
_ORDER = ["generic", "avx2", "avx512-vnni", "amx"]
PATHS = ["reference"] + (_ORDER[: _ORDER.index(best_isa()) + 1] if BUILT else [])

# (values kind, group, zero, offsets): the shapes of Q8_0, Q5_0, Q4_K and Q6_K
KINDS = {
    "q8_0": ("signed", 32, 0, False),
    "q5_0": (31, 32, 16, False),
    "q4_k": (15, 32, 0, True),
    "q6_k": (63, 16, 32, False),
    "top": (128, 32, 0, True),  # the largest unsigned byte the AVX2 path takes
}


def random_packed(kind: str, n: int, k: int, seed: int = 0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    vmax, group, zero, offsets = KINDS[kind]
    if vmax == "signed":
        values = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    else:
        values = torch.randint(0, vmax + 1, (n, k), generator=g).to(torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.02
    offset = torch.rand(n, k // group, generator=g) * 0.1 if offsets else None
    return pack(values, scale, offset, group, zero, kind)


def test_the_extension_builds_here() -> None:
    """CI machines have gcc: the C++ kernels must build there (the fallback is for others)."""
    assert BUILT
    assert best_isa() in ISAS


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_path_gives_the_reference_bits(kind: str) -> None:
    p = random_packed(kind, 45, 128)  # 45 rows: a partial last group
    g = torch.Generator().manual_seed(1)
    for m in (1, 2, 3, 4, 5, 16, 63, 64, 65, 130):
        x = torch.randn(m, 128, generator=g) * 3
        x[0, :32] = 0.0  # an all-zero block (scale 0)
        ref = qlinear_reference(x, p)
        for path in PATHS:
            assert torch.equal(qlinear(x, p, path), ref), (path, m)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_path_on_short_and_odd_reductions(kind: str) -> None:
    """1 to 14 sub-blocks per output: the 16-row AMX loop keeps sub-blocks in flight and cycles
    its tiles and buffers with periods 2, 3 and 6, so each count ends it at a different place.
    Rows: whole 16-row tiles, a last tile padded from 5 or 13 rows, and remainders too short for
    one (the vector loop)."""
    g = torch.Generator().manual_seed(21)
    for k in (32, 64, 96, 160, 224):
        p = random_packed(kind, 33, k, seed=k)
        for m in (5, 13, 16, 17, 29, 32):
            x = torch.randn(m, k, generator=g) * 3
            ref = qlinear_reference(x, p)
            for path in PATHS:
                assert torch.equal(qlinear(x, p, path), ref), (path, k, m)


@pytest.mark.parametrize("kind", ["q8_0", "q4_k", "q6_k"])
def test_rows_are_batch_invariant_for_1_to_64_rows(kind: str) -> None:
    """Row r of an m-row call equals the one-row call on that row, bit for bit, m = 1..64."""
    p = random_packed(kind, 40, 96, seed=2)
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    single = torch.cat([qlinear(x[r : r + 1], p) for r in range(64)])
    for m in range(1, 65):
        assert torch.equal(qlinear(x[:m], p), single[:m]), m


@pytest.mark.parametrize("kind", list(KINDS))
def test_within_the_stated_bound_of_float64(kind: str) -> None:
    """|y - W x| <= sum over 32-blocks of (amax_b / 254) * sum_b |w| + 1e-5 * sum |w| |x|:
    the activations' int8 rounding (at most half a step, amax / 254, per element) plus float32
    rounding, with W the dequantized weights in float64."""
    p = random_packed(kind, 33, 160, seed=4)
    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(5))
    w = dequantize_rows(p, torch.arange(p.n)).double()  # [n, k]
    exact = x.double() @ w.T
    y = qlinear(x, p).double()
    amax = x.double().reshape(7, 5, 32).abs().amax(-1)  # [m, blocks]
    wabs = w.abs().reshape(p.n, 5, 32).sum(-1)  # [n, blocks]
    bound = (amax / 254.0) @ wabs.T + 1e-5 * (x.double().abs() @ w.abs().T)
    assert bool(((y - exact).abs() <= bound).all())
    assert float((y - exact).abs().max()) > 0  # the bound is not vacuous: rounding happens


def test_a_changed_weight_changes_the_output() -> None:
    """The equality checks above can fail: one byte changed shows in its output column."""
    p = random_packed("q4_k", 32, 64, seed=6)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    before = qlinear(x, p)
    assert p.bits == 4  # stored two values a byte: byte 2 * 64 + 5 * 4 + 1 of a sub-block
    w = p.w.clone()
    w[1, 0, 2 * 64 + 5 * 4 + 1] ^= 3  # output row 16 + 5 (low nibble: vector 2)
    changed = qlinear(x, Packed(w, p.a, p.c, p.group, p.zero, p.signed, p.n, p.fmt, p.bits))
    diff = (changed != before).any(0).nonzero().flatten().tolist()
    assert diff == [21]


def test_activation_quantization_matches_the_kernel() -> None:
    if not BUILT:
        pytest.skip("no C++ extension on this machine")
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(8)) * 10
    x[1, 32:64] = 0.0
    # ties: with amax 127 the scale is 1, so x * (1 / d) lands on halves, which round to even
    x[5] = torch.arange(96, dtype=torch.float32) - 47.5
    x[5, 0] = 127.0
    x[6] = torch.randn(96, generator=torch.Generator().manual_seed(9)) * 1e-30  # tiny scales
    ref = quantize_rows_reference(x)
    for path in (0, 1, 2, -1):  # plain C++, AVX2, AVX-512, the best here (past the CPU: the best)
        ours = torch.ops.genrefine_q.quantize(x, path)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), path


def test_pack_keeps_values_and_scales_exactly() -> None:
    g = torch.Generator().manual_seed(9)
    values = torch.randint(0, 16, (20, 64), generator=g).to(torch.uint8)
    scale, offset = torch.rand(20, 2, generator=g), torch.rand(20, 2, generator=g)
    p = pack(values, scale, offset, 32, 0)
    rows = torch.tensor([19, 0, 7])
    want = scale[rows].repeat_interleave(32, 1) * values[rows].float() - offset[rows].repeat_interleave(32, 1)
    assert torch.equal(dequantize_rows(p, rows), want)
    with pytest.raises(ValueError, match="above 128"):
        pack(torch.full((2, 32), 200, dtype=torch.uint8), torch.ones(2, 1), None, 32, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(2, 48, dtype=torch.uint8), torch.ones(2, 3), None, 16, 0)


def test_small_values_are_stored_narrow_and_give_the_same_bits() -> None:
    """Values below 16 (Q4_K) take 4 bits and below 32 (Q5_0) 5 bits a value; the narrow layout
    widens back to the bytes, and every path gives the same outputs as the same weight stored
    a byte a value."""
    from genrefine.kernels import block_bytes, narrow_block, widen_block

    for kind, bits in (("q4_k", 4), ("q5_0", 5), ("q6_k", 8), ("q8_0", 8)):
        p = random_packed(kind, 37, 128, seed=11)
        assert p.bits == bits
        if bits == 8:
            continue
        wide = widen_block(p.w, p.group, bits)
        assert p.w.shape[-1] == block_bytes(p.group, bits) < wide[0, 0].numel()
        assert torch.equal(narrow_block(wide, bits), p.w)
        as_bytes = Packed(wide.contiguous(), p.a, p.c, p.group, p.zero, p.signed, p.n, p.fmt, 8)
        x = torch.randn(20, 128, generator=torch.Generator().manual_seed(12))
        for path in PATHS:
            assert torch.equal(qlinear(x, p, path), qlinear(x, as_bytes, path)), (kind, path)


@pytest.mark.parametrize("kind", ["q4_k", "q5_0", "q6_k", "top"])
@pytest.mark.parametrize("group", [16, 32])
def test_largest_values_against_largest_activations(kind: str, group: int) -> None:
    """Every weight at its format's largest value against activations that quantize to +-127
    in every place: the integer sums the vector paths add in 16 bits before widening (several
    multiply pairs of narrow values) stay exact, so every path still gives the reference."""
    vmax, _, zero, offsets = KINDS[kind]
    k = 256
    values = torch.full((37, k), vmax, dtype=torch.uint8)
    values[5] = 0  # and the smallest, once
    g = torch.Generator().manual_seed(23)
    scale = torch.rand(37, k // group, generator=g) * 0.02
    offset = torch.rand(37, k // group, generator=g) * 0.1 if offsets else None
    p = pack(values, scale, offset, group, zero, kind)
    x = torch.ones(6, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    x[3] = torch.where(torch.arange(k) % 3 == 0, 1.0, -1.0)
    x[4:] = torch.randn(2, k, generator=g).sign()
    ref = qlinear_reference(x, p)
    for path in PATHS:
        for m in (1, 6):
            assert torch.equal(qlinear(x[:m], p, path), ref[:m]), (path, m)


@pytest.mark.parametrize("kind", ["q8_0", "q5_0", "q4_k"])
def test_float16_scales_are_kept_as_float16_and_give_the_same_bits(kind: str) -> None:
    """Scales that are exactly float16 (Q8_0's and Q5_0's in a GGUF file) are stored so; every
    path, the fallback included, gives what the same weight with float32 scales gives."""
    g = torch.Generator().manual_seed(14)
    vmax, group, zero, offsets = KINDS[kind]
    if vmax == "signed":
        values = torch.randint(-128, 128, (37, 128), generator=g).to(torch.int8)
    else:
        values = torch.randint(0, vmax + 1, (37, 128), generator=g).to(torch.uint8)
    scale = (torch.rand(37, 128 // group, generator=g) * 0.02).half().float()
    offset = torch.rand(37, 128 // group, generator=g) * 0.1 if offsets else None
    p = pack(values, scale, offset, group, zero, kind)
    assert p.a.dtype == torch.float16
    wide = Packed(p.w, p.a.float(), p.c, p.group, p.zero, p.signed, p.n, p.fmt, p.bits)
    assert pack(values, scale + 1e-9, offset, group, zero, kind).a.dtype == torch.float32
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(15))
    want = qlinear_reference(x, wide)
    for path in PATHS:
        assert torch.equal(qlinear(x, p, path), want), path
        assert torch.equal(qlinear(x, wide, path), want), path
    assert torch.equal(dequantize_rows(p, torch.arange(37)), dequantize_rows(wide, torch.arange(37)))


@pytest.mark.skipif(not BUILT, reason="the C++ row lookup needs the extension")
@pytest.mark.parametrize("kind", ["q8_0", "q6_k", "top", "q4_k"])
def test_dequantized_rows_are_the_reference_bits(kind: str) -> None:
    """An embedding lookup (kernels.dequantize_rows: C++ for 8-bit layouts) gives the PyTorch
    arithmetic's bits for any rows, repeated and out of order, float16 or float32 scales, with
    and without offsets; a row past the weight is an error, not a read past it."""
    from genrefine.kernels import dequantize_rows_reference

    p = random_packed(kind, 45, 128, seed=31)
    rows = torch.tensor([44, 0, 17, 17, 31, 2])
    got = dequantize_rows(p, rows)
    assert got.dtype == torch.float32 and got.shape == (6, 128)
    assert torch.equal(got, dequantize_rows_reference(p, rows))
    half = Packed(p.w, p.a.half(), p.c, p.group, p.zero, p.signed, p.n, p.fmt, p.bits)
    assert torch.equal(dequantize_rows(half, rows), dequantize_rows_reference(half, rows))
    assert torch.equal(dequantize_rows(p, rows[:0]), dequantize_rows_reference(p, rows[:0]))
    if p.bits == 8:
        with pytest.raises(RuntimeError, match="out of range"):
            dequantize_rows(p, torch.tensor([45]))


def test_quant_weight_stacks_slices_and_selects_rows() -> None:
    g = torch.Generator().manual_seed(10)
    parts = [quantize_weight(torch.randn(n, 64, generator=g), f) for n, f in
             [(32, "q8_0"), (16, "q8_0"), (24, "q4_k"), (16, "q6_k")]]
    w = QuantWeight.cat(parts)
    assert w.shape == (88, 64) and w.formats == ["q8_0", "q4_k", "q6_k"]  # the two q8_0 merged
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(w.linear(x), torch.cat([p.linear(x) for p in parts], dim=1))
    tail = w.row_range(40)  # cuts the merged q8_0 segment off the group boundary
    assert torch.equal(tail.linear(x), w.linear(x)[:, 40:])
    ids = torch.tensor([87, 3, 50])
    assert torch.equal(w.index_select(0, ids), torch.cat([w[87:88], w[3:4], w[50:51]]))
    assert torch.equal(w.rows(torch.arange(88)) @ torch.eye(64), w[:])


def test_the_fallback_runs_when_told_and_says_so(tmp_path) -> None:
    env = dict(os.environ, GENREFINE_KERNELS="reference", GENREFINE_CACHE=str(tmp_path))
    code = (
        "import torch; from genrefine.models.quant import quantize_weight; "
        "w = quantize_weight(torch.ones(16, 32)); print(w.linear(torch.ones(1, 32))[0, 0].item())"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "pure-PyTorch fallback" in r.stderr and r.stderr.count("\n") == 1
    assert float(r.stdout) == pytest.approx(32.0, rel=1e-2)


def test_rmsnorm_matches_its_reference_and_is_row_invariant() -> None:
    from genrefine.kernels import rmsnorm, rmsnorm_reference

    g = torch.Generator().manual_seed(11)
    x = torch.randn(37, 64, generator=g) * 5
    w = torch.randn(64, generator=g)
    y = rmsnorm(x, w, 1e-6)
    assert torch.equal(y, rmsnorm_reference(x, w, 1e-6))
    assert torch.equal(torch.cat([rmsnorm(x[i : i + 1], w, 1e-6) for i in range(37)]), y)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6)


def test_rope_is_the_pytorch_expression_bit_for_bit() -> None:
    from genrefine.kernels import rope

    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 7, 16, generator=g)
    cos, sin = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    want = x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin
    assert torch.equal(rope(x, cos, sin), want)
    assert torch.equal(rope(x.transpose(0, 1).contiguous().transpose(0, 1), cos, sin), want)


@pytest.mark.skipif(not BUILT, reason="the exact attention is C++ only (the runtime falls back)")
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 30.0)])
@pytest.mark.parametrize("H,KV", [(4, 2), (6, 2), (8, 1)])
def test_exact_attention_matches_float64_softmax(window, softcap, H, KV) -> None:
    """kernels.attend against plain softmax attention in float64 over the keys each row sees:
    the prefix (within the window) and, in a tree, its ancestors. Query heads per key/value head:
    2, 3 and 8 (the kernels take heads four at a time); up to 30 keys per row (they take keys in
    chunks of 16)."""
    from genrefine.kernels import attend

    g = torch.Generator().manual_seed(13)
    D, S, start = 32, 40, 25
    keys, values = torch.randn(KV, S, D, generator=g), torch.randn(KV, S, D, generator=g)
    parents = [-1, 0, 0, 1, 3]  # a tree of 5 new tokens
    depth, tree = [], torch.zeros(5, 5, dtype=torch.bool)
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        j = i
        while j >= 0:
            tree[i, j] = True
            j = parents[j]
    pos = start + torch.tensor(depth)
    q = torch.randn(H, 5, D, generator=g)
    out = attend(q, keys, values, start, pos, tree, window, D**-0.5, softcap)
    for h in range(H):
        for r in range(5):
            lo = 0 if window is None else max(0, int(pos[r]) - window + 1)
            slots = [s for s in range(lo, start)] + [start + j for j in range(5)
                                                      if tree[r, j] and int(pos[j]) >= lo]
            k = keys[h // (H // KV), slots].double()
            s = (k @ q[h, r].double()) * D**-0.5
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            want = torch.softmax(s, 0) @ values[h // (H // KV), slots].double()
            assert torch.allclose(out[h, r].double(), want, atol=1e-5), (h, r)


@pytest.mark.skipif(not BUILT, reason="the exact attention is C++ only (the runtime falls back)")
@pytest.mark.parametrize("window,softcap", [(None, None), (50, None), (None, 30.0)])
def test_a_row_attended_alone_equals_that_row_among_others(window, softcap) -> None:
    """A row's attention does not depend on the other rows of the call: the last row of a
    6-token chain over a long cache (one key/value head, as the embedded model has) equals that
    token attended alone over the same cache, bit for bit, on 2 threads."""
    from genrefine.kernels import attend

    g = torch.Generator().manual_seed(17)
    H, KV, D, S, start, n = 4, 1, 64, 400, 300, 6
    keys, values = torch.randn(KV, S, D, generator=g), torch.randn(KV, S, D, generator=g)
    q = torch.randn(H, n, D, generator=g)
    pos = torch.arange(start, start + n)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chain = attend(q, keys, values, start, pos, None, window, D**-0.5, softcap)
        alone = attend(q[:, -1:].contiguous(), keys, values, start + n - 1, pos[-1:], None, window,
                       D**-0.5, softcap)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone[:, 0], chain[:, -1])


@pytest.mark.skipif(not BUILT, reason="the exact attention is C++ only (the runtime falls back)")
@pytest.mark.parametrize("H,KV,D,window,softcap", [(4, 1, 256, 0, 0.0), (4, 1, 64, 100, 0.0),
                                                    (8, 1, 64, 0, 30.0), (3, 1, 96, 0, 0.0), (4, 2, 32, 0, 0.0)])
def test_one_token_attention_split_over_keys_keeps_the_bits(H, KV, D, window, softcap) -> None:
    """One-token decoding splits a row's keys (scores, exponentials) and value columns over the
    threads instead of its query heads: the same bits as the split over heads, and as a row among
    others (which never splits its keys), on 1 and 2 threads; group sizes 4, 8, 3 (no
    compile-time kernel) and 2, a window and a soft cap. Over ~700 keys, so every thread gets a
    share of each phase."""
    g = torch.Generator().manual_seed(23)
    S, start = 720, 700
    keys, values = torch.randn(KV, S, D, generator=g) * 2, torch.randn(KV, S, D, generator=g)
    q = torch.randn(H, 3, D, generator=g)
    pos = torch.arange(start, start + 3)
    op = torch.ops.genrefine_q.attend
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            chain = op(q, keys, values, start, pos, torch.empty(0, dtype=torch.bool), window, D**-0.5, softcap, 0)
            last = q[:, -1:].contiguous()
            outs = [op(last, keys, values, start + 2, pos[-1:], torch.empty(0, dtype=torch.bool), window, D**-0.5,
                       softcap, split) for split in (0, 1, -1)]
            for out in outs:
                assert torch.equal(out[:, 0], chain[:, -1]), threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not BUILT, reason="the exact attention is C++ only (the runtime falls back)")
def test_keys_whose_weight_would_be_subnormal_weigh_nothing() -> None:
    """A key scored 100 below the best has exp(-100), a subnormal float: attend counts it as 0
    (subnormal arithmetic is slow on x86), so a value lane that is 0 for the best key and 1 for
    the others comes out exactly 0, not ~1e-44."""
    from genrefine.kernels import attend

    D, S = 16, 9
    keys = torch.zeros(1, S, D)
    keys[0, 0, 0] = 100.0  # the query below scores key 0 at 100, the others at 0
    values = torch.ones(1, S, D)
    values[0, 0] = 0.0
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0
    out = attend(q, keys, values, S - 1, torch.tensor([S - 1]), None, None, 1.0)
    assert torch.equal(out, torch.zeros(1, 1, D))
    keys[0, 0, 0] = 80.0  # exp(-80) is a normal float: its weight is kept
    out = attend(q, keys, values, S - 1, torch.tensor([S - 1]), None, None, 1.0)
    assert bool((out > 0).all()) and float(out.max()) < 1e-33


@pytest.mark.parametrize("path", [0, 1, 2], ids=["scalar", "avx2", "avx512"])
def test_argmax_is_torchs_on_ties_nans_and_odd_sizes(path: int) -> None:
    """kernels.argmax gives torch.argmax's answer: the first largest value, a NaN as the largest
    (the first NaN), rows of -inf, sizes that are not multiples of the vector or chunk width;
    on each of the C++ kernel's paths (scalar, AVX2, AVX-512) this CPU can run."""
    from genrefine.kernels import argmax as best_argmax

    if not BUILT:
        pytest.skip("no C++ extension on this machine")
    if path > min(int(torch.ops.genrefine_q.best_isa()), 2):
        pytest.skip(f"this CPU has no {['', 'AVX2', 'AVX-512 VNNI'][path]}")

    def argmax(x):  # this path's answer; kernels.argmax (the best path) must agree with it
        out = torch.ops.genrefine_q.argmax_rows(x.reshape(-1, x.shape[-1]), path).reshape(x.shape[:-1])
        assert torch.equal(best_argmax(x), out)
        return out

    g = torch.Generator().manual_seed(16)
    for trial in range(60):
        m, v = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 40000, (1,), generator=g))
        x = torch.randint(-4, 4, (m, v), generator=g).float()  # many ties
        if trial % 3 == 0:
            x[0, int(torch.randint(0, v, (1,), generator=g))] = float("nan")
        if trial % 4 == 0:
            x[-1] = float("-inf")
        assert torch.equal(argmax(x), x.argmax(-1)), trial
    x = torch.randn(3, 262144, generator=g)
    x[1, 200000] = 50.0  # the largest value in a late chunk
    assert torch.equal(argmax(x), x.argmax(-1))
    assert int(argmax(x[1])) == 200000  # one row, no leading dimension
