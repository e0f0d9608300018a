"""Relaxed acceptance with a total-variation budget (LANTERN, GSD). LOSSY by design, bounded.

Terms are those of :mod:`genrefine.types` and :mod:`genrefine.verify.sampling`: ``p`` the
target's processed row, ``q`` the distribution the drafted token ``x`` was drawn from.

Image tokens have flat next-code distributions, so exact acceptance ``min(1, p(x) / q(x))`` is
low, while many codes are near-interchangeable (close in the VQ codebook). A relaxed rule accepts
``x`` also for the target mass of codes *like* ``x``. A method supplies, for a row, a ratio
``a(y) >= min(1, p(y) / q(y))`` for every token ``y`` (clamped here to ``[min(1, p/q), 1]``):

* LANTERN (:class:`LatentNeighbours`): ``a(y) = min(1, p~(y) / q(y))`` with ``p~(y)`` the target
  mass of ``y`` and of its latent neighbours: up to ``k`` nearest codes by latent distance, closest
  first, while the added mass stays ``<= delta``;
* GSD (:class:`LatentGroups`): ``a(y) = min(1, p(G(y)) / q(G(y)))``, ``G(y)`` = ``y`` plus those of
  the target's top-``g`` tokens whose latent cosine similarity to ``y`` is ``>= threshold``.

Left alone, such a rule can move the output arbitrarily far from ``p``. The budget ``delta``
bounds the move by construction, per token. For one row define::

    m(y) = min(q(y), p(y))                  what exact acceptance emits
    d(y) = q(y) a(y) - m(y) >= 0            the extra mass the relaxed rule would accept
    D    = sum_y d(y),   s = min(1, delta / D)   (s = 1 when D = 0)

A drafted ``x`` is accepted with probability ``(m(x) + s d(x)) / q(x)`` (that is,
``min(1, p(x)/q(x)) + s (a(x) - min(1, p(x)/q(x)))``); on rejection the bonus is drawn from the
standard residual ``r = norm(max(0, p - q))``. The emitted token's distribution is then::

    e = m + s d + (1 - sum m - s D) r

(the rejection mass is what acceptance leaves, and it is >= 0 because ``m + s d <= q a <= q``).
Since ``p = m + max(0, p - q)`` and ``sum max(0, p - q) = 1 - sum m``, so that
``max(0, p - q) = (1 - sum m) r``::

    e = p + s d - s D r = p + s (d - D r)
    TV(e, p) = 1/2 sum_y |s (d(y) - D r(y))| <= 1/2 s (D + D) = s D <= delta

so every emitted token is within ``delta`` of the target's distribution in total variation,
given the tokens before it, whatever ``a`` the method chose. With ``a = min(1, p/q)`` (``d = 0``)
this is exact speculative sampling. Greedy decoding does not come here (the engine verifies by
argmax), so relaxed methods at temperature 0 are plain greedy verification.

Chains only: a tree's sibling recursion would need the relaxation per sibling rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sampling import sample
from ..types import Draft, VerifyResult

_TINY = torch.finfo(torch.float32).tiny


class RelaxedAcceptance:
    """A relaxation: ``ratio(p, q) -> a`` ([n, V] each) with a total-variation budget ``delta``
    per token. Subclasses implement :meth:`ratio`."""

    name = "relaxed"

    def __init__(self, delta: float) -> None:
        if not 0.0 <= delta <= 1.0:
            raise ConfigError(f"the total-variation budget delta must be in [0, 1], got {delta}")
        self.delta = float(delta)

    def ratio(self, p: Tensor, q: Tensor) -> Tensor:
        """a(y) for every row and token: p, q [n, V] -> [n, V] (>= min(1, p/q) is enforced)."""
        raise NotImplementedError


def _exact_ratio(p: Tensor, q: Tensor) -> Tensor:
    """min(1, p/q), 0 where q = 0. [n, V] -> [n, V]."""
    return torch.where(q > 0, (p / q.clamp_min(_TINY)).clamp(max=1.0), 0.0)


def relaxed_rows(p: Tensor, q: Tensor, a: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """The budgeted rule of the module docstring for every row and token.

    p, q, a: [n, V] (``a`` is clamped to ``[min(1, p/q), 1]``). Returns ``accept`` [n, V]: the
    probability that a drafted ``y`` is accepted, and ``residual`` [n, V]: what a rejection's
    bonus is drawn from.
    """
    p, q = p.float(), q.float()
    exact = _exact_ratio(p, q)  # [n, V]
    a = torch.maximum(a.float(), exact).clamp(max=1.0)
    m = torch.minimum(p, q)  # [n, V]
    d = (q * a - m).clamp_min(0.0)  # [n, V]
    D = d.sum(dim=-1, keepdim=True)  # [n, 1]
    s = torch.where(D > delta, delta / D.clamp_min(_TINY), torch.ones_like(D))  # [n, 1]
    accept = torch.where(q > 0, ((m + s * d) / q.clamp_min(_TINY)).clamp(max=1.0), 0.0)
    rest = (p - q).clamp_min(0.0)
    z = rest.sum(dim=-1, keepdim=True)
    residual = torch.where(z > 0, rest / z.clamp_min(_TINY), p)
    return accept, residual


def emitted_distribution(p: Tensor, q: Tensor, a: Tensor, delta: float) -> Tensor:
    """The exact distribution of the token one row emits when its drafted token is drawn from
    ``q``: ``q * accept + (1 - sum q * accept) * residual``. [n, V] each -> [n, V]."""
    accept, residual = relaxed_rows(p, q, a, delta)
    return emitted_law(accept, residual, q)


def emitted_law(accept: Tensor, residual: Tensor, q: Tensor) -> Tensor:
    """The exact law of the token a row emits when its drafted token is drawn from ``q`` and
    kept with ``accept``, else replaced by a draw from ``residual``. [n, V] each -> [n, V]."""
    kept = q.float() * accept
    return kept + (1.0 - kept.sum(dim=-1, keepdim=True)).clamp_min(0.0) * residual


def verify_chain_rows(
    draft: Draft, target_probs: Tensor, generator: torch.Generator, rows, what: str
) -> VerifyResult:
    """Speculative sampling of a chain draft under a per-row acceptance rule: ``rows(p, q)``
    gives, for the draft's rows ([n, V] each), the probability of keeping each token and the law
    a rejected row's token is drawn from (``(accept, residual)``, [n, V] each). The walk keeps the
    drafted tokens while n uniforms fall under their acceptance, then draws the bonus token from
    the first rejected row's residual (or the target's row n after a full accept).

    draft: a chain of n nodes, ``draft.probs`` [n, V] or None (point masses). target_probs:
    [n + 1, V], p at each row, processed like q. generator: on ``target_probs.device``; the only
    randomness (n uniforms, then one draw). One host sync. ``what`` names the rule in the error
    for a tree draft.
    """
    n = len(draft)
    assert target_probs.dim() == 2 and target_probs.shape[0] == n + 1, (
        f"target_probs must be [n + 1, vocab] = [{n + 1}, vocab], got {tuple(target_probs.shape)}"
    )
    if not draft.is_chain:
        raise ConfigError(f"{what} verifies chain drafts only")
    dev = target_probs.device
    p = target_probs.float()  # [n + 1, V]
    tokens = draft.tokens.to(dev)  # [n]
    if draft.probs is None:
        q = torch.zeros(n, p.shape[1], device=dev).scatter_(1, tokens[:, None], 1.0)
    else:
        q = draft.probs.to(dev, torch.float32)  # [n, V]
    accept, residual = rows(p[:n], q)  # [n, V] each
    acc_x = accept.gather(1, tokens[:, None]).squeeze(1)  # [n]
    u = torch.rand(n, generator=generator, device=dev)  # [n]
    a = (u < acc_x).long().cumprod(0).sum()  # 0-dim: accepted length
    stop = torch.cat([residual, p[n:]])  # [n + 1, V]: the bonus's law if the walk ends at row a
    bonus = sample(stop[a], generator)  # 0-dim
    k = int(a)
    path = torch.arange(k, device=dev)
    return VerifyResult(path=path, tokens=torch.cat([tokens[:k], bonus.reshape(1)]))


def verify_relaxed(
    draft: Draft, target_probs: Tensor, generator: torch.Generator, relax: RelaxedAcceptance
) -> VerifyResult:
    """Relaxed speculative sampling of a chain draft (module docstring; arguments as for
    :func:`verify_chain_rows`)."""
    return verify_chain_rows(
        draft, target_probs, generator,
        lambda p, q: relaxed_rows(p, q, relax.ratio(p, q), relax.delta), "relaxed acceptance",
    )


# ----------------------------------------------------------------------------- the relaxations
def _check_latents(latents: Tensor) -> Tensor:
    if latents.dim() != 2:
        raise ConfigError(f"token latents must be [V, d], got {tuple(latents.shape)}")
    return latents.detach().float()


class LatentNeighbours(RelaxedAcceptance):
    """LANTERN's relaxation: ``y`` accepted against the target mass of ``y`` and of up to ``k``
    latent neighbours (nearest codes by Euclidean distance, closest first) while the added mass
    stays ``<= delta``.

    latents: [V, d], token ``i``'s latent vector (a VQ codebook)."""

    name = "lantern"

    def __init__(self, latents: Tensor, k: int, delta: float) -> None:
        super().__init__(delta)
        lat = _check_latents(latents)
        V = lat.shape[0]
        if not 1 <= k:
            raise ConfigError(f"LANTERN's neighbour count k must be >= 1, got {k}")
        self.k = min(k, V - 1)
        dist = torch.cdist(lat, lat)  # [V, V]
        dist.fill_diagonal_(float("inf"))
        # ties (equal latents) broken by token id, so the table does not depend on topk's order
        order = torch.argsort(dist, dim=1, stable=True)
        self.neighbours = order[:, : self.k].contiguous()  # [V, k] long, closest first

    def ratio(self, p: Tensor, q: Tensor) -> Tensor:
        nb = self.neighbours.to(p.device)
        mass = p[:, nb]  # [n, V, k]: target mass of each neighbour, closest first
        added = (mass * (mass.cumsum(dim=-1) <= self.delta)).sum(dim=-1)  # [n, V]
        return _exact_ratio(p + added, q)


class LatentGroups(RelaxedAcceptance):
    """GSD's grouped acceptance: ``a(y) = min(1, p(G(y)) / q(G(y)))``, ``G(y)`` = ``y`` and those
    of the row's top-``group`` target tokens whose latent cosine similarity to ``y`` is at least
    ``threshold``.

    latents: [V, d], token ``i``'s latent vector (a VQ codebook)."""

    name = "gsd"

    def __init__(self, latents: Tensor, group: int, threshold: float, delta: float) -> None:
        super().__init__(delta)
        lat = _check_latents(latents)
        if group < 1:
            raise ConfigError(f"GSD's group size must be >= 1, got {group}")
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"GSD's similarity threshold must be in [-1, 1], got {threshold}")
        self.group = min(group, lat.shape[0])
        unit = lat / lat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.similar = (unit @ unit.T) >= threshold  # [V, V] bool
        self.similar.fill_diagonal_(False)  # y itself is counted once, on its own

    def ratio(self, p: Tensor, q: Tensor) -> Tensor:
        top_p, top_i = p.topk(self.group, dim=-1)  # [n, g]
        member = self.similar.to(p.device)[:, top_i].permute(1, 0, 2)  # [n, V, g]
        pg = p + (member * top_p[:, None, :]).sum(dim=-1)  # [n, V]
        qg = q + (member * q.gather(1, top_i)[:, None, :]).sum(dim=-1)  # [n, V]
        return _exact_ratio(pg, qg)
