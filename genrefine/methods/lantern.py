"""LANTERN (method ``lantern``): relaxed acceptance over latent neighbours. LOSSY, bounded.

Drafts with speculative Jacobi decoding (training-free, :mod:`.parts.jacobi_sampling`) and
accepts a drafted code against the target's mass of the code and of up to ``relax_k`` codes next
to it in the VQ codebook, the added mass at most ``relax_delta``; the acceptance is budgeted so
each token's distribution stays within ``relax_delta`` of the target's in total variation
(:mod:`genrefine.verify.relaxed`). Needs ``model.token_latents`` (an image model).
"""

from __future__ import annotations

from ..verify.relaxed import LatentNeighbours
from .base import FixedPolicy, Method, MethodOptions, MethodSpec
from .parts.jacobi_sampling import DEFAULT_WINDOW, JacobiSamplingDrafter, token_latents


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    relax = LatentNeighbours(token_latents(model, "lantern"), opts.relax_k, opts.relax_delta)
    window = opts.draft_len or DEFAULT_WINDOW
    d = JacobiSamplingDrafter(model.vocab_size, window, name="lantern")
    return Method("lantern", [d], FixedPolicy(d, window), window, opts.acceptance, relax=relax)


SPEC = MethodSpec(
    "lantern", False,
    "LOSSY relaxed acceptance over latent neighbours (LANTERN; --relax-k, --relax-delta)",
    build, order=17, needs_latents=True,
)
