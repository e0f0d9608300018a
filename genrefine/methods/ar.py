"""``ar``: plain autoregressive decoding, one token per target forward: the baseline every
speedup divides by. The engine runs it as a step with an empty draft.
"""

from __future__ import annotations

from .base import Method, MethodOptions, MethodSpec


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    return Method("ar")


SPEC = MethodSpec(
    "ar", True, "plain autoregressive decoding, the baseline", build, order=0
)
