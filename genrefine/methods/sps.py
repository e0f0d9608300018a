"""An independent draft model (method ``sps``): a smaller model drafts, the target verifies.

The draft model is any model the runtime loads (native, or through the transformers adapter) and
keeps a KV cache of its own. Which drafter serves it is decided once, from the tokenizers
(:func:`make_draft_model_drafter`):

* **Same tokenizer** (:class:`DraftModelDrafter`, speculative sampling as in Leviathan et al.
  2023 and Chen et al. 2023): the draft model reads the target's token ids and drafts a chain of
  ``budget`` tokens autoregressively. Greedy: the argmax. Sampling: each token is drawn from
  ``q``, the draft model's distribution processed with the *same* temperature / top-k / top-p as
  the target's (:func:`genrefine.sampling.logits_to_probs`), and the draft carries ``q``
  (``Draft.probs``), so speculative sampling accepts a token with ``min(1, p / q)`` and the output
  has exactly the target's distribution. The two models may have different vocabulary *sizes*
  with the same tokenizer (embedding matrices padded past the tokenizer, as Qwen's are): drafts
  and ``q`` cover only the ids both models have, ``q`` is zero past them.
* **Different tokenizers** (:class:`TextBridgeDrafter`): the target's context is decoded to text
  and re-tokenized for the draft model; the draft model's greedy continuation is decoded and the
  new text encoded with the target's tokenizer. Those drafts are deterministic (``probs=None``):
  greedy verification gives exactly the target's greedy output, and speculative sampling treats
  each token as a point mass, which keeps the target's distribution too. The bridge needs both
  tokenizers to reproduce text through encode and decode, also when a text is encoded in two
  pieces (:func:`check_bridgeable`); otherwise it is refused with a one-line
  :class:`~genrefine.errors.ConfigError`.

Cache sync (both drafters, :class:`DraftRunner`): the drafter remembers which token ids its
cache holds; each ``propose`` keeps the longest common prefix with the new context, rolls the rest
back (O(1)) and feeds only what is new: after a fully accepted draft its last token and the bonus,
after a rejection just the bonus. No ``observe`` is needed, so the drafter also stays right when
another drafter served some steps.

Reduced head (same tokenizer, native draft models): the draft model may project onto a subset
of the vocabulary (``vocab_ids``; :func:`genrefine.methods.reduced_vocab` gives the 32768 most
frequent tokens by default for vocabularies over 65536, as for self-drafting). A small model's
head is then a small part of a draft token's cost instead of most of it. Greedy drafts are the
argmax over the subset; sampled drafts are drawn from ``q`` over the subset, zero elsewhere, and
speculative sampling stays exact for any ``q`` it is told. Verification uses the whole vocabulary.

Early stop: drafting stops after the first token whose top draft probability (the softmax of the
draft logits; under sampling the top of ``q``) is below ``confidence``; that token is still
proposed, as in transformers' ``assistant_confidence_threshold`` (whose default, 0.4, is ours).
Deciding a chain's length from the tokens drawn so far keeps speculative sampling exact: whether
node ``i`` has a child is fixed before that child is drawn. Once the context no longer fits in
the draft model's own context length, nothing is drafted (plain decoding steps).

One drafter holds one cache: sequences decoded concurrently with the same drafter stay correct
(each ``propose`` syncs to its context) but refill the cache whenever they alternate.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..costs import target_costs
from ..errors import ConfigError
from ..types import Draft
from .base import Context, FixedPolicy, Method, MethodOptions, MethodSpec, StepFeedback
from .parts.draft_runner import (
    DEFAULT_CONFIDENCE,
    GREEDY_PARAMS,
    DraftRunner,
    check_confidence,
)
from .parts.draft_vocab import reduced_vocab
from .parts.text_bridge import TextBridgeDrafter, check_bridgeable


# --------------------------------------------------------------------------- same tokenizer
class DraftModelDrafter:
    """Drafts with a model that shares the target's tokenizer (token ids mean the same)."""

    name = "draft-model"

    def __init__(
        self,
        model,
        target_vocab: int,
        confidence: float = DEFAULT_CONFIDENCE,
        vocab_ids: Tensor | None = None,
        stop=None,
    ) -> None:
        """``vocab_ids``: draft onto these token ids only ([v] long, FR-Spec's reduced head, see
        :mod:`genrefine.vocab`), for draft models that can project onto a subset
        (``reduced_head``, the native runtime); ignored for others. ``stop``: a
        :class:`~genrefine.methods.parts.draft_size.DraftStop` deciding the draft length (adaptive) instead of
        the ``confidence`` threshold; :meth:`with_adaptive_stop` makes one."""
        check_confidence(confidence)
        self.target_vocab = int(target_vocab)
        both = min(self.target_vocab, int(model.vocab_size))  # ids both models have
        head = None
        if vocab_ids is not None and hasattr(model, "reduced_head"):
            ids = torch.unique(vocab_ids.long().cpu())
            ids = ids[ids < both]
            if ids.numel() == 0:
                raise ConfigError("the draft vocabulary has no token id that both models have")
            if ids.numel() < both:
                head = model.reduced_head(ids)
        self.runner = DraftRunner(model, head)
        self.vocab = both if head is None else int(head.ids.shape[0])  # columns drafted
        self.confidence = confidence
        self.stop = stop

    def draft_cost_key(self) -> str:
        """What the draft model's per-token time depends on (for a cached measurement)."""
        from ..diskcache import machine_key

        m, head = self.model, self.runner.head
        cols = "all" if head is None else str(int(head.ids.shape[0]))
        return (
            f"draft:{getattr(m, 'name', type(m).__name__)}|head={cols}|{getattr(m, 'dtype', '')}"
            f"|{machine_key(getattr(m, 'device', 'cpu'))}"
        )

    def with_adaptive_stop(self, verify_cost) -> "DraftModelDrafter":
        """Decide draft lengths with a :class:`~genrefine.methods.parts.draft_size.DraftStop`: ``verify_cost``
        (the target's forward times) and the draft model's time per draft token, measured once
        per model, head and machine and cached on disk (see :func:`genrefine.costs.load_or_measure`)."""
        from ..costs import load_or_measure
        from .parts.draft_size import DraftStop

        kw = (
            {}
            if self.runner.head is None
            else {"forward_kwargs": {"vocab_subset": self.runner.head}}
        )
        table = load_or_measure(self.model, self.draft_cost_key(), sizes=(1,), **kw)
        self.stop = DraftStop(verify_cost, table(1))
        return self

    @property
    def model(self):
        return self.runner.model

    def reset(self) -> None:
        self.runner.reset()
        if self.stop is not None:
            self.stop.reset()

    def propose(self, ctx: Context, budget: int) -> Draft:
        ids = ctx.tokens
        k = self.runner.max_draft(int(ids.shape[0]), budget)
        if k < 1:
            return Draft.empty()
        params = ctx.params or GREEDY_PARAMS
        if not params.greedy:
            assert ctx.generator is not None, "sampled drafts need the generation's generator"
        logits = self.runner.sync(ids, extra=k - 1)
        toks, q = self.runner.draft(
            logits, k, params, ctx.generator, self.confidence, self.vocab, self.stop
        )
        if self.stop is not None:  # greedy: verify only the prefix that pays (the rest is in
            n = self.stop(whole=not params.greedy)  # the cache; the next sync rolls it back)
            toks, q = toks[:n], (None if q is None else q[:n])
        if q is not None:
            q = self.runner.expand(q, self.target_vocab)  # [n, target_vocab]
        return Draft.chain(toks, q)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """The adaptive stop learns how sure the draft is; the cache needs nothing: the next
        ``propose`` finds what was accepted in its context."""
        if self.stop is not None:
            self.stop.observe(feedback.result.num_accepted, len(feedback.draft))


# --------------------------------------------------------------------------- choosing
def same_tokenizer(target_model, draft_model, target_tokenizer, draft_tokenizer) -> bool:
    """Whether token ids mean the same in both models.

    With both tokenizers: their vocabularies (token -> id) are equal. Without one of them: the
    models' vocabulary sizes are equal (a missing tokenizer is taken to be the other's).
    """
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer is draft_tokenizer:
            return True
        return target_tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    return int(target_model.vocab_size) == int(draft_model.vocab_size)


def make_draft_model_drafter(
    target_model,
    draft_model,
    target_tokenizer=None,
    draft_tokenizer=None,
    confidence: float = DEFAULT_CONFIDENCE,
    vocab_ids: Tensor | None = None,
):
    """The drafter for ``draft_model``: token-level when it shares the target's tokenizer, else
    the text bridge (ConfigError when the two cannot be bridged). ``vocab_ids``: a reduced draft
    vocabulary for the token-level drafter (see :class:`DraftModelDrafter`)."""
    for name in ("forward", "new_cache", "vocab_size", "max_context"):
        if not hasattr(draft_model, name):
            raise ConfigError(
                f"the draft model must be a model path or a loaded genrefine model "
                f"(genrefine.models.loading.load_model), got {type(draft_model).__name__}"
            )
    if same_tokenizer(target_model, draft_model, target_tokenizer, draft_tokenizer):
        return DraftModelDrafter(draft_model, target_model.vocab_size, confidence, vocab_ids)
    if target_tokenizer is None or draft_tokenizer is None:
        check_bridgeable(target_tokenizer, draft_tokenizer)  # raises: a tokenizer is missing
    return TextBridgeDrafter(
        draft_model, target_tokenizer, draft_tokenizer, target_model.vocab_size, confidence
    )


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    d, budget = draft_model_drafter(model, opts, tokenizer)
    return Method("sps", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def draft_model_drafter(model, opts: MethodOptions, tokenizer=None):
    """``(drafter, budget)``: sps's drafter over ``opts.draft_model`` (also pcg's, when given)."""
    from .parts.draft_runner import DEFAULT_CONFIDENCE

    draft, draft_tok = load_draft_model(model, opts)
    conf = DEFAULT_CONFIDENCE if opts.draft_confidence is None else opts.draft_confidence
    ids = None  # a reduced head, as for self-drafting: a small draft model's head is most of it
    if hasattr(draft, "reduced_head") and same_tokenizer(model, draft, tokenizer, draft_tok):
        ids = reduced_vocab(model, opts, tokenizer, default=True)
    d = make_draft_model_drafter(model, draft, tokenizer, draft_tok, confidence=conf, vocab_ids=ids)
    if opts.draft_confidence is None and isinstance(d, DraftModelDrafter):
        d.with_adaptive_stop(target_costs(model))  # draft lengths from costs, not a threshold
    return d, opts.draft_len or 8


def load_draft_model(model, opts: MethodOptions):
    """``(draft model, its tokenizer or None)`` from ``opts.draft_model``: a path is loaded with
    the target's dtype and device; a loaded model comes with ``opts.draft_tokenizer``."""
    spec = opts.draft_model
    if spec is None:
        raise ConfigError(
            "method sps needs a draft model: pass --draft-model PATH (a smaller model, best with "
            "the target's tokenizer; `genrefine draft-model shrink` makes one from the target)"
        )
    if isinstance(spec, (str, os.PathLike)):
        from ..models.loading import load_model

        backend = getattr(model, "backend", "native")  # llama.cpp targets draft on llama.cpp too
        draft, tok = load_model(spec, dtype=model.dtype, device=model.device, backend=backend)
        wrap = getattr(model, "wrap_draft", None)
        if wrap is not None:
            # a target that is a view of its base (GuidedModel: logits cut to the codes) sees a
            # draft of the same family through the same view, so their ids mean the same
            return wrap(draft), None
        return draft, tok
    return spec, opts.draft_tokenizer


SPEC = MethodSpec(
    name="sps", lossless=True, build=build, needs_draft_model=True, order=7,
    summary="speculative sampling with an independent draft model (--draft-model; a "
    "different tokenizer is bridged through text)",
)
