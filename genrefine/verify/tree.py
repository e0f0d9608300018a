"""Tree topology as data: the draft tree's attention mask, depths and paths, built once per shape.

A draft is a flattened tree given by its parent array (see :mod:`genrefine.types` for the terms:
node ``i`` has parent ``parents[i]``, ``-1`` is the root, ``parents[i] < i``). Everything a
verifier or the engine needs about the *shape* of the tree depends only on that array, so
:func:`build_tree` computes it once and caches it by key ``(tuple(parents), device)``.

Row convention shared by the verifiers: the target sees ``[root] + draft.tokens``, so its output
has ``n + 1`` rows and *row* ``g`` belongs to node ``g - 1`` (row ``0`` to the root). The row of a
node's parent is therefore ``parents[i] + 1`` (:attr:`TreeInfo.parent_row`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

_CACHE_SIZE = 256  # distinct (parents, device) keys kept; drafters use a handful of shapes


@dataclass(frozen=True, eq=False)
class TreeInfo:
    """The shape of one draft tree. Tensors are shared by every caller with the same key:
    treat them as read-only."""

    parents: Tensor  # [n] long, parent of each node, -1 for children of the root
    parent_row: Tensor  # [n] long, parents + 1: the target row each node is verified against
    # [n, n] bool, mask[i, j]: node j is node i or one of its ancestors. Usable directly as the
    # attention mask among the new draft tokens (query i may see key j).
    mask: Tensor
    # [n + 1, n + 1] bool, the same for the tokens fed to the target, [root] + draft: the root
    # is an ancestor of every node. Index 0 is the root, index i + 1 is node i.
    mask_with_root: Tensor
    depth: Tensor  # [n] long, 0 for children of the root
    leaves: Tensor  # [l] long, nodes without children, ascending
    sibling_rank: Tensor  # [n] long, how many siblings (same parent) have a lower index
    # [n, n] bool, earlier_sibling[i, j]: j is a sibling of i and j < i
    earlier_sibling: Tensor
    # ([e] long, [e] long): the (i, j) index pairs where earlier_sibling[i, j] is True
    earlier_sibling_pairs: tuple[Tensor, Tensor]
    rank_nodes: tuple[Tensor, ...]  # per sibling rank r: [m_r] long, the nodes of that rank
    num_nodes: int  # n
    num_levels: int  # 1 + the greatest depth; 0 for an empty tree

    @property
    def is_chain(self) -> bool:
        return len(self.rank_nodes) <= 1 and self.num_levels == self.num_nodes


def build_tree(
    parents: Tensor | Sequence[int], device: torch.device | str | None = None
) -> TreeInfo:
    """The :class:`TreeInfo` of a parent array, cached by ``(tuple(parents), device)``.

    parents: [n] long (or a sequence of ints); ``-1 <= parents[i] < i`` is asserted.
    device: where the returned tensors live; default ``parents.device`` (CPU for a sequence).
    Reading a tensor's values to form the key is one host sync when ``parents`` is on a GPU;
    drafters keep parent arrays on the CPU.
    """
    if isinstance(parents, Tensor):
        assert parents.dim() == 1, f"parents must be a 1-D tensor, got shape {tuple(parents.shape)}"
        dev = parents.device if device is None else torch.device(device)
        key = tuple(int(v) for v in parents.tolist())
    else:
        dev = torch.device("cpu") if device is None else torch.device(device)
        key = tuple(int(v) for v in parents)
    return _build_tree_cached(key, dev)


@lru_cache(maxsize=_CACHE_SIZE)
def _build_tree_cached(key: tuple[int, ...], device: torch.device) -> TreeInfo:
    n = len(key)
    for i, p in enumerate(key):
        assert -1 <= p < i, (
            f"draft parents must satisfy -1 <= parents[i] < i (topological order, -1 = child of "
            f"the root); got parents[{i}] = {p} in {list(key)}"
        )
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = [0] * n
    rank = [0] * n
    num_children: dict[int, int] = {}
    for i, p in enumerate(key):
        if p >= 0:
            mask[i] = mask[p]
            depth[i] = depth[p] + 1
        mask[i, i] = True
        rank[i] = num_children.get(p, 0)
        num_children[p] = rank[i] + 1

    par = torch.tensor(key, dtype=torch.long).reshape(n)
    idx = torch.arange(n)
    earlier = (par[:, None] == par[None, :]) & (idx[None, :] < idx[:, None])  # [n, n]
    pairs = earlier.nonzero(as_tuple=True)
    mask_with_root = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask_with_root[:, 0] = True
    mask_with_root[1:, 1:] = mask
    rank_t = torch.tensor(rank, dtype=torch.long).reshape(n)
    num_ranks = max(rank) + 1 if n else 0
    leaves = [i for i in range(n) if i not in num_children]

    def to(t: Tensor) -> Tensor:
        return t.to(device)

    return TreeInfo(
        parents=to(par),
        parent_row=to(par + 1),
        mask=to(mask),
        mask_with_root=to(mask_with_root),
        depth=to(torch.tensor(depth, dtype=torch.long).reshape(n)),
        leaves=to(torch.tensor(leaves, dtype=torch.long).reshape(-1)),
        sibling_rank=to(rank_t),
        earlier_sibling=to(earlier),
        earlier_sibling_pairs=(to(pairs[0]), to(pairs[1])),
        rank_nodes=tuple(to((rank_t == r).nonzero().flatten()) for r in range(num_ranks)),
        num_nodes=n,
        num_levels=(max(depth) + 1) if n else 0,
    )


def tree_positions(root_position: int | Tensor, info: TreeInfo) -> Tensor:
    """Positions of the draft nodes when the root sits at ``root_position``.

    Returns [n] long: ``root_position + 1 + depth``. Siblings share a position. The root itself
    (fed first, in front of the draft) keeps ``root_position``; for the engine's usual call
    ``root_position == cache.length``.
    """
    return info.depth + 1 + root_position


def deepest_path_row(info: TreeInfo, ok: Tensor) -> Tensor:
    """The target row right after the longest root-to-node path of nodes that pass ``ok``.

    ok: [n] bool, a per-node test. A node is on an accepted path when it and all its ancestors
    pass. Returns a 0-dim long tensor: ``d + 1`` for the deepest such node ``d`` (ties broken by
    the lowest index), or ``0`` (the root's row) when no child of the root passes. No host sync.
    """
    assert ok.shape == (info.num_nodes,), (tuple(ok.shape), info.num_nodes)
    if info.num_nodes == 0:
        return torch.zeros((), dtype=torch.long, device=ok.device)
    good = (~info.mask | ok[None, :]).all(dim=1)  # [n]
    score = torch.where(good, info.depth, -1)  # [n]
    best = score.argmax()  # first maximum: lowest index among the deepest
    return torch.where(score[best] >= 0, best + 1, 0)


def row_path(info: TreeInfo, row: Tensor | int) -> Tensor:
    """The root-to-node path ending at the node of target row ``row`` ([a] long; empty for the
    root's row 0). One host sync (the path length)."""
    return info.mask_with_root[row, 1:].nonzero().flatten()
