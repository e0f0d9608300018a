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
for any number of rows, which :func:`probe_attention` checks. So for each weight shape we probe,
once per machine and weights and cached on disk, the first split ``s`` of the reduction dimension
(1, 2, 4, 8, then row by row) that makes ``linear(x[:m])[r] == linear(x[r:r+1])`` bit for bit for
every row count ``m`` in 1..64 and row ``r``; ``None`` if none does (then verification is only
invariant up to rounding, as for float32 here, where the one-row kernel differs from the many-row
one).

What this guarantees, and what not. The one-row and many-row kernels accumulate in float32 in
different orders; they disagree only where a sum lies within an ulp or so of a bfloat16 rounding
boundary (about one output in 10^5 for the tiny test shapes without a split). A split changes
which sums are near a boundary, not the kernels, so "invariant" is a measurement on the probe's
inputs: blocks of the model's own activations (a forward over random tokens) and random rows at
their scale, enough that about 2 million outputs per shape are compared. Row by row (each row its
own one-row call, as decoding makes it) is exact by construction but reads the weight once per
row; it is the last resort. A split that passed can still, rarely, round a real row differently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diskcache import cache_root, machine_key, write_text

PROBE_VERSION = 2  # part of the cache key: bump it when what the probe measures changes
PROBE_ROWS = tuple(range(1, 65))  # every row count a bitwise-exact forward has (EXACT_ROWS_MAX)
ROW_BY_ROW = 0  # the last resort "split": each row its own one-row matmul, as decoding does it
SPLITS = (1, 2, 4, 8, ROW_BY_ROW)
PROBE_OUTPUTS = 1 << 21  # outputs compared per shape: mismatches are rare (about 1 in 10^5)
MIN_INPUTS, MAX_INPUTS = 2, 96  # [64, K] probe inputs per shape


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None, split: int) -> Tensor:
    """``F.linear`` with the reduction dimension cut into ``split`` parts summed in float32;
    ``split == ROW_BY_ROW``: one ``F.linear`` per row of ``x`` [n, K] (a one-token forward's
    own call, whatever ``n``)."""
    if split == 1 or (split == ROW_BY_ROW and x.shape[0] <= 1):
        return F.linear(x, weight, bias)
    if split == ROW_BY_ROW:
        return torch.cat([F.linear(x[r : r + 1], weight, bias) for r in range(x.shape[0])])
    k = weight.shape[1] // split
    acc = F.linear(x[..., :k], weight[:, :k]).float()
    for i in range(1, split):
        acc += F.linear(x[..., i * k : (i + 1) * k], weight[:, i * k : (i + 1) * k]).float()
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype)


def _invariant(weight: Tensor, split: int, inputs: list[Tensor]) -> bool:
    """Whether the rows of many-row calls get the bits of one-row calls: for the first input
    ``x`` [64, K], every row of ``x[:m]`` for every m in PROBE_ROWS; for the others, every row
    of the 64-row call (the kernel a row count picks does not depend on the data, the rare
    rounding differences between kernels do, hence the many inputs)."""
    for i, x in enumerate(inputs):
        singles = [split_linear(x[r : r + 1], weight, None, split)[0] for r in range(x.shape[0])]
        for m in PROBE_ROWS if i == 0 else (x.shape[0],):
            y = split_linear(x[:m], weight, None, split)
            if any(not torch.equal(y[r], singles[r]) for r in range(m)):
                return False
    return True


def _inputs(weight: Tensor, real: Tensor | None, gen: torch.Generator) -> list[Tensor]:
    """Probe inputs [64, K] for a weight [N, K], enough that about PROBE_OUTPUTS outputs are
    compared: blocks of the model's own activations ``real`` [R, K] (spread over its rows, so
    over several layers; up to half the inputs), then random rows at their scale."""
    rows = max(PROBE_ROWS)
    n, k = weight.shape
    count = min(MAX_INPUTS, max(MIN_INPUTS, -(-PROBE_OUTPUTS // (rows * n))))
    scale = 1.0
    out = []
    if real is not None and real.shape[0] >= rows:
        real = real.to(weight.device, weight.dtype)
        scale = float(real.float().pow(2).mean().sqrt()) or 1.0
        blocks = real.shape[0] // rows
        picks = torch.linspace(0, blocks - 1, min(max(count // 2, 1), blocks)).round().long()
        for i in picks.unique().tolist():
            out.append(real[i * rows : (i + 1) * rows].contiguous())
    while len(out) < count:
        x = torch.randn(rows, k, generator=gen) * scale
        out.append(x.to(weight.dtype).to(weight.device))
    return out


def _key(shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, extra: str = "") -> str:
    text = (
        f"v{PROBE_VERSION}|{machine_key(device)}|{torch.__version__}|{dtype}|"
        f"{sorted(set(shapes))}|{extra}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(weights: dict[tuple[int, int], Tensor]) -> str:
    """A cheap digest of the weights (the probe reads the model's own activations)."""
    h = hashlib.sha256()
    for shape in sorted(weights):
        w = weights[shape].reshape(-1)
        h.update(w[:: max(1, w.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def probe_splits(
    weights: dict[tuple[int, int], Tensor],
    activations: Callable[[], dict[tuple[int, int], Tensor]] | None = None,
) -> dict[tuple[int, int], int | None]:
    """For each weight shape (N, K), the first of :data:`SPLITS` (row by row last) whose matmul
    gives every row of a 1..64-row call the bits of a one-row call on the probe's inputs, None if
    none does; cached on disk per machine and weights.

    activations: returns shape -> [R, K] rows that really enter that matmul (a forward of the
    model), called only when the cache has no result; with R >= 64 the probe runs on blocks of
    them as well as on random rows at their scale.
    This is a test on samples, not a proof: see the module docstring."""
    if not weights:
        return {}
    any_w = next(iter(weights.values()))
    extra = _fingerprint(weights) if activations is not None else ""
    key = _key(list(weights), any_w.dtype, any_w.device, extra)
    path = cache_root() / "invariance" / f"{key}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            return {tuple(map(int, k.split("x"))): v for k, v in saved.items()}
        except (ValueError, OSError):
            pass
    real = activations() if activations is not None else {}
    gen = torch.Generator().manual_seed(0)
    out: dict[tuple[int, int], int | None] = {}
    for shape, w in weights.items():
        inputs = _inputs(w, real.get(shape), gen)
        out[shape] = next(
            (
                s
                for s in SPLITS
                if (s == ROW_BY_ROW or shape[1] % s == 0) and _invariant(w, s, inputs)
            ),
            None,
        )
    try:
        write_text(path, json.dumps({f"{n}x{k}": v for (n, k), v in out.items()}))
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
        for n in (2, 9, 33, 64):  # chains
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
        write_text(path, json.dumps({"invariant": bool(ok)}))
    except OSError:
        pass
    return bool(ok)
