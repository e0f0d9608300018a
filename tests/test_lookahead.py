"""Lookahead decoding: the n-gram pool, the draft tree it builds, and how it learns from a step."""

from __future__ import annotations

import torch

from genrefine.methods.base import Context, StepFeedback
from genrefine.methods.lookahead import LookaheadDrafter, NgramPool
from genrefine.verify import build_tree, verify_greedy_argmax


def test_pool_keeps_the_most_recent_per_key():
    pool = NgramPool(per_key=2)
    pool.add((5, 1, 2))
    pool.add((5, 3, 4))
    pool.add((5, 1, 2))  # refreshed: now the most recent
    pool.add((7, 9, 9))
    assert pool.get(5, 3) == [(1, 2), (3, 4)]
    pool.add((5, 6, 6))  # evicts the oldest of key 5
    assert pool.get(5, 3) == [(6, 6), (1, 2)]
    assert pool.get(8, 3) == [] and len(pool) == 3


def test_first_step_is_a_jacobi_chain_of_the_root():
    d = LookaheadDrafter(window=4, ngram=3, guesses=2)
    draft = d.propose(Context(torch.tensor([1, 2, 9]), 3), budget=10)
    assert draft.tokens.tolist() == [9, 9, 9, 9]
    assert draft.parents.tolist() == [-1, 0, 1, 2]


def test_pool_branches_and_lookahead_branch_share_one_tree():
    d = LookaheadDrafter(window=3, ngram=3, guesses=2)
    ctx = Context(torch.tensor([4, 9]), 2)
    draft = d.propose(ctx, budget=10)  # [9, 9, 9]
    # the target's argmax after the root and after each lookahead node: iterate [5, 6, 7, 8]
    argmax = torch.tensor([5, 6, 7, 8])
    result = verify_greedy_argmax(draft, argmax)  # nothing accepted, bonus 5
    assert result.tokens.tolist() == [5]
    d.observe(ctx, StepFeedback(draft, result, argmax))
    # n-grams of [root] + iterate = [9, 5, 6, 7, 8]: (9,5,6) (5,6,7) (6,7,8)
    assert d.pool.get(9, 2) == [(5, 6)] and d.pool.get(5, 2) == [(6, 7)]
    ctx2 = Context(torch.tensor([4, 9, 5]), 2)
    draft2 = d.propose(ctx2, budget=10)
    # pool branch (6, 7) after root 5, then the carried iterate [6, 7, 8] as the lookahead branch
    assert draft2.tokens.tolist() == [6, 7, 6, 7, 8]
    assert draft2.parents.tolist() == [-1, 0, -1, 2, 3]
    info = build_tree(draft2.parents)
    # the two branches cannot see each other
    assert not info.mask[2, 0] and not info.mask[3, 1] and info.mask[4, 2]
    assert info.depth.tolist() == [0, 1, 0, 1, 2]


def test_budget_bounds_the_tree():
    d = LookaheadDrafter(window=6, ngram=4, guesses=3)
    for t in range(3):
        d.pool.add((1, 2 + t, 3, 4))
    draft = d.propose(Context(torch.tensor([1]), 1), budget=5)
    assert len(draft) <= 5
    assert d.max_nodes == 6 + 3 * 3


def test_iterate_follows_the_accepted_tokens():
    d = LookaheadDrafter(window=3, ngram=2, guesses=0)
    ctx = Context(torch.tensor([1]), 1)
    draft = d.propose(ctx, budget=3)
    argmax = torch.tensor([1, 2, 3, 4])  # first draft token (1) accepted, then a miss
    res = verify_greedy_argmax(draft, argmax)
    assert res.tokens.tolist() == [1, 2]
    d.observe(ctx, StepFeedback(draft, res, argmax))
    nxt = d.propose(Context(torch.tensor([1, 1, 2]), 1), budget=3)
    # the iterate [1, 2, 3, 4] minus the two emitted tokens, padded with the last emitted one
    assert nxt.tokens.tolist() == [3, 4, 2]
    # a context that moved without this drafter restarts the iterate
    other = d.propose(Context(torch.tensor([1, 1, 2, 7, 8]), 1), budget=3)
    assert other.tokens.tolist() == [8, 8, 8]
