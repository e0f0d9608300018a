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

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, StepFeedback


def _check_ngrams(max_ngram: int, min_ngram: int) -> None:
    if min_ngram < 1:
        raise ConfigError(f"min_ngram must be >= 1, got {min_ngram}")
    if max_ngram < min_ngram:
        raise ConfigError(
            f"max_ngram must be >= min_ngram, got max_ngram={max_ngram} < min_ngram={min_ngram}"
        )


class NgramIndex:
    """Every n-gram (``min_ngram <= n <= max_ngram``) of a token list -> its end positions.

    ``extend`` indexes appended tokens, ``truncate`` forgets a tail; both cost time proportional
    to the tokens they touch, not to the length of the list.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        _check_ngrams(max_ngram, min_ngram)
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.tokens: list[int] = []
        # n-gram -> ascending end positions e (the n-gram is tokens[e - n + 1 : e + 1])
        self._ends: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def clear(self) -> None:
        self.tokens = []
        self._ends = {}

    def extend(self, new_tokens: Iterable[int]) -> None:
        """Append tokens and index the n-grams that end at each of them."""
        toks, ends = self.tokens, self._ends
        lo, hi = self.min_ngram, self.max_ngram
        for t in new_tokens:
            toks.append(int(t))
            e = len(toks) - 1
            for n in range(lo, min(hi, e + 1) + 1):
                key = tuple(toks[e - n + 1 : e + 1])
                lst = ends.get(key)
                if lst is None:
                    ends[key] = [e]
                else:
                    lst.append(e)

    def truncate(self, length: int) -> None:
        """Forget every token from position ``length`` on."""
        toks, ends = self.tokens, self._ends
        if length >= len(toks):
            return
        if length <= len(toks) // 2:  # cheaper to rebuild what is left
            keep = toks[:length]
            self.clear()
            self.extend(keep)
            return
        lo, hi = self.min_ngram, self.max_ngram
        for e in range(len(toks) - 1, length - 1, -1):
            for n in range(lo, min(hi, e + 1) + 1):
                key = tuple(toks[e - n + 1 : e + 1])
                lst = ends[key]
                lst.pop()  # e is the largest end still indexed, so it is the last entry
                if not lst:
                    del ends[key]
        del toks[length:]

    def match_ends(self, max_candidates: int) -> tuple[int, list[int]]:
        """``(n, ends)``: the longest suffix n-gram that occurred before, and where.

        ``ends`` are the end positions of its earlier occurrences, most recent first, at most
        ``max_candidates``; the suffix itself is not one of them. ``(0, [])`` when nothing matches.
        """
        toks, ends = self.tokens, self._ends
        length = len(toks)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            lst = ends.get(tuple(toks[length - n :]))
            if lst is None or len(lst) < 2:  # lst[-1] is the suffix itself
                continue
            stop = max(len(lst) - 1 - max_candidates, 0) - 1
            return n, [lst[i] for i in range(len(lst) - 2, stop, -1)]
        return 0, []

    def match(self, max_len: int, max_candidates: int) -> tuple[int, list[list[int]]]:
        """``(n, continuations)``: the matched suffix length and the continuations (up to
        ``max_len`` tokens each) of its earlier occurrences, most recent first."""
        n, ends = self.match_ends(max_candidates)
        toks = self.tokens
        return n, [toks[e + 1 : e + 1 + max_len] for e in ends]

    def candidates(self, max_len: int, max_candidates: int) -> list[list[int]]:
        """Continuations (up to ``max_len`` tokens each) of the best matches, most recent first."""
        return self.match(max_len, max_candidates)[1]


def find_candidates(
    tokens: Sequence[int] | Tensor,
    max_ngram: int = 3,
    min_ngram: int = 1,
    max_len: int = 8,
    max_candidates: int = 8,
) -> list[list[int]]:
    """Continuations of the earlier occurrences of the context's longest matching suffix.

    tokens: [L] token ids. Tries ``n = max_ngram`` down to ``min_ngram``; for the first ``n``
    whose last-``n``-token suffix also ends at an earlier position ``e < L - 1``, returns
    ``tokens[e + 1 : e + 1 + max_len]`` for each such ``e``, largest ``e`` (most recent) first, at
    most ``max_candidates`` of them (equal continuations are kept: their count is a frequency).
    Returns ``[]`` when no ``n`` matches.
    """
    if isinstance(tokens, Tensor):
        assert tokens.dim() == 1, tokens.shape
        tokens = tokens.tolist()
    index = NgramIndex(max_ngram, min_ngram)
    index.extend(tokens)
    return index.candidates(max_len, max_candidates)


def continuation_tree(
    continuations: Sequence[Sequence[int]],
    budget: int,
    depth_decay: float = 0.8,
    chain: bool = False,
) -> tuple[list[int], list[int]]:
    """Merge continuations into a draft tree of at most ``budget`` nodes: ``(tokens, parents)``.

    ``continuations`` are ordered most recent first. Builds the trie of the continuations, scores
    each node ``count * depth_decay ** depth`` and keeps the ``budget`` best (ties: most recent,
    then shallower), which is a subtree because no child outscores its parent. Nodes come out in
    depth-first order, children by frequency then recency, so ``parents[i] < i`` and the first
    path is the main chain. ``chain=True`` keeps only the main chain (up to ``budget`` tokens).
    """
    if budget <= 0 or not continuations:
        return [], []
    tok: list[int] = [-1]  # trie node 0 is the root
    par: list[int] = [-1]
    cnt: list[int] = [0]
    first: list[int] = [0]  # index of the most recent continuation through the node
    depth: list[int] = [0]
    kids: list[dict[int, int]] = [{}]
    for ci, cont in enumerate(continuations):
        cur = 0
        for t in cont[:budget]:
            nxt = kids[cur].get(t)
            if nxt is None:
                nxt = len(tok)
                tok.append(t)
                par.append(cur)
                cnt.append(0)
                first.append(ci)
                depth.append(depth[cur] + 1)
                kids.append({})
                kids[cur][t] = nxt
            cnt[nxt] += 1
            cur = nxt

    def key(i: int) -> tuple[float, int, int]:
        return (-cnt[i] * depth_decay ** depth[i], first[i], depth[i])

    if chain:
        out_tok: list[int] = []
        cur = 0
        while kids[cur] and len(out_tok) < budget:
            cur = min(kids[cur].values(), key=key)
            out_tok.append(tok[cur])
        return out_tok, list(range(-1, len(out_tok) - 1))

    keep = sorted(range(1, len(tok)), key=key)[:budget]
    children: dict[int, list[int]] = {}
    for i in keep:  # in key order, so each child list is already sorted
        children.setdefault(par[i], []).append(i)
    out_tok, out_par = [], []
    new_index = {0: -1}
    stack = list(reversed(children.get(0, [])))
    while stack:
        i = stack.pop()
        new_index[i] = len(out_tok)
        out_tok.append(tok[i])
        out_par.append(new_index[par[i]])
        stack.extend(reversed(children.get(i, [])))
    return out_tok, out_par


def continuation_draft(
    continuations: list[list[int]], budget: int, depth_decay: float, chain: bool
) -> Draft:
    """:func:`continuation_tree` as a deterministic :class:`Draft` (empty without candidates)."""
    if not continuations:
        return Draft.empty()
    toks, parents = continuation_tree(continuations, budget, depth_decay, chain=chain)
    return Draft(torch.tensor(toks, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


class ChainCutState:
    """A copying drafter's use of a :class:`~genrefine.policy.ChainCut` (None: no cut).

    Describes each chain token by ``(previous draft accepted in full, agreement, match length
    capped at match_cap)``, where agreement says how the continuations that led to the token
    split on it: ``UNIQUE`` (one continuation), ``ALL`` (every one agrees), ``MAJORITY`` (at
    least half) or ``MINORITY``. A sampled generation starts with a fresh cut, so that a seed
    gives the same tokens every time; greedy generations share what earlier ones learnt (their
    output cannot depend on it)."""

    UNIQUE, ALL, MAJORITY, MINORITY = range(4)

    def __init__(self, cut, match_cap: int = 3) -> None:
        self.chain_cut = cut
        self.match_cap = match_cap
        self.reset()

    def reset(self) -> None:
        self._fresh = True
        self._prev_full = False

    @classmethod
    def agreement(cls, chain: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[int]:
        """For each token of ``chain``, how the continuations still on its path split on it."""
        alive, out = list(continuations), []
        for j, t in enumerate(chain):
            before = len(alive)
            alive = [c for c in alive if len(c) > j and c[j] == t]
            if before <= 1:
                out.append(cls.UNIQUE)
            elif len(alive) == before:
                out.append(cls.ALL)
            else:
                out.append(cls.MAJORITY if 2 * len(alive) >= before else cls.MINORITY)
        return out

    def cut(self, ctx: Context, draft: Draft, match_len: int, continuations) -> Draft:
        """``draft`` (a chain made from ``continuations``) cut to the tokens worth verifying."""
        cut = self.chain_cut
        if cut is None:
            return draft
        if self._fresh:
            self._fresh = False
            if ctx.params is not None and not ctx.params.greedy:
                cut.reset()
        prev_full = self._prev_full
        self._prev_full = False  # set again by observe() after a draft accepted in full
        if len(draft) == 0:
            return draft
        m = min(int(match_len), self.match_cap)
        chain = draft.tokens.tolist()
        contexts = [(prev_full, a, m) for a in self.agreement(chain, continuations)]
        kept = cut(contexts)
        return draft if kept == len(chain) else draft.prefix(kept)

    def observe(self, feedback: StepFeedback) -> None:
        if self.chain_cut is None:
            return
        a, n = feedback.result.num_accepted, len(feedback.draft)
        self.chain_cut.observe(a, n)
        self._prev_full = n > 0 and a == n


class PromptLookupDrafter:
    """Drafts by prompt lookup (see the module docstring).

    ``tree=False`` drafts only the main chain (for models that verify chains only). ``cut``, a
    :class:`~genrefine.policy.ChainCut`, then decides how many of its tokens pay to verify, from
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
        _check_ngrams(max_ngram, min_ngram)
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
