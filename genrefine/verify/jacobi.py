"""Jacobi (fixed-point) iterative refinement, greedy-exact.

Decoding ``k`` tokens greedily is solving ``y_i = argmax p(. | prefix, y_<i)`` for ``i = 1..k``.
Jacobi iteration guesses the whole block, runs the target once over ``[root] + guesses`` (a
chain), and replaces every guess by the target's argmax at its row: ``y <- f(y)``. Each iteration
fixes at least one more token (the first row only depends on decided tokens), and usually more
once the guesses converge. The engine verifies the guesses greedily, so the emitted tokens are the
accepted prefix plus the bonus, exactly what plain greedy decoding emits; the rest of the iterate
carries over as the next block of guesses. The block stops changing once it is a fixed point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jacobi_update(target_argmax: Tensor, num_accepted: int, block: int, pad: int) -> Tensor:
    """The next block of guesses after one iteration.

    target_argmax: [n + 1] long, the target's argmax at each row of ``[root] + guesses``.
    num_accepted: guesses that matched (the emitted tokens are target_argmax[: num_accepted + 1]).
    Returns [block] long: the iterate beyond the emitted tokens, padded with ``pad``.
    """
    carried = target_argmax[num_accepted + 1 :][:block]  # [<= block]
    if carried.shape[0] < block:
        fill = torch.full((block - carried.shape[0],), pad, dtype=torch.long, device=carried.device)
        carried = torch.cat([carried, fill])
    return carried
