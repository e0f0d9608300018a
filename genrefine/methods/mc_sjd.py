"""Speculative Jacobi decoding with maximally coupled iterates (method ``mc-sjd``): lossless.

As ``sjd``, but a position that already held a drafted token keeps it with probability
``min(1, q_new(x) / q_old(x))`` (else a draw from the residual), so successive iterates agree
more often while each token is still distributed as the ``q_new`` the draft reports
(:mod:`genrefine.methods.parts.jacobi_sampling`).
"""

from __future__ import annotations

from .base import FixedPolicy, Method, MethodOptions, MethodSpec
from .parts.jacobi_sampling import DEFAULT_WINDOW, JacobiSamplingDrafter


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    window = opts.draft_len or DEFAULT_WINDOW
    d = JacobiSamplingDrafter(model.vocab_size, window, coupled=True, name="mc-sjd")
    return Method("mc-sjd", [d], FixedPolicy(d, window), window, opts.acceptance)


SPEC = MethodSpec(
    "mc-sjd", True, "speculative Jacobi decoding with coupled iterates (MC-SJD)", build, order=16,
)
