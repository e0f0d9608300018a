"""Batch-invariant matmuls: the key to verification that is bitwise equal to plain decoding.

Greedy speculative decoding is lossless in exact arithmetic. In floating point, a target forward
over ``n`` draft tokens must produce, for each row, exactly the numbers a one-token forward would,
or a near-tie between two tokens can flip and the output drift from plain decoding. Row-wise ops
(norms, activations, rotary embeddings) are invariant; attention is made invariant by attending
blocks (see ``attention.py``); matmuls depend on the BLAS kernel
the library picks for each batch size. On the CPU this was written on, bfloat16 matmuls are
batch-invariant except for some shapes and row positions, which splitting the reduction dimension
fixes. Attention is made invariant by construction (``attention.py``: fixed key blocks, exact
zeros, sequential sums), relying on the batched matmuls of one block giving each row the same bits
for any number of rows, which :func:`probe_attention` checks. So for each weight shape we probe, once per machine and cached on disk, the smallest split
``s`` of the reduction dimension that makes ``linear(x[:m])[r] == linear(x[r:r+1])`` bit for bit
for every tested ``m`` and row ``r``; ``None`` if none does (then verification is only invariant up
to rounding, as for float32 here, where the one-row kernel differs from the many-row one).
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diskcache import cache_root

PROBE_ROWS = (2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 24, 32, 33, 48, 64)
SPLITS = (1, 2, 4, 8)


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None, split: int) -> Tensor:
    """``F.linear`` with the reduction dimension cut into ``split`` parts summed in float32."""
    if split == 1:
        return F.linear(x, weight, bias)
    k = weight.shape[1] // split
    acc = F.linear(x[..., :k], weight[:, :k]).float()
    for i in range(1, split):
        acc += F.linear(x[..., i * k : (i + 1) * k], weight[:, i * k : (i + 1) * k]).float()
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype)


def _invariant(weight: Tensor, split: int, gen: torch.Generator) -> bool:
    k = weight.shape[1]
    rows = max(PROBE_ROWS)
    x = torch.randn(rows, k, generator=gen).to(weight.dtype).to(weight.device)
    singles = [split_linear(x[r : r + 1], weight, None, split)[0] for r in range(rows)]
    for m in PROBE_ROWS:
        y = split_linear(x[:m], weight, None, split)
        if any(not torch.equal(y[r], singles[r]) for r in range(m)):
            return False
    return True


def _key(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> str:
    from ..diskcache import machine_key

    text = f"{machine_key(device)}|{torch.__version__}|{dtype}|{sorted(set(shapes))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe_splits(weights: dict[tuple[int, int], Tensor]) -> dict[tuple[int, int], int | None]:
    """For each weight shape (N, K), the smallest invariant split, cached on disk per machine."""
    if not weights:
        return {}
    any_w = next(iter(weights.values()))
    path = cache_root() / "invariance" / f"{_key(list(weights), any_w.dtype, any_w.device)}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            return {tuple(map(int, k.split("x"))): v for k, v in saved.items()}
        except (ValueError, OSError):
            pass
    gen = torch.Generator().manual_seed(0)
    out: dict[tuple[int, int], int | None] = {}
    for shape, w in weights.items():
        out[shape] = next(
            (s for s in SPLITS if shape[1] % s == 0 and _invariant(w, s, gen)), None
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({f"{n}x{k}": v for (n, k), v in out.items()}))
    except OSError:
        pass
    return out


def probe_attention(
    heads: int, kv_heads: int, head_dim: int, block: int, dtype: torch.dtype, device
) -> bool:
    """Whether blocked attention (attention.py) gives every row of a many-row call, chain or
    tree, exactly the bits of a one-row call, on random data of this shape (cached per machine)."""
    from .attention import blocked_attention, plan_blocks

    device = torch.device(device)
    shape = [(heads, kv_heads, head_dim, block)]
    path = cache_root() / "invariance" / f"attn-{_key(shape, dtype, device)}.json"
    if path.is_file():
        try:
            return bool(json.loads(path.read_text())["invariant"])
        except (ValueError, OSError, KeyError):
            pass
    gen = torch.Generator().manual_seed(1)
    slots = 4 * block + 64
    ok = True

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    def single(q: Tensor, k: Tensor, v: Tensor, slot: int) -> Tensor:
        plan = plan_blocks(torch.tensor([slot], device=device), slot, None, None, block)
        return blocked_attention(q, k, v, plan, head_dim**-0.5)

    parents = [-1, 0, 0, 1, 2, -1, 5, 6]
    depth: list[int] = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    tree = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i in range(len(parents)):
        j = i
        while j >= 0:
            tree[i, j] = True
            j = parents[j]
    for start in (3, block - 2, 2 * block + 5):
        k, v = rand(kv_heads, slots, head_dim), rand(kv_heads, slots, head_dim)
        for n in (2, 9, 33):  # chains
            q = rand(heads, n, head_dim)
            plan = plan_blocks(torch.arange(start, start + n, device=device), start, None, None, block)
            out = blocked_attention(q, k, v, plan, head_dim**-0.5)
            ok &= all(
                torch.equal(out[:, r], single(q[:, r : r + 1], k, v, start + r)[:, 0])
                for r in range(n)
            )
        n = len(parents)  # a tree, against sequential decoding of each node's path
        q = rand(heads, n, head_dim)
        pos = start + torch.tensor(depth, device=device)
        out = blocked_attention(q, k, v, plan_blocks(pos, start, tree, None, block), head_dim**-0.5)
        for r in range(n):
            anc = torch.nonzero(tree[r]).flatten().to(device)
            k2, v2 = k.clone(), v.clone()
            k2[:, start : start + len(anc)] = k[:, start + anc]
            v2[:, start : start + len(anc)] = v[:, start + anc]
            ok &= torch.equal(out[:, r], single(q[:, r : r + 1], k2, v2, start + len(anc) - 1)[:, 0])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"invariant": bool(ok)}))
    except OSError:
        pass
    return bool(ok)
