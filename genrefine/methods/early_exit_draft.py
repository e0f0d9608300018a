"""``early-exit-draft``: self-speculation with the target's first layers (LayerSkip-style).

The target's first ``exit_layer`` layers, its final norm and its output head (cut to the most
frequent tokens, :mod:`genrefine.methods.parts.draft_vocab`) draft; all layers verify. Drafting
shares the target's KV cache and rolls back what it appended
(:mod:`genrefine.methods.parts.self_draft`). The draft length is a
:class:`~genrefine.methods.parts.draft_size.DraftStop`'s unless a draft confidence is given.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, Method, MethodOptions, MethodSpec, StepFeedback
from .parts.draft_vocab import reduced_vocab
from .parts.self_draft import (
    DEFAULT_CONFIDENCE,
    check_confidence,
    draft_cost,
    draft_head,
    greedy_self_draft,
    self_draft_kw,
    self_draft_method,
    target_cache,
)


class EarlyExitDrafter:
    """Drafts with the first ``exit_layer`` layers, the final norm and the (reduced) head.

    ``exit_layer == num_layers`` (allowed with ``vocab_ids`` only) drafts with every layer and
    saves only on the head: for small models with large vocabularies that is the cheapest
    self-draft that stays accurate (FR-Spec's reduced head on the target itself).
    """

    name = "early-exit"

    def __init__(
        self,
        model,
        exit_layer: int,
        vocab_ids: Tensor | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> None:
        L = model.num_layers
        top = L if vocab_ids is not None else L - 1
        if not 1 <= exit_layer <= top:
            raise ConfigError(
                f"the exit layer must be between 1 and {top} (the model has {L} layers; "
                f"exiting after all {L} drafts with the whole model and only makes sense with a "
                f"reduced vocabulary), got {exit_layer}"
            )
        check_confidence(confidence)
        self.model = model
        self.exit_layer = exit_layer
        self.layers = list(range(exit_layer))
        self.head, self.head_rows = draft_head(model, vocab_ids)
        self.confidence = confidence
        self.stop = None

    @property
    def cost(self) -> float:
        """Estimated cost of a draft token relative to a target forward (see :func:`draft_cost`)."""
        return draft_cost(self.model, self.layers, self.head_rows)

    def with_adaptive_stop(self, verify_cost) -> "EarlyExitDrafter":
        """Decide draft lengths with a :class:`~genrefine.methods.parts.draft_size.DraftStop` instead of the
        confidence threshold: a draft token priced at :attr:`cost` of a one-token target forward
        (``verify_cost(1)``)."""
        from .parts.draft_size import DraftStop

        self.stop = DraftStop(verify_cost, self.cost * verify_cost(1))
        return self

    def reset(self) -> None:
        if self.stop is not None:
            self.stop.reset()

    def propose(self, ctx: Context, budget: int) -> Draft:
        cache = target_cache(ctx, self.name)
        toks, _ = greedy_self_draft(
            self.model,
            cache,
            ctx.tokens[-1:],
            budget,
            self.layers,
            self.head,
            self.confidence,
            self.stop,
        )
        if self.stop is not None:
            toks = toks[: self.stop(whole=True)]  # verified whole: see SkipLayerDrafter
        return Draft.chain(toks)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """The adaptive stop (if any) learns how sure the draft is."""
        if self.stop is not None:
            self.stop.observe(feedback.result.num_accepted, len(feedback.draft))


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .parts.self_draft import default_exit_layer

    exit_layer = opts.exit_layer or default_exit_layer(model.num_layers)
    ids = reduced_vocab(model, opts, tokenizer, default=True)
    d = EarlyExitDrafter(model, exit_layer, ids, **self_draft_kw(opts))
    return self_draft_method("early-exit-draft", d, model, opts)


SPEC = MethodSpec(
    name="early-exit-draft", lossless=True, build=build, native_only=True, order=5,
    summary="self-speculation: the first layers (+ final norm, head) draft, all layers verify",
)
