"""Prompt lookup: the n-gram search against a naive scan, tree shape, index maintenance."""

from __future__ import annotations


import pytest
import torch

from genrefine.methods.base import Context, Drafter
from genrefine.methods.parts.ngram_index import NgramIndex, continuation_tree
from genrefine.methods.pld import PromptLookupDrafter
from genrefine.errors import ConfigError


def naive_candidates(tokens, max_ngram, min_ngram, max_len, max_candidates):
    """O(L^2) reference: scan every earlier end position for the suffix n-gram."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        ends = [e for e in range(length - 2, n - 2, -1) if tokens[e - n + 1 : e + 1] == suffix]
        if ends:
            return [tokens[e + 1 : e + 1 + max_len] for e in ends[:max_candidates]]
    return []


def random_tokens(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=g).tolist()


def check_tree(tokens: list[int], parents: list[int], budget: int) -> None:
    assert len(tokens) == len(parents) <= budget
    assert all(-1 <= p < i for i, p in enumerate(parents))  # topological
    # siblings carry distinct tokens (common prefixes are merged)
    seen = set()
    for t, p in zip(tokens, parents):
        assert (p, t) not in seen
        seen.add((p, t))


def find_candidates(tokens, max_ngram=3, min_ngram=1, max_len=8, max_candidates=8):
    """The index's candidates for a whole context (what the drafter looks up each step)."""
    index = NgramIndex(max_ngram, min_ngram)
    index.extend(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
    return index.candidates(max_len, max_candidates)


def paths(tokens: list[int], parents: list[int]) -> set[tuple[int, ...]]:
    out = set()
    for i in range(len(tokens)):
        path, j = [], i
        while j != -1:
            path.append(tokens[j])
            j = parents[j]
        out.add(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vocab", [2, 4, 9])
def test_find_candidates_matches_naive(seed: int, vocab: int) -> None:
    tokens = random_tokens(seed, 60 + 7 * seed, vocab)
    for length in range(0, len(tokens) + 1, 3):
        prefix = tokens[:length]
        for max_ngram, min_ngram, max_len, max_cand in [(3, 1, 5, 4), (4, 2, 3, 1), (1, 1, 8, 9)]:
            got = find_candidates(prefix, max_ngram, min_ngram, max_len, max_cand)
            want = naive_candidates(prefix, max_ngram, min_ngram, max_len, max_cand)
            assert got == want, (length, max_ngram, min_ngram)


def test_find_candidates_accepts_tensor() -> None:
    tokens = random_tokens(0, 50, 5)
    assert find_candidates(torch.tensor(tokens), 3, 1, 4, 3) == naive_candidates(tokens, 3, 1, 4, 3)


def test_no_match_gives_empty_draft() -> None:
    d = PromptLookupDrafter()
    assert find_candidates([1, 2, 3, 4, 5], 3, 1, 4, 4) == []
    draft = d.propose(Context(torch.tensor([1, 2, 3, 4, 5]), 2), 8)
    assert len(draft) == 0 and draft.probs is None
    assert len(d.propose(Context(torch.tensor([7]), 1), 8)) == 0
    assert len(d.propose(Context(torch.zeros(0, dtype=torch.long), 0), 8)) == 0


def test_single_match_is_a_chain() -> None:
    tokens = [10, 11, 12, 13, 14, 15, 16, 17, 10, 11, 12]
    d = PromptLookupDrafter(max_ngram=3)
    assert isinstance(d, Drafter) and d.name == "pld"
    draft = d.propose(Context(torch.tensor(tokens), 8), 4)
    assert draft.is_chain and draft.tokens.tolist() == [13, 14, 15, 16] and draft.probs is None
    # the continuation runs to the end of the context at most
    draft = d.propose(Context(torch.tensor(tokens), 8), 100)
    assert draft.tokens.tolist() == [13, 14, 15, 16, 17, 10, 11, 12]


def test_several_continuations_make_a_tree() -> None:
    # suffix [1, 2] occurs three times: followed by 3 4 5, by 3 4 6 and by 7 8
    tokens = [1, 2, 3, 4, 5, 0, 1, 2, 7, 8, 0, 1, 2, 3, 4, 6, 0, 1, 2]
    d = PromptLookupDrafter(max_ngram=2)
    draft = d.propose(Context(torch.tensor(tokens), 4), 64)
    toks, parents = draft.tokens.tolist(), draft.parents.tolist()
    check_tree(toks, parents, 64)
    assert not draft.is_chain
    # the first token 3 is shared by two continuations: most frequent, so it heads the main chain,
    # and within it the most recent continuation (3 4 6) comes first
    assert toks[:3] == [3, 4, 6] and parents[:3] == [-1, 0, 1]
    conts = naive_candidates(tokens, 2, 1, 64, 8)
    want = {tuple(c[:k]) for c in conts for k in range(1, len(c) + 1)}
    assert paths(toks, parents) == want  # budget large enough: the whole trie


@pytest.mark.parametrize("seed", range(5))
def test_tree_respects_budget_and_keeps_ancestors(seed: int) -> None:
    tokens = random_tokens(seed, 300, 3)
    conts = find_candidates(tokens, 2, 1, 16, 8)
    assert len(conts) > 1
    full = {tuple(c[:k]) for c in conts for k in range(1, len(c) + 1)}
    for budget in (1, 2, 3, 5, 8, 16):
        toks, parents = continuation_tree([c[:budget] for c in conts], budget)
        check_tree(toks, parents, budget)
        assert len(toks) == min(budget, len({p for p in full if len(p) <= budget}))
        assert paths(toks, parents) <= full
        # the main chain starts with the most frequent first token (most recent on ties)
        firsts = [c[0] for c in conts]
        best = max(set(firsts), key=lambda t: (firsts.count(t), -firsts.index(t)))
        assert toks[0] == best
        ctoks, cparents = continuation_tree(conts, budget, chain=True)
        assert cparents == list(range(-1, len(ctoks) - 1)) and ctoks[0] == best


def test_chain_mode_drafter() -> None:
    tokens = [1, 2, 3, 4, 5, 0, 1, 2, 7, 8, 0, 1, 2, 3, 4, 6, 0, 1, 2]
    drafter = PromptLookupDrafter(max_ngram=2, tree=False)
    draft = drafter.propose(Context(torch.tensor(tokens), 4), 8)
    # 3 4 is the most frequent start; then 6 (most recent) over 5
    assert draft.is_chain and draft.tokens.tolist() == [3, 4, 6, 0, 1, 2]
    draft = drafter.propose(Context(torch.tensor(tokens), 4), 2)
    assert draft.tokens.tolist() == [3, 4]


def index_state(index: NgramIndex):
    return index.tokens, {k: list(v) for k, v in index._ends.items()}


@pytest.mark.parametrize("seed", range(3))
def test_incremental_index_equals_rebuild(seed: int) -> None:
    tokens = random_tokens(seed, 400, 5)
    index = NgramIndex(3, 1)
    g = torch.Generator().manual_seed(seed)
    pos = 0
    while pos < len(tokens):
        step = int(torch.randint(1, 20, (1,), generator=g))
        index.extend(tokens[pos : pos + step])
        pos += step
        if int(torch.randint(0, 4, (1,), generator=g)) == 0:  # roll back a little
            back = int(torch.randint(1, 10, (1,), generator=g))
            pos = max(pos - back, 0)
            index.truncate(pos)
        fresh = NgramIndex(3, 1)
        fresh.extend(tokens[:pos])
        assert index_state(index) == index_state(fresh)


def test_drafter_follows_appends_shrinks_and_new_prompts() -> None:
    tokens = random_tokens(7, 500, 6)
    d = PromptLookupDrafter(max_ngram=3, max_candidates=4)
    for length in [50, 51, 55, 90, 40, 41, 200, 10, 300, 300]:
        ctx = Context(torch.tensor(tokens[:length]), 10)
        got = d.propose(ctx, 6)
        want = PromptLookupDrafter(max_ngram=3, max_candidates=4).propose(ctx, 6)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
        assert d._index.tokens == tokens[:length]
    # same length, different content (a new prompt without reset)
    other = random_tokens(8, 300, 6)
    d.propose(Context(torch.tensor(other), 10), 6)
    assert d._index.tokens == other
    # an engine that reuses one buffer and writes into it in place
    buf = torch.tensor(tokens[:300])
    d.propose(Context(buf, 10), 6)
    buf[150:] = torch.tensor(other[150:])
    d.propose(Context(buf, 10), 6)
    assert d._index.tokens == tokens[:150] + other[150:]
    d.reset()
    assert len(d._index) == 0


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ConfigError):
        PromptLookupDrafter(min_ngram=0)
    with pytest.raises(ConfigError):
        PromptLookupDrafter(max_candidates=0)
