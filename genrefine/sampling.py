"""Turning logits into a distribution and a token.

The same transformation (temperature, then top-k, then top-p) is applied to the target's logits
(giving ``p``) and to a drafter's logits (giving ``q``), which is what keeps speculative sampling
lossless with respect to the *processed* target distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import argmax
from .types import SamplingParams


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Processed distribution for each row.

    logits: [..., vocab] -> probs: [..., vocab] float32, rows summing to 1.
    Greedy params give a one-hot at the argmax (the distribution greedy decoding samples from).
    """
    logits = logits.float()
    if params.greedy:
        idx = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(-1, idx, 1.0)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row. probs: [..., vocab] -> [...] long."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator)  # [rows, 1]
    return out.reshape(probs.shape[:-1])


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Pick the next token from logits [..., vocab] -> [...] long (argmax when greedy)."""
    if params.greedy:
        return argmax(logits)
    return sample(logits_to_probs(logits, params), generator)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """The explicit generator all randomness of one generation goes through."""
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g
