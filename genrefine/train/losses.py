"""Distillation losses shared by the trainers: the target's top-k distribution and the
cross-entropy against it."""

from __future__ import annotations

from torch import Tensor

TOPK_TARGET = 8  # target probabilities kept per position for distillation (large vocabularies)
DENSE_VOCAB = 4096  # up to this many draft tokens the whole distribution is kept


def target_topk(target_logits: Tensor, k: int = TOPK_TARGET) -> tuple[Tensor, Tensor]:
    """The target's ``k`` most likely tokens (all of them for a vocabulary of at most
    :data:`DENSE_VOCAB`) and their probabilities: ([m, k] float, [m, k] long)."""
    probs = target_logits.float().softmax(-1)
    v = probs.shape[-1]
    return probs.topk(v if v <= DENSE_VOCAB else min(k, v), dim=-1)


def topk_ce(logits: Tensor, p: Tensor, idx: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` [m, v] against the target's top-k distribution (p [m, k] at
    idx [m, k]); the mass outside the top-k is left out. One log-sum-exp per row: much cheaper on a
    CPU than dense soft targets, and it keeps what greedy verification needs (the argmax) and the
    runner-ups that trees draft."""
    lse = logits.logsumexp(-1, keepdim=True)
    return -(p * (logits.gather(-1, idx) - lse)).sum(-1).mean()
