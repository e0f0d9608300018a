"""The types every method is made of, below the method modules.

* the drafter interface, the generation half of a step: :class:`Context` (what a drafter sees),
  :class:`Drafter` (``propose(ctx, budget) -> Draft``, ``observe(ctx, feedback)``, ``reset()``),
  :class:`StepFeedback` (what became of a draft);
* :class:`Policy`: which drafter drafts a step, and how many nodes it may draft
  (:class:`FixedPolicy` here; ``auto``'s cost model in :mod:`genrefine.methods.auto`). How many
  of the drafted nodes are then verified is a drafter's own draft-size control
  (:class:`~genrefine.methods.parts.draft_size.DraftSizer`);
* :class:`MethodOptions` (the knobs), :class:`Method` (a ready-to-run preset) and
  :class:`MethodSpec` (what the registry knows of a method, declared by each method module).

Nothing here imports a method module or the registry (:mod:`genrefine.registry`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.runtime import EXACT_ROWS_MAX
from ..types import Draft, SamplingParams, VerifyResult

# The most draft nodes one step verifies, whatever the method asks: the root plus the draft must
# fit the forwards that stay bitwise exact (models/runtime.py: one-token decoding's arithmetic
# for every row). Every draft is cut here, in engine.Decoder.propose, the one place drafts enter a
# forward; MethodOptions.draft_len is validated against it.
MAX_DRAFT_NODES = EXACT_ROWS_MAX - 1


@dataclass
class Context:
    """What a drafter may look at when it proposes.

    ``tokens`` holds the prompt and every token decided so far; its last element is the root of
    the next draft (decided, but not yet in the target's cache).

    ``cache`` is the target's cache holding the committed prefix (``tokens[:-1]``), for drafters
    that run the target model itself (layer skipping, early exit). During :meth:`Drafter.propose`
    a drafter may append to it but must roll back everything it appended before returning; it
    must not touch it in :meth:`Drafter.observe`. None outside the engine.

    ``hidden`` holds the target's final hidden states (after the last norm) of the committed
    prefix, one row per cache slot (``[L - 1, hidden]``), for drafters that set
    ``wants_hidden = True`` (prediction heads, feature-level drafters); the row of the token
    before the root is the one that predicted the root. None for other drafters.

    ``params`` and ``generator`` are the generation's sampling parameters and its random
    generator (on the target's device), for drafters that sample their draft from ``q`` and return
    ``Draft.probs`` (an independent draft model); deterministic drafters ignore them. None outside
    the engine means greedy.
    """

    tokens: Tensor  # [L] long
    prompt_len: int  # how many of ``tokens`` came from the prompt
    cache: object | None = None  # the target's KVCache, cache.length == L - 1
    params: SamplingParams | None = None
    generator: torch.Generator | None = None
    hidden: Tensor | None = None  # [L - 1, hidden] when the drafter wants_hidden


@dataclass
class StepFeedback:
    """What happened to a draft, passed to :meth:`Drafter.observe`."""

    draft: Draft
    result: VerifyResult
    target_argmax: Tensor  # [n + 1] long: the target's argmax after the root and each draft node
    # [n + 1, V] float32: the verification forward's logits (unprocessed), row i + 1 after node
    # i, for drafters that reuse the target's distributions (speculative Jacobi decoding)
    logits: Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """Proposes a draft tree of at most ``budget`` nodes (``budget >= 1``).

    A drafter may set ``wants_hidden = True``: the engine then asks every target forward for
    its final hidden states and passes those of the committed prefix as ``Context.hidden``.
    """

    name: str

    def propose(self, ctx: Context, budget: int) -> Draft: ...

    def observe(self, ctx: Context, feedback: StepFeedback) -> None: ...

    def reset(self) -> None:
        """Forget per-sequence state before a new generation."""
        ...


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by the methods; None means the method's default."""

    draft_len: int | None = None  # largest draft (nodes) per step
    max_ngram: int = 3  # prompt lookup: longest n-gram matched
    jacobi_block: int = 8
    lookahead: tuple[int, int, int] = (6, 4, 3)  # window W, n-gram size N, pool guesses G
    acceptance: str = "exact"  # "exact" (lossless speculative sampling) | "typical" (lossy)
    datastore: str | None = None  # rest: saved datastore path; None = earlier outputs only
    exit_layer: int | None = None  # early-exit-draft: layers the draft runs (None: L - L // 6)
    # self-drafting heads and sps's draft model: the N most frequent tokens (N >= vocabulary
    # size: all); None = the default (early-exit-draft, swift and sps with a native draft model
    # sharing the tokenizer: 32768 for vocabularies over 65536 tokens; calm: all)
    draft_vocab: int | None = None
    # self-drafting and sps: stop a draft after a token whose top draft probability is below this
    # (None: an adaptive length from calibrated draft probabilities and measured costs,
    # policy.DraftStop, for early-exit-draft, swift and sps with the target's tokenizer; 0.4 for
    # sps bridged through text)
    draft_confidence: float | None = None
    calm_threshold: float = 0.9  # calm (lossy): exit when the top probability exceeds this
    # sps: the draft model, a path (loaded like the target, same dtype and device) or a loaded
    # model (genrefine.models.loading.load_model); draft_tokenizer: a loaded model's tokenizer
    # (None: taken to be the target's, which needs equal vocabulary sizes)
    draft_model: object = None
    draft_tokenizer: object = None
    # bpd, medusa, bpd+ngram, bpd+lm, eagle: a trained drafter's folder (`genrefine train`);
    # None: the one shipped for this model, if any
    drafter: str | None = None
    # the same: cut each draft to the nodes that pay on this machine (policy.TreeCut); False
    # verifies whole drafts (the block-efficiency comparison of the papers)
    tree_cut: bool = True
    # lantern and gsd (lossy): the total-variation budget per token of relaxed acceptance
    # (verify/relaxed.py); lantern: at most this many latent neighbours; gsd: the target's top
    # group_size tokens whose latent cosine similarity to the drafted one is >= group_similarity
    relax_delta: float = 0.1
    relax_k: int = 8
    group_size: int = 8
    group_similarity: float = 0.5
    # vadusa (lossy): under sampling a drafted token is accepted when it is among the target's
    # top-`tolerance` tokens at its position (verify/tolerance.py); 1 accepts the argmax only
    tolerance: int = 3

    def __post_init__(self) -> None:
        if self.draft_len is not None and not 1 <= self.draft_len <= MAX_DRAFT_NODES:
            raise ConfigError(
                f"--draft-len must be between 1 and {MAX_DRAFT_NODES}, got {self.draft_len}"
            )
        if self.acceptance not in ("exact", "typical"):
            raise ConfigError("acceptance must be 'exact' (lossless) or 'typical' (lossy)")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ConfigError(f"--exit-layer must be >= 1, got {self.exit_layer}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ConfigError(
                f"--draft-vocab must be >= 1 token (or unset: all), got {self.draft_vocab}"
            )
        if self.draft_confidence is not None and not 0.0 <= self.draft_confidence <= 1.0:
            raise ConfigError(
                f"the draft confidence must be in [0, 1], got {self.draft_confidence}"
            )
        if isinstance(self.draft_model, (str, os.PathLike)) and not str(self.draft_model):
            raise ConfigError("--draft-model is empty: give a model directory or .gguf file")
        if not 0.0 <= self.relax_delta <= 1.0:
            raise ConfigError(f"the relaxation budget delta must be in [0, 1], got {self.relax_delta}")
        if self.relax_k < 1:
            raise ConfigError(f"lantern's neighbour count k must be >= 1, got {self.relax_k}")
        if self.group_size < 1:
            raise ConfigError(f"gsd's group size must be >= 1, got {self.group_size}")
        if not -1.0 <= self.group_similarity <= 1.0:
            raise ConfigError(
                f"gsd's similarity threshold must be in [-1, 1], got {self.group_similarity}"
            )
        if self.tolerance < 1:
            raise ConfigError(f"vadusa's tolerance (top-k accepted) must be >= 1, got {self.tolerance}")
        if not self.calm_threshold > 0.0:
            raise ConfigError(
                f"--calm-threshold must be > 0 (1.0 never exits early), got {self.calm_threshold}"
            )


# ---------------------------------------------------------------------------- policies
@runtime_checkable
class Policy(Protocol):
    """Chooses, before each step, the drafter and its budget (largest number of draft nodes).

    Optionally ``observe_load(sequences)``: the server's scheduler calls it before each step with
    the number of sequences sharing the step's forward (``auto`` weighs the batch with it)."""

    def reset(self, params: SamplingParams | None = None) -> None:
        """A new generation starts with these sampling parameters (None: greedy)."""

    def choose(self, drafters: list) -> tuple[object | None, int]:
        """``(drafter, budget)`` for the next step; ``(None, 0)`` decodes one token plainly."""
        ...

    def update(self, drafter, drafted: int, accepted: int, draft_seconds: float, tree_info) -> None:
        """What became of the step's draft: ``drafted`` nodes (a tree's ``tree_info``), of
        which ``accepted`` were kept, drafted in ``draft_seconds``."""


class FixedPolicy:
    """Always the one drafter with the same budget."""

    def __init__(self, drafter, budget: int) -> None:
        self.drafter, self.budget = drafter, budget

    def reset(self, params=None) -> None:
        pass

    def choose(self, drafters):
        return self.drafter, self.budget

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        pass


@dataclass
class Method:
    """A ready-to-run preset: drafters, policy, acceptance rule."""

    name: str
    drafters: list = field(default_factory=list)
    policy: object = None
    max_budget: int = 0
    acceptance: str = "exact"
    # A decoding loop of its own instead of draft-and-verify (calm): called as
    # decode(model, prompt [L] long, max_new_tokens, params, eos_ids, stats), it yields lists of
    # new token ids and returns the finish reason ("stop" | "length").
    decode: Callable | None = None
    # Relaxed acceptance (lantern, gsd; lossy): a verify.relaxed.RelaxedAcceptance used instead
    # of the exact rule when sampling (greedy verification stays argmax)
    relax: object | None = None
    # A sampling verifier of the method's own (pcg: group-level speculative sampling; vadusa:
    # tolerance on trees; lossy): called as verify_sampled(draft, target_probs [n + 1, V],
    # generator) -> VerifyResult instead of the exact rule when sampling (greedy stays argmax)
    verify_sampled: Callable | None = None


@dataclass(frozen=True)
class MethodSpec:
    """What the registry (:mod:`genrefine.registry`) knows of a method, declared once as ``SPEC``
    in the method's own module."""

    name: str
    lossless: bool  # greedy output equals plain greedy decoding, samples have the target's law
    summary: str  # one line for `genrefine methods`
    build: Callable  # (model, MethodOptions, tokenizer or None) -> Method
    order: int  # place in listings (the README's table order)
    native_only: bool = False  # runs layer subsets / reduced heads: not on the transformers adapter
    needs_draft_model: bool = False  # MethodOptions.draft_model must be given (sps)
    uses_draft_model: bool = False  # drafts with MethodOptions.draft_model when given (pcg)
    # a trained drafter of this kind is needed: MethodOptions.drafter, or one shipped for the model
    drafter_kind: str | None = None
    # reads model.token_latents (an image model's VQ codebook): lantern, gsd
    needs_latents: bool = False

    @property
    def native_reason(self) -> str:
        """Why a ``native_only`` method cannot run on a backend that runs the whole model only."""
        if self.drafter_kind is not None:
            return "its trained drafter reads the target's own weights and hidden states"
        return "it runs a subset of the target's layers"
