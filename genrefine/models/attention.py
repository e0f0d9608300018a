"""Blocked attention whose every row is bitwise what one-token decoding computes.

Greedy speculative decoding is lossless in exact arithmetic; in floating point a verification
forward over ``n`` draft tokens must give each row exactly the numbers a one-token forward would,
or a near-tie can flip. Fused attention kernels do not promise that: how they split the keys and
which GEMM path they take depend on the number of queries and keys. This module computes attention
so that each row's arithmetic depends only on that row:

* keys are cut into blocks of :data:`BLOCK` slots aligned to absolute slot 0, so a row sees the
  same blocks whether it is decoded alone or verified among others;
* scores and probability-times-value products are batched matmuls over whole blocks (the
  per-block shapes never change; on the CPU this was written on, bfloat16 matmuls give each row
  the same bits for any number of rows, see ``invariance.py``);
* masked slots get probability exactly 0, so blocks or slots a row cannot see add exact zeros;
* the row maximum is exact, and per-block partial sums (of the softmax denominator and of the
  output) are combined by a sequential ``cumsum`` in block order, which exact zeros before or
  after a row's own blocks cannot change.

For a tree, a node's visible keys are the committed prefix plus its ancestors. One-token decoding
would hold those ancestors in the slots right after the prefix, so the node's last blocks are
gathered in that "virtual" layout (:class:`BlockPlan` ``row_slots``) instead of read from the
slots where the tree put them.

It mirrors transformers' eager attention: bfloat16 scores, softmax in float32, probabilities
rounded to the model's dtype before multiplying the values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 64  # key slots per block


@dataclass
class BlockPlan:
    """Which key blocks each query row reads, for one forward and one attention window.

    Shared blocks ``first_block .. first_block + shared_blocks - 1`` are read from the cache as
    they are, by every row, with ``shared_hidden`` [shared_blocks, n, block] True where a row
    does not see a slot. Rows of a tree also read ``row_blocks`` blocks of their own, gathered
    from cache slots ``row_slots`` [n, row_blocks * block] (long) with ``row_hidden``
    [n, row_blocks, 1, block]; for chains ``row_slots`` is None. The masks are stored in the
    layout :func:`blocked_attention` applies them in, so its layers do not rebuild them.
    """

    block: int
    first_block: int
    shared_blocks: int
    shared_hidden: Tensor
    row_blocks: int = 0
    row_slots: Tensor | None = None
    row_hidden: Tensor | None = None


def plan_blocks(
    positions: Tensor,
    start: int,
    tree_mask: Tensor | None,
    window: int | None,
    block: int = BLOCK,
) -> BlockPlan:
    """Plan blocked attention for ``n`` new tokens at cache slots ``start .. start + n - 1``.

    positions: [n] long, the new tokens' positions (slot ``s < start`` holds position ``s``).
    tree_mask: [n, n] bool, new token i sees new token j; None means a chain (causal, positions
    ``start + arange(n)``). window: sliding-window size or None.
    """
    pos = positions.to("cpu", torch.long)
    n = int(pos.shape[0])
    device = positions.device
    chain = tree_mask is None
    if chain:
        seen = torch.ones(n, n, dtype=torch.bool).tril_()
    else:
        seen = tree_mask.to("cpu", torch.bool)
    # first visible position of each row, and the first block any row needs
    firsts = pos + 1 - window if window is not None else torch.zeros_like(pos)
    first_block = max(0, int(firsts.min())) // block
    if chain:
        end_block = -(-(start + n) // block)
    else:
        end_block = start // block
        first_block = min(first_block, end_block)
    shared = end_block - first_block
    slots = torch.arange(first_block * block, end_block * block)  # [S]
    if chain:
        key_pos = slots  # chains: slot == position everywhere
        vis = key_pos[None, :] <= pos[:, None]
    else:
        vis = (slots[None, :] < start).expand(n, -1)
        key_pos = slots
    if window is not None:
        vis = vis & (pos[:, None] - key_pos[None, :] < window)
    hidden = (~vis).view(n, shared, block).transpose(0, 1).contiguous()
    plan = BlockPlan(block, first_block, shared, hidden.to(device))
    if chain:
        return plan
    # trees: each row's own blocks from slot end_block * block on, in the layout of sequential
    # decoding: position v < start at slot v, then the row's ancestors (and itself) by position
    t0 = end_block * block
    top = int(pos.max()) + 1
    row_blocks = -(-(top - t0) // block)
    virt = torch.arange(t0, t0 + row_blocks * block)  # [T] virtual positions
    row_slots = torch.zeros(n, virt.numel(), dtype=torch.long)
    row_mask = torch.zeros(n, virt.numel(), dtype=torch.bool)
    prefix = virt < start
    row_slots[:, prefix] = virt[prefix]
    row_mask[:, prefix] = True
    for r in range(n):
        for j in torch.nonzero(seen[r]).flatten().tolist():
            v = int(pos[j]) - t0
            if v < 0 or row_mask[r, v]:
                raise ValueError("tree rows must see at most one new token per position")
            row_slots[r, v] = start + j
            row_mask[r, v] = True
    if window is not None:
        row_mask &= pos[:, None] - virt[None, :] < window
    plan.row_blocks = row_blocks
    plan.row_slots = row_slots.to(device)
    plan.row_hidden = (~row_mask).view(n, row_blocks, 1, block).to(device)
    return plan


def blocked_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    plan: BlockPlan,
    scale: float,
    softcap: float | None = None,
) -> Tensor:
    """q: [H, n, D]; keys/values: the layer's whole cache [KV, capacity, D] (capacity a multiple
    of the plan's block, see KVCache) -> [H, n, D] in q's dtype."""
    H, n, D = q.shape
    KV = keys.shape[0]
    g = H // KV
    B = plan.block
    dtype = q.dtype
    qg = q.reshape(KV, g, n, D)
    ninf = float("-inf")
    scores = []  # float32, shared: [KV, nb, g, n, B]; rows: [KV, n, nb, g, B]
    if plan.shared_blocks:
        lo, hi = plan.first_block * B, (plan.first_block + plan.shared_blocks) * B
        ks = keys[:, lo:hi].reshape(KV, plan.shared_blocks, B, D)
        s = torch.matmul(qg.reshape(KV, 1, g * n, D), ks.transpose(-1, -2))  # [KV, nb, gn, B]
        s = s.float().view(KV, plan.shared_blocks, g, n, B)
        s = _scale(s, scale, softcap).masked_fill(plan.shared_hidden[None, :, None], ninf)
        scores.append(s)
    if plan.row_blocks:
        idx = plan.row_slots.reshape(-1)
        kr = keys.index_select(1, idx).view(KV, n, plan.row_blocks, B, D)
        qr = qg.permute(0, 2, 1, 3).unsqueeze(2)  # [KV, n, 1, g, D]
        s = torch.matmul(qr, kr.transpose(-1, -2)).float()  # [KV, n, nb, g, B]
        s = _scale(s, scale, softcap).masked_fill(plan.row_hidden[None], ninf)
        scores.append(s)
    # row maxima (exact in any order): [KV, g, n]
    maxes = []
    if plan.shared_blocks:
        maxes.append(scores[0].amax(dim=(1, 4)))
    if plan.row_blocks:
        maxes.append(scores[-1].amax(dim=(2, 4)).transpose(1, 2))
    mx = maxes[0] if len(maxes) == 1 else torch.maximum(maxes[0], maxes[1])
    exps, sums = [], []
    if plan.shared_blocks:
        e = torch.exp(scores[0] - mx[:, None, :, :, None])
        exps.append(e)
        sums.append(e.sum(-1).permute(0, 2, 3, 1))  # [KV, g, n, nb]
    if plan.row_blocks:
        e = torch.exp(scores[-1] - mx.transpose(1, 2)[:, :, None, :, None])
        exps.append(e)
        sums.append(e.sum(-1).permute(0, 3, 1, 2))  # [KV, g, n, nb]
    denom = torch.cat(sums, dim=-1).cumsum(-1)[..., -1]  # [KV, g, n], blocks in order
    outs = []
    if plan.shared_blocks:
        p = (exps[0] / denom[:, None, :, :, None]).to(dtype)
        p = p.view(KV, plan.shared_blocks, g * n, B)
        vs = values[:, lo:hi].reshape(KV, plan.shared_blocks, B, D)
        o = torch.matmul(p, vs).float()  # [KV, nb, gn, D]
        outs.append(o.view(KV, plan.shared_blocks, g, n, D).permute(0, 2, 3, 1, 4))
    if plan.row_blocks:
        p = (exps[-1] / denom.transpose(1, 2)[:, :, None, :, None]).to(dtype)
        vr = values.index_select(1, idx).view(KV, n, plan.row_blocks, B, D)
        o = torch.matmul(p, vr).float()  # [KV, n, nb, g, D]
        outs.append(o.permute(0, 3, 1, 2, 4))
    out = torch.cat(outs, dim=3).cumsum(3)[:, :, :, -1]  # [KV, g, n, D], blocks in order
    return out.to(dtype).reshape(H, n, D)


def _scale(s: Tensor, scale: float, softcap: float | None) -> Tensor:
    s = s * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    return s
