"""``bpd+lm``: the heads' candidates rescored position by position by a small neural LM.

A fixed-window MLP over the target's embedding rows (:class:`~genrefine.methods.parts.heads.WindowLM`,
distilled from the target with the heads) scores each head's top-``k``; the candidate maximising
head log-probability plus the LM's score given the chosen prefix is kept: a chain (Kim et al. 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, Method, MethodOptions, MethodSpec
from .parts.heads import HeadsDrafter, WindowLM, heads_method, load_heads, output_logits


class LmRescoredDrafter(HeadsDrafter):
    """Position by position, the head candidate maximising its log-probability plus ``alpha``
    times the window LM's score given the chosen prefix; a chain."""

    name = "bpd+lm"

    def __init__(self, model, net, vocab_ids, lm: WindowLM, alpha: float = 1.0, **kw) -> None:
        if lm is None:
            raise ConfigError("bpd+lm needs the drafter's window LM (train it with the heads)")
        super().__init__(model, net, vocab_ids, **kw)
        self.lm = lm.to(model.device, model.dtype).eval()
        self.alpha = alpha

    def _draft(self, ctx: Context, h: Tensor, budget: int) -> tuple[Draft, Tensor, Tensor]:
        ids, logp = self.candidates(h, self.topk)  # [K, k]
        lm, w = self.lm, self.lm.window
        prefix = ctx.tokens[-w:].to(self.model.device)
        if prefix.shape[0] < w:  # a context shorter than the window: repeat its first token
            prefix = torch.cat([prefix[:1].expand(w - prefix.shape[0]), prefix])
        embed = self.model.embed_tokens
        out = []
        for j in range(min(budget, ids.shape[0])):
            cand = ids[j].to(self.model.device)  # [k]
            state = lm(embed(prefix[-w:]).unsqueeze(0))[0]  # [H]
            rows = self.model.lm_head.index_select(0, cand)  # [k, H]
            lm_score = output_logits(self.model, state.unsqueeze(0), rows)[0].cpu()  # [k]
            best = int((logp[j] + self.alpha * lm_score).argmax())
            tok = ids[j, best]
            out.append(int(tok))
            prefix = torch.cat([prefix, tok.view(1).to(prefix.device)])
        return Draft.chain(out), ids, logp


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, lm, ids = load_heads(model, opts, tokenizer)
    topk = int(stored.config["topk"])
    return heads_method(LmRescoredDrafter, model, opts, net, ids, net.num_heads, topk=topk, lm=lm)


SPEC = MethodSpec(
    name="bpd+lm", lossless=True, build=build, order=11, native_only=True, drafter_kind="heads",
    summary="BPD heads' top-k rescored position by position by a small neural LM (a chain)",
)
