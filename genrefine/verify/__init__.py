"""Verifiers: the refinement half of a step, as pure functions of tensors.

Terms (p, q, draft tree, root, row, accepted, bonus) are defined in :mod:`genrefine.types`.
"""

from .greedy import verify_greedy_argmax
from .sampling import (
    SIBLING_MODES,
    SiblingSampling,
    SpeculativePlan,
    speculative_plan,
    verify_speculative,
    verify_typical,
)
from .tree import (
    TreeInfo,
    build_tree,
    deepest_path_row,
    row_path,
    tree_positions,
)

__all__ = [
    "SIBLING_MODES",
    "SiblingSampling",
    "SpeculativePlan",
    "TreeInfo",
    "build_tree",
    "deepest_path_row",
    "row_path",
    "speculative_plan",
    "tree_positions",
    "verify_greedy_argmax",
    "verify_speculative",
    "verify_typical",
]
