"""``medusa``: Medusa's static tree (Cai et al. 2024).

The trained heads' top-``k`` candidates combined along a static tree of index paths chosen after
training from the heads' measured top-``i`` accuracies on held-back text
(:func:`~genrefine.methods.parts.heads.static_tree`, stored with the drafter), best paths first.
"""

from __future__ import annotations

from torch import Tensor

from ..types import Draft
from .base import Context, Method, MethodOptions, MethodSpec
from .parts.heads import HeadsDrafter, heads_method, load_heads, paths_draft


class MedusaDrafter(HeadsDrafter):
    """The heads' top-``k`` along a static tree of candidate index paths (``tree``: head 1's
    ``i``-th best, then head 2's ``j``-th best, ...), best paths first."""

    name = "medusa"

    def __init__(self, model, net, vocab_ids, tree: list[tuple[int, ...]], **kw) -> None:
        super().__init__(model, net, vocab_ids, **kw)
        self.tree = tree

    def _draft(self, ctx: Context, h: Tensor, budget: int) -> tuple[Draft, Tensor, Tensor]:
        ids, logp = self.candidates(h, self.topk)
        return paths_draft(self.tree[:budget], ids), ids, logp


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, _, ids = load_heads(model, opts, tokenizer)
    tree = [tuple(p) for p in stored.config["tree"]]
    topk = int(stored.config["topk"])
    return heads_method(MedusaDrafter, model, opts, net, ids, len(tree), tree=tree, topk=topk)


SPEC = MethodSpec(
    name="medusa", lossless=True, build=build, order=9, native_only=True, drafter_kind="heads",
    summary="Medusa: trained heads' top-k in a static tree chosen from their accuracies",
)
