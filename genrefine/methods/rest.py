"""Retrieval drafting (REST) and suffix decoding: continue the context's longest suffix found in a
datastore of token sequences.

Terms. A *datastore* holds *documents* (token sequences) concatenated into one int32 array, each
followed by the separator ``SEP = -1``::

    tokens = doc_0 SEP doc_1 SEP ... doc_{D-1} SEP      # [N] int32

Its *suffix array* ``sa`` lists the positions of the non-separator tokens sorted by the suffix that
starts there, separators ranking below every token. The suffixes that start with a *pattern*
``P`` (``m`` tokens, never a separator) then form one contiguous range of ``sa``, found by two
binary searches. An *occurrence* of ``P`` is a position where ``P`` starts and is followed by at
least one more token of the same document; its *continuation* is what follows, up to the next
separator (so a continuation never runs into another document) and at most ``max_len`` tokens.

Proposing. For the context's last ``m`` tokens, ``max_match >= m >= min_match``, the longest
``m`` with an occurrence wins; ``m`` is bisected rather than scanned, which finds the same ``m``
because whenever the last ``m`` tokens occur so do the last ``m - 1``. Up to ``max_candidates`` of
its occurrences are taken evenly spaced along the range; the range is sorted by continuation, so
the sample keeps each continuation's share and the counts of the trie that
:func:`~genrefine.methods.parts.ngram_index.continuation_tree` builds are frequency estimates. The
best ``budget`` trie nodes form the draft (``probs is None``: the drafter is deterministic).

Suffix decoding. The drafter also searches the current context (prompt and output so far; the
per-request tree of SuffixDecoding, exact like prompt lookup but with the longest-match rule
above), and with ``grow=True`` it remembers each finished generation (prompt and output) as a
document of a second, in-memory datastore, so repeated or similar requests draft well without any
corpus. That store's suffix array is rebuilt when a generation is committed (at
the next ``reset()``), in time about linear in its size; the store is capped at
``max_grow_tokens`` (default 2**20; the oldest documents are dropped first), so a commit never
costs much more than a rebuild of that many tokens.

Files (:meth:`Datastore.save`) are safetensors, never pickle: tensors ``tokens`` ([N] int32, as
above) and ``suffix_array`` ([M] int32, int64 past 2**31 entries); string metadata ``format``
("genrefine-datastore"), ``version`` ("1"), ``tokenizer`` (the model's display name, as
``model.name``), ``vocab_size`` (``len(tokenizer)``), ``documents`` and ``tokens`` (counts).

A lookup costs O(m log N) per probed ``m`` (about four probes), so it grows only with the
logarithm of the store's size. Build sizes: see
:func:`~genrefine.methods.parts.datastore.build_datastore`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, FixedPolicy, Method, MethodOptions, MethodSpec, StepFeedback
from .parts.datastore import Datastore, context_lookup
from .parts.draft_size import chain_cut_for
from .parts.ngram_index import ChainCutState, continuation_draft


# ---------------------------------------------------------------------------- drafter
class RetrievalDrafter:
    """Drafts the continuations of the context's longest suffix found in up to three sources:
    the context itself (``context``: the prompt and the output so far, like suffix decoding's
    per-request tree), earlier generations (``grow``) and a ``datastore`` (see the module
    docstring).

    The longest match wins; at equal lengths the continuations of all the sources that match are
    pooled (the context's first, so they win ties in the tree). ``tree=False`` drafts the main
    chain only; ``cut`` (a :class:`~genrefine.methods.parts.draft_size.ChainCut`) then keeps the part of it that
    pays to verify, from the features :class:`~.prompt_lookup.ChainCutState` gives each token
    (match length capped at 6).
    """

    name = "rest"

    def __init__(
        self,
        datastore: Datastore | None = None,
        grow: bool = True,
        context: bool = True,
        max_match: int = 16,
        min_match: int = 2,
        max_candidates: int = 64,
        tree: bool = True,
        depth_decay: float = 0.8,
        max_grow_tokens: int = 1 << 20,
        cut=None,
    ) -> None:
        if min_match < 1:
            raise ConfigError(f"min_match must be >= 1, got {min_match}")
        if max_match < min_match:
            raise ConfigError(f"max_match must be >= min_match, got {max_match} < {min_match}")
        if max_candidates < 1:
            raise ConfigError(f"max_candidates must be >= 1, got {max_candidates}")
        if not (0.0 < depth_decay <= 1.0):
            raise ConfigError(f"depth_decay must be in (0, 1], got {depth_decay}")
        if max_grow_tokens < 1:
            raise ConfigError(f"max_grow_tokens must be >= 1, got {max_grow_tokens}")
        self.datastore = datastore
        self.grow = grow
        self.context = context
        self.max_match, self.min_match = max_match, min_match
        self.max_candidates = max_candidates
        self.tree = tree
        self.depth_decay = depth_decay
        self.max_grow_tokens = max_grow_tokens
        self.grown: Datastore | None = None  # earlier generations, one document each
        self._grown_docs: list[np.ndarray] = []
        self._current: Tensor | None = None  # [L] the current generation's tokens so far
        self._chains = ChainCutState(cut if not tree else None, match_cap=6)
        self.last_match = 0  # the match length of the last candidates() call

    # ---------------------------------------------------------------- growing
    def add_document(self, tokens: Sequence[int] | Tensor) -> None:
        """Remember a token sequence for later drafts (rebuilds the grown store's index)."""
        if isinstance(tokens, Tensor):
            tokens = tokens.reshape(-1).tolist()
        doc = np.asarray(tokens, dtype=np.int32)
        if doc.size == 0:
            return
        self._grown_docs.append(doc[-self.max_grow_tokens :])
        total = sum(d.size for d in self._grown_docs)
        while total > self.max_grow_tokens:
            total -= self._grown_docs.pop(0).size
        self.grown = Datastore.from_documents(self._grown_docs)

    def reset(self) -> None:
        """Start a new generation; with ``grow``, first remember the one that just ended."""
        if self.grow and self._current is not None:
            self.add_document(self._current)
        self._current = None
        self._chains.reset()

    # ---------------------------------------------------------------- drafting
    def candidates(self, tokens: Sequence[int] | np.ndarray, max_len: int) -> list[list[int]]:
        """Continuations of the longest suffix of ``tokens`` [L] (the context) that a source
        holds; at equal lengths the current context's come first, then earlier outputs', then the
        datastore's."""
        tokens = np.asarray(tokens)
        best_m, found = 0, []
        if self.context:
            best_m, found = context_lookup(
                tokens, max_len, self.max_candidates, self.max_match, self.min_match
            )
        tail = tokens[-self.max_match :].tolist()
        for store in (self.grown, self.datastore):
            if store is None or store.num_tokens == 0:
                continue
            m, lo, hi = store.longest_match(tail, self.max_match, max(self.min_match, best_m))
            if m == 0:
                continue
            conts = store.continuations(m, lo, hi, max_len, self.max_candidates)
            if m > best_m:
                best_m, found = m, conts
            else:
                found = found + conts
        self.last_match = best_m
        return found

    def propose(self, ctx: Context, budget: int) -> Draft:
        """A tree (or chain) of at most ``budget`` retrieved nodes, or an empty draft."""
        assert ctx.tokens.dim() == 1, ctx.tokens.shape
        tokens = ctx.tokens.detach().cpu()
        if self.grow:
            self._current = tokens.clone()
        self.last_match = 0
        conts = self.candidates(tokens.numpy(), budget) if budget > 0 else []
        draft = continuation_draft(conts, budget, self.depth_decay, chain=not self.tree)
        return self._chains.cut(ctx, draft, self.last_match, conts)

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        """Keep the context plus the tokens this step emitted (for ``grow``); tell the chain cut
        what was accepted."""
        self._chains.observe(feedback)
        if self.grow:
            self._current = torch.cat([ctx.tokens.cpu(), feedback.result.tokens.cpu()])


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .parts.datastore import Datastore

    store = None
    if opts.datastore is not None:
        store = Datastore.load(opts.datastore, getattr(model, "name", None), model.vocab_size)
    budget = opts.draft_len or 16
    d = RetrievalDrafter(
        store, grow=True, tree=model.supports_trees, cut=chain_cut_for(model, opts)
    )
    return Method("rest", [d], FixedPolicy(d, budget), budget, opts.acceptance)


SPEC = MethodSpec(
    name="rest", lossless=True, build=build, order=2,
    summary="retrieval: continuations of the longest context suffix found in a datastore "
    "(REST) or in earlier outputs (suffix decoding)",
)
