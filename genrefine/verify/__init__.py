"""Verifiers: the refinement half of a step, as pure functions of tensors.

Terms (p, q, draft tree, root, row, accepted, bonus) are defined in :mod:`genrefine.types`.
"""

from .greedy import verify_greedy_argmax
from .relaxed import (
    LatentGroups,
    LatentNeighbours,
    RelaxedAcceptance,
    emitted_distribution,
    relaxed_rows,
    verify_relaxed,
)
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
    "LatentGroups",
    "LatentNeighbours",
    "RelaxedAcceptance",
    "SIBLING_MODES",
    "SiblingSampling",
    "SpeculativePlan",
    "TreeInfo",
    "build_tree",
    "deepest_path_row",
    "emitted_distribution",
    "relaxed_rows",
    "row_path",
    "speculative_plan",
    "tree_positions",
    "verify_greedy_argmax",
    "verify_relaxed",
    "verify_speculative",
    "verify_typical",
]
