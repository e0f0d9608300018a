"""VADUSA (method ``vadusa``, Li et al. 2024): Medusa heads, a sparse tree and tolerance
acceptance, for speech tokens. LOSSY.

Drafts are the trained prediction heads' candidates (:mod:`.parts.heads`, the drafter of
``medusa``, found by :func:`~.parts.store.find_drafter` or ``--drafter``) along a *sparse* tree:
the heads' static tree (best paths first) kept to its paths that use only each head's
:data:`SPARSE_WIDTH` best candidates, at most :data:`SPARSE_NODES` of them. Under sampling a
drafted token is accepted when it is among the target's top-``tolerance`` tokens at its position
(:mod:`genrefine.verify.tolerance`): the deepest such path is kept, then a bonus drawn from the
target's distribution after it. At temperature 0 it is plain greedy tree verification
(token-identical to ``ar``).

Simplified from the paper: its tolerance rule and tree were read from the abstract and summaries
only (the method section was not at hand). The tree here is Medusa's static tree cut to a small
budget, not one searched for speech; the bonus is a plain draw from the target's processed row.
"""

from __future__ import annotations

from functools import partial

from ..verify.tolerance import verify_tolerance
from .base import Method, MethodOptions, MethodSpec
from .medusa import MedusaDrafter
from .parts.heads import heads_method, load_heads

SPARSE_NODES = 16  # the most tree nodes per step
SPARSE_WIDTH = 3  # candidates per head


def sparse_tree(tree: list[tuple[int, ...]], nodes: int = SPARSE_NODES,
                width: int = SPARSE_WIDTH) -> list[tuple[int, ...]]:
    """The first ``nodes`` paths of a static tree (parents before children) whose every index is
    below ``width``; still a tree, parents before children (a kept path's parent uses indices
    below ``width`` too and comes earlier)."""
    return [p for p in tree if max(p) < width][:nodes]


class VadusaDrafter(MedusaDrafter):
    """Medusa's drafter on the sparse tree."""

    name = "vadusa"


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, _, ids = load_heads(model, opts, tokenizer)
    tree = sparse_tree([tuple(p) for p in stored.config["tree"]])
    topk = min(int(stored.config["topk"]), SPARSE_WIDTH)
    method = heads_method(VadusaDrafter, model, opts, net, ids, len(tree), tree=tree, topk=topk)
    method.verify_sampled = partial(verify_tolerance, k=opts.tolerance)
    return method


SPEC = MethodSpec(
    name="vadusa", lossless=False, build=build, order=20, native_only=True, drafter_kind="heads",
    summary="LOSSY Medusa heads on a sparse tree, drafts accepted in the target's top-k (VADUSA; "
    "--tolerance)",
)
