"""Tolerance acceptance on draft trees (VADUSA). LOSSY by design.

Terms are those of :mod:`genrefine.types` and :mod:`genrefine.verify.tree`: ``p`` the target's
processed row, rows ``parents[i] + 1`` the row node ``i`` is verified against.

Under sampling, a node is *tolerated* when its token is among the target's top-``k`` tokens of
its parent's row: fewer than ``k`` tokens have a strictly larger ``p``, and its own ``p`` is
positive (so a token that top-k / top-p sampling removed is never accepted). The accepted path
is the deepest node whose ancestors-or-self are all tolerated (ties: the lowest index), as in
greedy verification; the bonus is drawn from ``p`` at the row right after it. Drafted tokens
that pass are emitted as drafted: the output follows the target's ranking, not its law.

With ``k = 1`` a node passes exactly when its token is the row's most likely one, the test of
greedy verification (:mod:`genrefine.verify.greedy`; on a tie for the top, every tied token
passes). Greedy decoding does not come here (the engine verifies by argmax), so ``vadusa`` at
temperature 0 is plain greedy tree verification.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sampling import sample
from ..types import Draft, VerifyResult
from .greedy import finish
from .tree import build_tree, deepest_path_row


def tolerated(draft: Draft, target_probs: Tensor, k: int) -> Tensor:
    """Which nodes are within the top-``k`` of their parent's row: [n] bool.

    target_probs: [n + 1, V], p at each row."""
    if k < 1:
        raise ConfigError(f"the tolerance k (top-k accepted) must be >= 1, got {k}")
    dev = target_probs.device
    info = build_tree(draft.parents, device=dev)
    rows = target_probs.float()[info.parent_row]  # [n, V]
    mine = rows.gather(1, draft.tokens.to(dev)[:, None])  # [n, 1]
    above = (rows > mine).sum(dim=1)  # [n]: tokens strictly more likely
    return (above < k) & (mine.squeeze(1) > 0)


def verify_tolerance(
    draft: Draft, target_probs: Tensor, generator: torch.Generator, k: int
) -> VerifyResult:
    """Tolerance verification of a draft tree (module docstring).

    target_probs: [n + 1, V], p at each row. generator: on ``target_probs.device``; the only
    randomness (one draw, the bonus). One host sync (the path length).
    """
    n = len(draft)
    assert target_probs.dim() == 2 and target_probs.shape[0] == n + 1, (
        f"target_probs must be [n + 1, vocab] = [{n + 1}, vocab], got {tuple(target_probs.shape)}"
    )
    dev = target_probs.device
    info = build_tree(draft.parents, device=dev)
    end_row = deepest_path_row(info, tolerated(draft, target_probs, k))  # 0-dim
    bonus = sample(target_probs.float()[end_row], generator)  # 0-dim
    return finish(info, draft.tokens.to(dev), end_row, bonus)
