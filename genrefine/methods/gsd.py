"""Grouped speculative decoding (method ``gsd``, So et al. 2025): LOSSY, bounded.

Drafts with speculative Jacobi decoding (training-free, :mod:`.parts.jacobi_sampling`) and
accepts a drafted code ``y`` with ``min(1, p(G) / q(G))`` for its group ``G``: ``y`` and those
of the target's ``group_size`` most likely codes whose latent cosine similarity to ``y`` is at
least ``group_similarity``; budgeted so each token's distribution stays within ``relax_delta``
of the target's in total variation (:mod:`genrefine.verify.relaxed`). Needs
``model.token_latents`` (an image model).
"""

from __future__ import annotations

from ..verify.relaxed import LatentGroups
from .base import FixedPolicy, Method, MethodOptions, MethodSpec
from .parts.jacobi_sampling import DEFAULT_WINDOW, JacobiSamplingDrafter, token_latents


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    relax = LatentGroups(
        token_latents(model, "gsd"), opts.group_size, opts.group_similarity, opts.relax_delta
    )
    window = opts.draft_len or DEFAULT_WINDOW
    d = JacobiSamplingDrafter(model.vocab_size, window, name="gsd")
    return Method("gsd", [d], FixedPolicy(d, window), window, opts.acceptance, relax=relax)


SPEC = MethodSpec(
    "gsd", False,
    "LOSSY grouped acceptance of latent-similar codes (GSD; group size, similarity, delta)",
    build, order=18, needs_latents=True,
)
