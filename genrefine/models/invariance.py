"""Batch-invariant matmuls: the key to verification that is bitwise equal to plain decoding.

Greedy speculative decoding is lossless in exact arithmetic. In floating point, a target forward
over ``n`` draft tokens must produce, for each row, exactly the numbers a one-token forward would,
or a near-tie between two tokens can flip and the output drift from plain decoding. Row-wise ops
(norms, activations, rotary embeddings) are invariant; attention is made invariant by attending
one query at a time (see ``NativeModel.forward(exact=...)``); matmuls depend on the BLAS kernel
the library picks for each batch size. On the CPU this was written on, bfloat16 matmuls are
batch-invariant except for some shapes and row positions, which splitting the reduction dimension
fixes. So for each weight shape we probe, once per machine and cached on disk, the smallest split
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

from .paths import cache_root

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
    from ..policy import machine_key

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
