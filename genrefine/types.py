"""The data that flows between the halves of a generation-refinement step.

Terms (defined once, used everywhere):

* ``p`` is the target model's distribution, ``q`` the drafter's.
* A *draft* is a flattened token tree. Node ``i`` has token ``tokens[i]`` and parent
  ``parents[i]``; ``-1`` means "child of the root", the root being the last token already
  decided (it is fed to the target together with the draft but is not itself a draft node).
  A chain is a tree with ``parents = [-1, 0, 1, ...]``. Nodes are in topological order:
  ``parents[i] < i``.
* Verification feeds ``[root] + draft.tokens`` to the target, so the target's logits have
  ``n + 1`` rows: row ``0`` predicts the children of the root, row ``i + 1`` the children of node
  ``i``.
* *accepted*: draft nodes that passed verification (a root-to-node path). *bonus*: the one token
  the target adds after them (sampled from ``p`` or a residual of it). Every step therefore emits
  ``num_accepted + 1`` tokens; this is *tokens per step*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ConfigError

# temperatures below this decode greedily (as in vLLM); the sampler never divides by them
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for one step."""

    tokens: Tensor  # [n] long, draft token ids
    parents: Tensor  # [n] long, parent node index of each node, -1 for children of the root
    # [n, vocab] float, q(. | path to parent(i)): the distribution node i was drawn from.
    # Siblings drawn from the same distribution share identical rows. None for deterministic
    # drafters (prompt lookup, retrieval, greedy drafts): treated as a point mass on the token.
    probs: Tensor | None = None

    def __post_init__(self) -> None:
        assert self.tokens.dim() == 1 and self.parents.shape == self.tokens.shape, (
            self.tokens.shape,
            self.parents.shape,
        )
        if self.probs is not None:
            assert self.probs.dim() == 2 and self.probs.shape[0] == self.tokens.shape[0]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_chain(self) -> bool:
        n = len(self)
        return bool(
            torch.equal(self.parents, torch.arange(-1, n - 1, dtype=self.parents.dtype))
        )

    @staticmethod
    def chain(tokens: Tensor | list[int], probs: Tensor | None = None) -> "Draft":
        """A linear draft: each token is the child of the one before it."""
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return Draft(t, torch.arange(-1, t.numel() - 1, dtype=torch.long), probs)

    @staticmethod
    def empty() -> "Draft":
        z = torch.zeros(0, dtype=torch.long)
        return Draft(z, z.clone(), None)

    def prefix(self, n: int) -> "Draft":
        """The first ``n`` nodes (a valid tree: parents precede children)."""
        probs = None if self.probs is None else self.probs[:n]
        return Draft(self.tokens[:n], self.parents[:n], probs)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of refining one draft."""

    path: Tensor  # [a] long, indices of accepted draft nodes, root to leaf
    tokens: Tensor  # [a + 1] long, accepted draft tokens followed by the bonus token

    @property
    def num_accepted(self) -> int:
        return int(self.path.shape[0])


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the target's logits.

    ``temperature == 0`` means greedy (argmax); top-k and top-p then do nothing. So does any
    positive temperature below :data:`GREEDY_BELOW`: logits divided by it can overflow to inf
    (sampling would then fail), and its distribution differs from the argmax only between
    near-tied logits. ``top_k == 0`` and ``top_p == 1.0`` disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ConfigError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top-p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(
                f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {self.seed}"
            )

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or a positive one below :data:`GREEDY_BELOW`."""
        return self.temperature < GREEDY_BELOW


@dataclass
class ModelOutput:
    """What a model forward returns."""

    logits: Tensor | None  # [m, vocab or len(vocab_subset)] float32, for the requested rows
    # layer index -> [n, hidden]: the residual stream after that many layers (0 = embeddings);
    # index num_layers is the final hidden state after the last norm.
    hidden: dict[int, Tensor] = field(default_factory=dict)
