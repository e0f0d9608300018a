"""Greedy verification: keep the longest drafted path the target's argmax agrees with.

Terms (p, draft tree, root, row, accepted, bonus) are those of :mod:`genrefine.types` and
:mod:`genrefine.verify.tree`. A node is *correct* when its token equals the argmax of its parent's
row (row ``0`` for children of the root, row ``parents[i] + 1`` otherwise). The accepted path is
the deepest node whose ancestors-or-self are all correct (ties: lowest index); the bonus is the
argmax of the row right after it. The output is exactly what plain greedy decoding emits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import Draft, VerifyResult
from .tree import TreeInfo, build_tree, deepest_path_row, row_path


def verify_greedy_argmax(draft: Draft, target_argmax: Tensor) -> VerifyResult:
    """Greedy verification from the target's argmax of each row.

    target_argmax: [n + 1] long, the target's greedy token after the root and after each node.
    One host sync (the accepted length). Results live on ``target_argmax.device``.
    """
    n = len(draft)
    assert target_argmax.shape == (n + 1,), (
        f"target_argmax must be [n + 1] = [{n + 1}], got {tuple(target_argmax.shape)}"
    )
    info = build_tree(draft.parents, device=target_argmax.device)
    tokens = draft.tokens.to(target_argmax.device)  # [n]
    correct = tokens == target_argmax[info.parent_row]  # [n] bool
    end_row = deepest_path_row(info, correct)  # 0-dim
    return finish(info, tokens, end_row, target_argmax[end_row])


def finish(info: TreeInfo, tokens: Tensor, end_row: Tensor, bonus: Tensor) -> VerifyResult:
    """Assemble a :class:`VerifyResult` from the row after the accepted path and the bonus.

    tokens: [n] long draft tokens. end_row: 0-dim long. bonus: 0-dim long.
    """
    path = row_path(info, end_row)  # [a]
    out = torch.cat([tokens[path], bonus.reshape(1).to(tokens.dtype)])  # [a + 1]
    return VerifyResult(path=path, tokens=out)
