"""The drafter interface: the generation half of a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..types import Draft, SamplingParams, VerifyResult


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
