"""Prompt lookup decoding (PLD, also LLMA): draft by copying what followed an earlier occurrence.

The last ``n`` tokens of the context (the *suffix*, ``max_ngram >= n >= min_ngram``, largest
first) are looked up among earlier positions of the same context (prompt and generated text). Each
earlier occurrence is a *match*; the tokens that followed it are its *continuation*. The first
``n`` that has any match wins.

One match gives a chain. Several matches give a tree: their continuations are merged into a trie
(common prefixes shared) and the ``budget`` most promising trie nodes are kept, where a node's
score is ``count * depth_decay ** depth`` (``count`` = how many of the matches pass through it).
Ties go to the most recent match, then to the shallower node. Because a child never scores higher
than its parent, the kept nodes always include their ancestors. Children are emitted in order of
frequency, then recency (depth-first), so the first path of the draft, its *main chain*, is the
most frequent continuation and, among equally frequent ones, the most recent.

Everything here is deterministic (``Draft.probs is None``). The search runs on an incremental
index (n-gram -> end positions) that only looks at tokens appended since the previous call, so a
``propose`` at a context of thousands of tokens costs tens of microseconds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, FixedPolicy, Method, MethodOptions, MethodSpec, StepFeedback
from .parts.draft_size import chain_cut_for
from .parts.ngram_index import (
    ChainCutState,
    NgramIndex,
    check_ngrams,
    continuation_draft,
)


class PromptLookupDrafter:
    """Drafts by prompt lookup (see the module docstring).

    ``tree=False`` drafts only the main chain (for models that verify chains only). ``cut``, a
    :class:`~genrefine.methods.parts.draft_size.ChainCut`, then decides how many of its tokens pay to verify, from
    the features :class:`ChainCutState` gives each token.
    """

    name = "pld"

    def __init__(
        self,
        max_ngram: int = 3,
        min_ngram: int = 1,
        max_candidates: int = 8,
        tree: bool = True,
        depth_decay: float = 0.8,
        cut=None,
    ) -> None:
        check_ngrams(max_ngram, min_ngram)
        if max_candidates < 1:
            raise ConfigError(f"max_candidates must be >= 1, got {max_candidates}")
        if not (0.0 < depth_decay <= 1.0):
            raise ConfigError(f"depth_decay must be in (0, 1], got {depth_decay}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_candidates = max_candidates
        self.tree = tree
        self.depth_decay = depth_decay
        self._index = NgramIndex(max_ngram, min_ngram)
        self._seen: Tensor | None = None  # [len(index)] the tokens indexed, on their device
        self._chains = ChainCutState(cut if not tree else None)

    def reset(self) -> None:
        """Forget the indexed context."""
        self._index.clear()
        self._seen = None
        self._chains.reset()

    def _sync(self, tokens: Tensor) -> None:
        """Bring the index up to ``tokens`` [L]: keep the common prefix, index the rest."""
        assert tokens.dim() == 1, tokens.shape
        indexed = len(self._index)
        if indexed and self._seen is not None:
            m = min(indexed, tokens.shape[0])
            a, b = self._seen[:m], tokens[:m]
            if a.device != b.device:
                a = a.to(b.device)
            if not torch.equal(a, b):
                m = int((a != b).nonzero()[0, 0])
            self._index.truncate(m)
        else:
            self._index.clear()
        if tokens.shape[0] > len(self._index):
            self._index.extend(tokens[len(self._index) :].tolist())
        self._seen = tokens.clone()

    def propose(self, ctx: Context, budget: int) -> Draft:
        """A chain or tree of at most ``budget`` nodes copied from earlier context, or empty."""
        self._sync(ctx.tokens)
        m, conts = self._index.match(budget, self.max_candidates)
        draft = continuation_draft(conts, budget, self.depth_decay, chain=not self.tree)
        return self._chains.cut(ctx, draft, m, conts)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """Tell the chain cut what was accepted (the next ``propose`` indexes the new tokens)."""
        self._chains.observe(feedback)


def make_pld_drafter(model, opts: MethodOptions, **kw):

    return PromptLookupDrafter(max_ngram=opts.max_ngram, tree=model.supports_trees, **kw)


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    budget = opts.draft_len or 10
    d = make_pld_drafter(model, opts, cut=chain_cut_for(model, opts))
    return Method("pld", [d], FixedPolicy(d, budget), budget, opts.acceptance)


SPEC = MethodSpec(
    "pld", True, "prompt lookup: continue the last n-gram's earlier matches (tree)", build, order=1
)
