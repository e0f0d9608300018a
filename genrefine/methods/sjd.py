"""Speculative Jacobi decoding (method ``sjd``, Teng et al. 2025): training-free and lossless.

The draft is the previous Jacobi iterate: each pending position's token drawn from the target's
own distribution of the last verification forward at that position, verified by speculative
sampling against the guided/processed target (:mod:`genrefine.methods.parts.jacobi_sampling`).
Meant for image models, whose flat next-code distributions leave copy-based drafters nothing to
copy; greedy, it is Jacobi decoding.
"""

from __future__ import annotations

from .base import FixedPolicy, Method, MethodOptions, MethodSpec
from .parts.jacobi_sampling import DEFAULT_WINDOW, JacobiSamplingDrafter


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    window = opts.draft_len or DEFAULT_WINDOW
    d = JacobiSamplingDrafter(model.vocab_size, window)
    return Method("sjd", [d], FixedPolicy(d, window), window, opts.acceptance)


SPEC = MethodSpec(
    "sjd", True, "speculative Jacobi decoding: the last forward's rows sampled as the draft",
    build, order=15,
)
