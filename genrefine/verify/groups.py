"""Group-level speculative sampling over a partition of the vocabulary (PCG). EXACT on groups,
LOSSY at token level.

Terms are those of :mod:`genrefine.types` and :mod:`genrefine.verify.sampling`: ``p`` the
target's processed row, ``q`` the distribution the drafted token ``x`` was drawn from. A
*partition* assigns every token ``y`` one group ``g(y)`` (``groups[y]``); a group's mass is
``pG(h) = sum_{g(y) = h} p(y)`` (likewise ``qG``).

The rule for one row::

    accept x          with probability  min(1, pG(g(x)) / qG(g(x)))        (x is emitted)
    on rejection      draw a group h ~ r = norm(max(0, pG - qG)),
                      then the token y ~ p restricted to h: p(y) / pG(h)

The emitted *group* has exactly the target's group distribution, whatever ``q``::

    P(group h) = qG(h) min(1, pG(h) / qG(h)) + (1 - sum_g min(pG(g), qG(g))) r(h)
               = min(pG(h), qG(h)) + max(0, pG(h) - qG(h)) = pG(h)

(the rejection mass ``1 - sum_g min(pG, qG)`` equals ``sum_g max(0, pG - qG)``). The emitted
*token* is not the target's in general: an accepted group carries the drafted token, which is
distributed inside its group as ``q`` rather than as ``p``. Token ``y`` of group ``h`` comes out
with probability ``q(y) min(1, pG(h) / qG(h)) + max(0, pG(h) - qG(h)) p(y) / pG(h)``, equal to
``p(y)`` for every ``y`` only when ``q(y) / qG(h) = p(y) / pG(h)`` inside every group ``q``
draws from. With
singleton groups (``group_size`` 1) this is exact speculative sampling. A row accepts with
probability ``sum_h min(pG(h), qG(h)) >= sum_y min(p(y), q(y))``, the exact rule's (inside a
group a sum of minima is at most the minimum of the sums), though a given token may be
accepted less often than under the exact rule.

The paper (Yanuka et al. 2025, "Principled Coarse-Grained Acceptance for Speculative Decoding in
Speech") lets groups overlap, splitting each token's mass among its groups with weights, and
draws the residual by thinning. Here the groups are a partition (weights 0 or 1), where its
coarse distribution is ``pG``, and the residual group is drawn directly (the same law).

Greedy decoding does not come here (the engine verifies by argmax): ``pcg`` at temperature 0
is plain greedy verification, token-identical to plain greedy decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import Draft, VerifyResult
from .relaxed import emitted_law, verify_chain_rows

_TINY = torch.finfo(torch.float32).tiny


def balanced_partition(latents: Tensor, group_size: int) -> Tensor:
    """Groups of about ``group_size`` tokens that lie close in latent space: a partition.

    latents: [V, d], token ``y``'s vector (the target's embedding of it). The set is cut in two
    along its principal axis (projections sorted, ties by token id) at a multiple of
    ``group_size`` near the middle, recursively, until a part holds at most ``group_size``
    tokens; so every group has ``group_size`` tokens except at most one per cut. Deterministic.
    Returns [V] long: each token's group, ids ``0 .. G - 1`` in the order the parts were made.
    """
    if latents.dim() != 2:
        raise ConfigError(f"token latents must be [V, d], got {tuple(latents.shape)}")
    if group_size < 1:
        raise ConfigError(f"the group size must be >= 1, got {group_size}")
    lat = latents.detach().to("cpu", torch.float64)
    V = lat.shape[0]
    groups = torch.empty(V, dtype=torch.long)
    parts = [torch.arange(V)]
    made = 0
    while parts:
        idx = parts.pop()
        n = idx.numel()
        if n <= group_size:
            groups[idx] = made
            made += 1
            continue
        x = lat[idx] - lat[idx].mean(dim=0)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        axis = vh[0]
        axis = axis * torch.sign(axis[axis.abs().argmax()])  # the SVD's sign is arbitrary
        order = torch.argsort(x @ axis, stable=True)
        num = -(-n // group_size)  # groups this part needs
        left = min(((num + 1) // 2) * group_size, n - 1)
        parts.append(idx[order[left:]])  # popped second
        parts.append(idx[order[:left]])
    return groups


def group_mass(p: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Each group's mass: p [n, V], groups [V] long -> [n, G]."""
    out = torch.zeros(p.shape[0], num_groups, dtype=p.dtype, device=p.device)
    return out.index_add_(1, groups.to(p.device), p)


def grouped_rows(p: Tensor, q: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """The rule of the module docstring for every row and token.

    p, q: [n, V]; groups: [V] long. Returns ``accept`` [n, V]: the probability that a drafted
    ``y`` is accepted, and ``residual`` [n, V]: the law of a rejection's token (the group from
    ``norm(max(0, pG - qG))``, the token from ``p`` inside it).
    """
    p, q = p.float(), q.float()
    g = groups.to(p.device)
    G = int(g.max()) + 1
    pG, qG = group_mass(p, g, G), group_mass(q, g, G)  # [n, G]
    ratio = torch.where(qG > 0, (pG / qG.clamp_min(_TINY)).clamp(max=1.0), 0.0)  # [n, G]
    accept = torch.where(q > 0, ratio[:, g], 0.0)  # [n, V]
    rest = (pG - qG).clamp_min(0.0)  # [n, G]
    z = rest.sum(dim=-1, keepdim=True)
    # z = 0: no rejection can happen (pG = qG); p keeps the row a distribution
    rG = torch.where(z > 0, rest / z.clamp_min(_TINY), pG)  # [n, G]
    within = torch.where(pG[:, g] > 0, p / pG[:, g].clamp_min(_TINY), 0.0)  # [n, V]
    return accept, rG[:, g] * within


def emitted_distribution(accept: Tensor, residual: Tensor, q: Tensor) -> Tensor:
    """The exact law of the token a row emits (:func:`.relaxed.emitted_law`, the same mixture)."""
    return emitted_law(accept, residual, q)


def verify_grouped(
    draft: Draft, target_probs: Tensor, generator: torch.Generator, groups: Tensor
) -> VerifyResult:
    """Group-level speculative sampling of a chain draft (module docstring).

    draft: a chain of n nodes, ``draft.probs`` [n, V] or None (point masses). target_probs:
    [n + 1, V], p at each row, processed like q. groups: [V] long, a partition. generator: on
    ``target_probs.device``; the only randomness (n uniforms, then one draw). One host sync.
    """
    assert groups.shape == (target_probs.shape[1],), (tuple(groups.shape), target_probs.shape)
    return verify_chain_rows(
        draft, target_probs, generator, lambda p, q: grouped_rows(p, q, groups), "group-level acceptance"
    )


class TokenGroups:
    """A partition of the vocabulary into groups of about ``group_size`` tokens close in latent
    space (:func:`balanced_partition`), computed once; ``verify`` is the method's sampling rule.

    latents: [V, d]."""

    name = "pcg"

    def __init__(self, latents: Tensor, group_size: int) -> None:
        self.groups = balanced_partition(latents, group_size)  # [V] long
        self.num_groups = int(self.groups.max()) + 1
        self._on: dict[torch.device, Tensor] = {}

    def verify(self, draft: Draft, target_probs: Tensor, generator) -> VerifyResult:
        """:func:`verify_grouped` with this partition (``Method.verify_sampled``)."""
        dev = target_probs.device
        if dev not in self._on:
            self._on[dev] = self.groups.to(dev)
        return verify_grouped(draft, target_probs, generator, self._on[dev])
