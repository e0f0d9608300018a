"""Lookahead decoding (Fu et al. 2024) as a drafter (method ``lookahead``).

Each step's draft is one tree with two kinds of branches, verified in one target forward under a
single tree mask:

* the *lookahead branch*: a Jacobi iterate of ``window`` guesses for the next positions (see
  :mod:`genrefine.verify.jacobi`); the target's argmax along it is the next iterate;
* the *verification branches*: up to ``guesses`` n-grams from the pool that start with the root
  token, each a chain of ``ngram - 1`` tokens.

The n-gram pool is fed by the Jacobi trajectory: after every step, each run of ``ngram``
consecutive tokens of the fresh iterate (root first) is recorded under its first token.
Difference from the paper: the paper keeps ``ngram - 1`` past iterates *inside* the forward (a 2D
window) and reads n-grams along its diagonals; here the past iterates stay on the host and the
n-grams are read from the newest iterate, which lets a plain tree mask (the engine's) carry both
branches. Like Jacobi decoding, it needs no draft model and no training; it is lossless because
every token is verified against the target's argmax (greedy) or by speculative sampling.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import ConfigError
from ..types import Draft
from ..verify.jacobi import jacobi_update
from .base import Context, FixedPolicy, Method, MethodOptions, MethodSpec, StepFeedback


class NgramPool:
    """n-grams keyed by their first token; each key keeps its ``per_key`` most recent entries."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, gram: tuple[int, ...]) -> None:
        entries = self._pool.setdefault(gram[0], OrderedDict())
        entries.pop(gram[1:], None)
        entries[gram[1:]] = None  # most recent last
        while len(entries) > self.per_key:
            entries.popitem(last=False)

    def get(self, first: int, k: int) -> list[tuple[int, ...]]:
        """Up to ``k`` continuations after ``first``, most recent first."""
        entries = self._pool.get(first)
        return list(reversed(entries))[:k] if entries else []

    def __len__(self) -> int:
        return sum(len(v) for v in self._pool.values())

    def clear(self) -> None:
        self._pool.clear()


class LookaheadDrafter:
    """Jacobi lookahead branch + n-gram pool verification branches, in one tree."""

    name = "lookahead"

    def __init__(self, window: int = 6, ngram: int = 4, guesses: int = 3) -> None:
        if window < 1 or ngram < 2 or guesses < 0:
            raise ConfigError(
                "lookahead needs window >= 1, ngram >= 2 and guesses >= 0 "
                f"(got window={window}, ngram={ngram}, guesses={guesses})"
            )
        self.window, self.ngram, self.guesses = window, ngram, guesses
        self.pool = NgramPool(per_key=max(guesses, 1) * 2)
        self._iterate: torch.Tensor | None = None  # [window] guesses after the root
        self._at = -1  # context length the iterate belongs to
        self._window_nodes: list[int] = []  # node index of each lookahead-branch token

    @property
    def max_nodes(self) -> int:
        return self.window + self.guesses * (self.ngram - 1)

    def reset(self) -> None:
        self.pool.clear()
        self._iterate = None
        self._at = -1

    def propose(self, ctx: Context, budget: int) -> Draft:
        n_ctx = int(ctx.tokens.shape[0])
        root = int(ctx.tokens[-1])
        if self._iterate is None or self._at != n_ctx:
            # first step, or the context moved without us (another drafter served): restart
            self._iterate = ctx.tokens[-1:].repeat(self.window)
            self._at = n_ctx
        tokens: list[int] = []
        parents: list[int] = []
        # verification branches first: they are the likelier to be accepted
        for gram in self.pool.get(root, self.guesses):
            if len(tokens) + len(gram) > budget:
                break
            for j, t in enumerate(gram):
                parents.append(-1 if j == 0 else len(tokens) - 1)
                tokens.append(t)
        room = min(self.window, budget - len(tokens))
        self._window_nodes = []
        for j in range(room):
            parents.append(-1 if j == 0 else len(tokens) - 1)
            self._window_nodes.append(len(tokens))
            tokens.append(int(self._iterate[j]))
        if not tokens:
            return Draft.empty()
        return Draft(
            torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
        )

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        argmax = feedback.target_argmax.cpu()  # [n + 1]
        root = int(ctx.tokens[-1])
        if not self._window_nodes:
            return
        # the fresh iterate along the lookahead branch: argmax after the root, then after each node
        rows = [0] + [i + 1 for i in self._window_nodes]
        fresh = argmax[rows]  # [w + 1]: guesses for root+1 .. root+w+1
        seq = [root] + fresh.tolist()
        for s in range(len(seq) - self.ngram + 1):
            self.pool.add(tuple(seq[s : s + self.ngram]))
        # carry the iterate past the emitted tokens (emitted = accepted + bonus)
        emitted = feedback.result.num_accepted + 1
        pad = int(feedback.result.tokens[-1])
        self._iterate = jacobi_update(fresh, emitted - 1, self.window, pad)
        self._at = int(ctx.tokens.shape[0]) + emitted


def build(model, opts: MethodOptions, tokenizer=None) -> Method:

    w, n, g = opts.lookahead
    if not model.supports_trees:
        g = 0  # chains only: the lookahead branch alone (Jacobi with an n-gram pool unused)
    d = LookaheadDrafter(window=w, ngram=n, guesses=g)
    budget = min(d.max_nodes, opts.draft_len or d.max_nodes)
    return Method("lookahead", [d], FixedPolicy(d, budget), budget, opts.acceptance)


SPEC = MethodSpec(
    name="lookahead", lossless=True, build=build, order=3,
    summary="lookahead decoding: a Jacobi branch feeds an n-gram pool verified in the same forward",
)
