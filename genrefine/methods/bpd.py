"""``bpd``: blockwise parallel decoding (Stern et al. 2018).

Trained prediction heads on the target's last hidden state (:mod:`genrefine.methods.parts.heads`)
each guess the token ``j`` places ahead; the draft is the chain of their argmaxes, verified by the
target. Needs a trained heads drafter (``--drafter DIR``, or the one shipped for the model).
"""

from __future__ import annotations

from torch import Tensor

from ..types import Draft
from .base import Context, Method, MethodOptions, MethodSpec
from .parts.heads import HeadsDrafter, heads_method, load_heads


class BpdDrafter(HeadsDrafter):
    """The chain of each head's argmax."""

    name = "bpd"

    def _draft(self, ctx: Context, h: Tensor, budget: int) -> tuple[Draft, Tensor, Tensor]:
        ids, logp = self.candidates(h, 1)  # [K, 1]
        return Draft.chain(ids[: min(budget, ids.shape[0]), 0]), ids, logp


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    _, net, _, ids = load_heads(model, opts, tokenizer)
    return heads_method(BpdDrafter, model, opts, net, ids, budget=net.num_heads)


SPEC = MethodSpec(
    name="bpd", lossless=True, build=build, order=8, native_only=True, drafter_kind="heads",
    summary="blockwise parallel decoding: trained heads' argmax chain (--drafter or shipped)",
)
