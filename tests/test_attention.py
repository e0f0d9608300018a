"""Blocked attention (genrefine/models/attention.py): right values, and rows bitwise equal to
one-token decoding for chains, trees, sliding windows and grouped-query heads."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from genrefine.models.attention import blocked_attention, plan_blocks
from genrefine.models.invariance import probe_attention

H, KV, D = 4, 2, 16
SLOTS = 96


def _ancestors(parents: list[int]) -> tuple[torch.Tensor, list[int]]:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask, depth


def _reference(q, k, v, visible, scale, softcap=None):
    """Plain float64 attention of q [H, n, D] over k/v [KV, S, D] with visible [n, S]."""
    rep = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(rep, 0)
    v = v.double().repeat_interleave(rep, 0)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~visible, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_values_match_plain_attention(window, softcap) -> None:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(KV, SLOTS, D, generator=g), torch.randn(KV, SLOTS, D, generator=g)
    scale = D**-0.5
    # a chain
    start, n = 21, 6
    q = torch.randn(H, n, D, generator=g)
    pos = torch.arange(start, start + n)
    out = blocked_attention(q, k, v, plan_blocks(pos, start, None, window, 8), scale, softcap)
    slots = torch.arange(SLOTS)
    vis = slots[None, :] <= pos[:, None]
    if window:
        vis &= pos[:, None] - slots[None, :] < window
    ref = _reference(q, k, v, vis, scale, softcap)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # a tree: row r sees the prefix and its ancestors, wherever the tree put them
    mask, depth = _ancestors([-1, 0, 0, 2, -1])
    n = len(depth)
    q = torch.randn(H, n, D, generator=g)
    pos = start + torch.tensor(depth)
    out = blocked_attention(q, k, v, plan_blocks(pos, start, mask, window, 8), scale, softcap)
    key_pos = torch.cat([torch.arange(start), pos, torch.full((SLOTS - start - n,), 10**6)])
    vis = torch.zeros(n, SLOTS, dtype=torch.bool)
    vis[:, :start] = True
    vis[:, start : start + n] = mask
    if window:
        vis &= pos[:, None] - key_pos[None, :] < window
    ref = _reference(q, k, v, vis, scale, softcap)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_values_match_sdpa_in_bfloat16() -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(KV, SLOTS, D, generator=g).bfloat16()
    v = torch.randn(KV, SLOTS, D, generator=g).bfloat16()
    start, n = 40, 5
    q = torch.randn(H, n, D, generator=g).bfloat16()
    out = blocked_attention(q, k, v, plan_blocks(torch.arange(start, start + n), start, None, None, 16), D**-0.5)
    mask = torch.ones(n, start + n, dtype=torch.bool)
    mask[:, start:] = torch.ones(n, n, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(
        q[None], k[None, :, : start + n], v[None, :, : start + n], attn_mask=mask, enable_gqa=True
    )[0]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_are_bitwise_one_token_decoding(dtype, tmp_path, monkeypatch) -> None:
    """Where the probe finds this dtype's batched matmuls row-invariant, every row is bitwise what
    one-token decoding computes; where it does not (float32 here), equal up to rounding, which is
    what is promised then (``NativeModel.bitwise_exact`` False, fused attention by default)."""
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    exact = probe_attention(H, KV, D, 8, dtype, "cpu")

    def same(a, b) -> bool:
        if exact:
            return torch.equal(a, b)
        torch.testing.assert_close(a, b)  # the dtype's default tolerances
        return True

    g = torch.Generator().manual_seed(2)
    scale = D**-0.5

    def single(q, k, v, slot, window):
        plan = plan_blocks(torch.tensor([slot]), slot, None, window, 8)
        return blocked_attention(q, k, v, plan, scale)[:, 0]

    for start, n, window in itertools.product([2, 7, 8, 30], [1, 3, 12], [None, 10]):
        k = torch.randn(KV, SLOTS, D, generator=g).to(dtype)
        v = torch.randn(KV, SLOTS, D, generator=g).to(dtype)
        q = torch.randn(H, n, D, generator=g).to(dtype)
        plan = plan_blocks(torch.arange(start, start + n), start, None, window, 8)
        out = blocked_attention(q, k, v, plan, scale)
        for r in range(n):
            assert same(out[:, r], single(q[:, r : r + 1], k, v, start + r, window))
    mask, depth = _ancestors([-1, 0, 1, 2, 0, 4, -1, 6, 6, 3])
    n = len(depth)
    for start, window in itertools.product([1, 6, 13, 40], [None, 10]):
        k = torch.randn(KV, SLOTS, D, generator=g).to(dtype)
        v = torch.randn(KV, SLOTS, D, generator=g).to(dtype)
        q = torch.randn(H, n, D, generator=g).to(dtype)
        out = blocked_attention(
            q, k, v, plan_blocks(start + torch.tensor(depth), start, mask, window, 8), scale
        )
        for r in range(n):
            anc = torch.nonzero(mask[r]).flatten()
            k2, v2 = k.clone(), v.clone()  # the path as sequential decoding would hold it
            k2[:, start : start + len(anc)] = k[:, start + anc]
            v2[:, start : start + len(anc)] = v[:, start + anc]
            want = single(q[:, r : r + 1], k2, v2, start + len(anc) - 1, window)
            assert same(out[:, r], want)


def test_tree_rows_must_not_share_a_position() -> None:
    mask = torch.ones(2, 2, dtype=torch.bool)  # row 1 sees two tokens at one position
    with pytest.raises(ValueError, match="one new token per position"):
        plan_blocks(torch.tensor([5, 5]), 5, mask, None, 8)
