"""``medusa``: Medusa's static tree (Cai et al. 2024).

The trained heads' top-``k`` candidates combined along a static tree of index paths chosen after
training from the heads' measured top-``i`` accuracies on held-back text
(:func:`~genrefine.methods.parts.heads.static_tree`, stored with the drafter), best paths first.
"""

from __future__ import annotations

from .base import Method, MethodOptions, MethodSpec
from .parts.heads import heads_method, load_heads


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, _, ids = load_heads(model, opts, tokenizer)
    tree = [tuple(p) for p in stored.config["tree"]]
    topk = int(stored.config["topk"])
    return heads_method("medusa", model, opts, net, ids, budget=len(tree), tree=tree, topk=topk)


SPEC = MethodSpec(
    name="medusa", lossless=True, build=build, order=9, native_only=True, drafter_kind="heads",
    summary="Medusa: trained heads' top-k in a static tree chosen from their accuracies",
)
