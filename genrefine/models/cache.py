"""A preallocated key/value cache with explicit positions and O(1) rollback.

Slots ``[0, length)`` hold the committed prefix, and slot ``i`` always holds position ``i``.
A forward appends its ``n`` new entries at slots ``[length, length + n)`` (tree nodes may share a
position there); the caller then keeps what verification accepted:

* :meth:`KVCache.rollback` drops the last ``k`` entries by moving ``length`` only;
* :meth:`KVCache.keep` compacts an accepted tree path into contiguous slots.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer, one sequence.

    keys[l], values[l]: [kv_heads, slots, head_dim], with ``slots`` the capacity rounded up to
    a multiple of ``block`` so that blocked attention can read whole blocks (the slots past
    ``capacity`` are never written and always masked).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        block: int = 1,
    ) -> None:
        shape = (num_kv_heads, -(-capacity // block) * block, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0

    def reserve(self, n: int) -> int:
        """Check that ``n`` more entries fit; returns the first new slot."""
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache full: {self.length} + {n} entries exceed its capacity {self.capacity}"
            )
        return self.length

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` entries (O(1): the data stays, ``length`` moves)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} entries of a cache holding {self.length}")
        self.length -= n

    def keep(self, start: int, idx: Tensor) -> None:
        """Of the entries from slot ``start`` on, keep those at offsets ``idx`` (ascending).

        idx: [a] long. The kept entries move to slots ``start .. start + a - 1``; everything after
        is dropped. A prefix ``idx == arange(a)`` costs nothing beyond a rollback.
        """
        a = int(idx.numel())
        if start < 0 or start + a > self.length or (a and start + int(idx[-1]) >= self.length):
            raise ValueError(
                f"keep({start}, idx): offsets point past the {self.length} cached entries"
            )
        contiguous = a == 0 or int(idx[-1]) == a - 1  # ascending and ends at a-1 => 0..a-1
        if not contiguous:
            src = idx.to(self.keys[0].device) + start  # [a]
            for cache in (self.keys, self.values):
                for layer in cache:
                    layer[:, start : start + a] = layer.index_select(1, src)
        self.length = start + a

    def reset(self) -> None:
        self.length = 0
