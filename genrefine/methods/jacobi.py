"""Jacobi decoding as a drafter (method ``jacobi``): the draft is the current Jacobi iterate.

See :mod:`genrefine.verify.jacobi` for the refinement rule. Guesses start as copies of the last
context token; each verification refines them. When other drafters decided tokens in between
(method ``auto`` switches drafters per step), the guesses for those positions are dropped so that
each guess stays aligned with the position it was made for.
"""

from __future__ import annotations

import torch

from ..types import Draft
from ..verify.jacobi import jacobi_update
from .base import Context, FixedPolicy, Method, MethodOptions, MethodSpec, StepFeedback


class JacobiDrafter:
    """Keeps a block of ``block`` guesses and refines them by fixed-point iteration."""

    name = "jacobi"

    def __init__(self, block: int = 8) -> None:
        if block < 1:
            from ..errors import ConfigError

            raise ConfigError(f"the Jacobi block must be >= 1 token, got {block}")
        self.block = block
        self.guesses: torch.Tensor | None = None  # [block] long
        self.start = 0  # guesses[j] is a guess for context index start + j

    def reset(self) -> None:
        self.guesses = None

    def propose(self, ctx: Context, budget: int) -> Draft:
        m = int(ctx.tokens.shape[0])
        if self.guesses is not None and m != self.start:
            # other drafters (method ``auto``) or plain steps decided tokens since our last
            # observe: drop the guesses for the positions now decided, pad at the end
            shift = m - self.start
            if 0 < shift < self.block:
                pad = self.guesses[-1:].repeat(shift)
                self.guesses = torch.cat([self.guesses[shift:], pad])
            else:
                self.guesses = None
        if self.guesses is None:
            self.guesses = ctx.tokens[-1:].repeat(self.block)
        self.start = m
        return Draft.chain(self.guesses[: min(budget, self.block)])

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        pad = int(feedback.result.tokens[-1])
        a = feedback.result.num_accepted
        self.guesses = jacobi_update(feedback.target_argmax.cpu(), a, self.block, pad)
        self.start = int(ctx.tokens.shape[0]) + a + 1  # the context after this step's tokens


def build(model, opts: MethodOptions, tokenizer=None) -> Method:

    block = opts.draft_len or opts.jacobi_block
    d = JacobiDrafter(block=block)
    return Method("jacobi", [d], FixedPolicy(d, block), block, opts.acceptance)


SPEC = MethodSpec(
    "jacobi", True, "Jacobi fixed-point iteration over a block of guesses", build, order=4
)
