"""Principled coarse-grained acceptance (method ``pcg``, Yanuka et al. 2025). EXACT on groups,
LOSSY at token level.

The vocabulary is partitioned once per model into groups of about ``group_size`` tokens close
in the target's embedding space (``model.token_latents``: for a speech model, its audio codes'
input embeddings), by recursive balanced cuts along the principal axis. Drafts come from an
independent draft model when ``--draft-model`` is given (the paper's setting; ``sps`` is the
same drafter with exact acceptance; the speech bundle's draft model is used by default), else
from speculative Jacobi decoding (training-free, :mod:`.parts.jacobi_sampling`, the drafter of
``sjd`` / ``mc-sjd``, so acceptance compares with that one), and
speculative sampling runs on groups (:mod:`genrefine.verify.groups`): a drafted ``x ~ q`` is
accepted with ``min(1, p(G(x)) / q(G(x)))``; on rejection the group is drawn from
``norm(max(0, pG - qG))`` and the token from ``p`` inside it. The emitted token's *group* has
exactly the target's group distribution; the token inside an accepted group is the drafted one,
so the token's distribution is not the target's (lossy). The paper's groups may overlap, with
each token's mass split among them; here they are a partition. At temperature 0 it is plain
greedy verification (token-identical to ``ar``).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..verify.groups import TokenGroups
from .base import FixedPolicy, Method, MethodOptions, MethodSpec
from .parts.jacobi_sampling import DEFAULT_WINDOW, JacobiSamplingDrafter, token_latents


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    if getattr(model, "token_latents", None) is None:
        raise ConfigError(
            "method pcg needs a model whose tokens have latent vectors (token_latents: a speech "
            "or image model's code embeddings); this model has none"
        )
    groups = TokenGroups(token_latents(model, "pcg"), opts.group_size)  # once per method
    if opts.draft_model is not None:  # the paper's setting: an independent draft model
        from .sps import DraftModelDrafter, draft_model_drafter

        d, budget = draft_model_drafter(model, opts, tokenizer)
        if not isinstance(d, DraftModelDrafter):
            raise ConfigError("pcg needs a draft model with the target's vocabulary (its drafts carry q)")
        return Method("pcg", [d], FixedPolicy(d, budget), budget, opts.acceptance,
                      verify_sampled=groups.verify)
    window = opts.draft_len or DEFAULT_WINDOW
    d = JacobiSamplingDrafter(model.vocab_size, window, name="pcg")
    return Method("pcg", [d], FixedPolicy(d, window), window, opts.acceptance,
                  verify_sampled=groups.verify)


SPEC = MethodSpec(
    "pcg", False,
    "LOSSY at token level, exact on groups of similar codes: group-level speculative "
    "sampling (PCG)",
    build, order=19, needs_latents=True, uses_draft_model=True,
)
