"""``bpd+lm``: the heads' candidates rescored position by position by a small neural LM.

A fixed-window MLP over the target's embedding rows (:class:`~genrefine.methods.parts.heads.WindowLM`,
distilled from the target with the heads) scores each head's top-``k``; the candidate maximising
head log-probability plus the LM's score given the chosen prefix is kept: a chain (Kim et al. 2024).
"""

from __future__ import annotations

from .base import Method, MethodOptions, MethodSpec
from .parts.heads import heads_method, load_heads


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, lm, ids = load_heads(model, opts, tokenizer)
    topk = int(stored.config["topk"])
    return heads_method("bpd+lm", model, opts, net, ids, budget=net.num_heads, topk=topk, lm=lm)


SPEC = MethodSpec(
    name="bpd+lm", lossless=True, build=build, order=11, native_only=True, drafter_kind="heads",
    summary="BPD heads' top-k rescored position by position by a small neural LM (a chain)",
)
