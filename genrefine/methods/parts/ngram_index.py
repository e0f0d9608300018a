"""An incremental n-gram index over the context, and the trees built from its matches.

:class:`NgramIndex` finds the earlier occurrences of the context's longest suffix of
``min_ngram..max_ngram`` tokens and their continuations (used by prompt lookup and suffix
decoding); :func:`continuation_tree` merges continuations into a draft tree, most frequent and
most recent first; :class:`ChainCutState` is a copying drafter's use of a
:class:`~genrefine.methods.parts.draft_size.ChainCut` on chain-only backends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ...errors import ConfigError
from ...types import Draft
from ..base import Context, StepFeedback


def check_ngrams(max_ngram: int, min_ngram: int) -> None:
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
        check_ngrams(max_ngram, min_ngram)
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
    """A copying drafter's use of a :class:`~genrefine.methods.parts.draft_size.ChainCut` (None: no cut).

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
