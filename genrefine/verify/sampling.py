"""Sampling verification: lossless speculative sampling over chains and trees, and Medusa's
(lossy) typical acceptance.

Terms are those of :mod:`genrefine.types`; in short:

* ``p`` is the target's processed distribution (``logits_to_probs``), ``target_probs[g]`` the
  one at *row* ``g``: row ``0`` after the root, row ``i + 1`` after node ``i``.
* ``q`` is the drafter's processed distribution, with the *same* ``SamplingParams``:
  ``draft.probs[i]`` is the distribution node ``i`` was drawn from (siblings drawn from the same
  distribution share identical rows). ``draft.probs is None`` means a deterministic drafter: each
  node is a point mass on its own token.
* *accepted*: the root-to-node path of draft nodes that passed. *bonus*: the one token the target
  adds after them, drawn from the *residual* of the row where the walk stopped.
* *residual* of ``p`` against ``q``: ``norm(max(p - q, 0))``, the part of ``p`` that ``q``
  under-covers (``p`` itself if that is all zero, which only rounding can reach).

The speculative walk (Leviathan et al. 2023; Chen et al. 2023 for chains; SpecInfer / EAGLE
multi-candidate verification and Recursive Speculative Decoding for trees). Start at the root
with ``p`` = row 0. Try the current node's children in index order; child ``c`` with token ``x``
is accepted with probability ``min(1, p(x) / q_c(x))``. If it is rejected, ``p <- norm(max(p -
q_c, 0))`` and the next sibling is tried against that ``p``. If a child is accepted, move to it
and start again with ``p`` = its own target row. If all children are rejected (or there are none)
the bonus is drawn from the current ``p``.

What ``q_c`` is depends on how the drafter drew the siblings, and the caller says which rule to
use (``siblings=``):

* ``"without_replacement"`` (default): ``q_c`` is ``q`` with the tokens of ``c``'s earlier
  siblings removed and renormalised; a candidate with ``q_c(x) = 0`` (a repeated token) is
  skipped. Exact for siblings drawn without replacement in index order (sequential draws,
  ``torch.multinomial(q, k)``, Gumbel-top-k sorted by key), and *also* exact for siblings drawn
  i.i.d.: a repeat is skipped (the walk goes on with the same ``p``), and an i.i.d. draw that
  is not a repeat has exactly the without-replacement distribution.
* ``"iid"``: ``q_c = q`` (SpecInfer's rule). Exact only for siblings drawn i.i.d. from ``q``
  (where it can accept slightly more often than the rule above); *not* lossless for siblings
  drawn without replacement (the tests measure the bias).

Proof sketch, by induction on the number of untried children: claim the procedure at a node
emits a next token distributed as the current ``p``. No child left: the bonus is drawn from
``p``. Otherwise the next candidate ``x ~ q_c`` is emitted with probability ``min(p(x), q_c(x))``;
if it is rejected (total probability ``sum(max(p - q_c, 0))``) the rest runs with
``p' = norm(max(p - q_c, 0))``, which does not depend on ``x``, and with remaining candidates
that, given the rejected ``x``, follow exactly the ``q`` the rule uses next (or are skipped
repeats, which leave the state alone), so by induction it emits ``p'``. Sum:
``min(p, q_c) + max(p - q_c, 0) = p``. After an accepted child the same argument applies one
level down, conditioned on the emitted token, provided the subtree below a node was drawn from
the drafter given the path to that node only (not given its siblings' tokens), and the tree's
shape (how many children each node has) was fixed before those children's tokens were drawn.
Deterministic children (``probs=None``) are point masses: ``q_c = delta_x``, acceptance is
``p(x)``, the residual is ``p`` with ``x`` zeroed, and any fixed sequence of candidates is lossless
under either rule. A shape or candidate set chosen by looking at sampled tokens (e.g. reranking
sampled candidates by their ``q``) breaks the assumption; such drafters should choose tokens
deterministically (top-k) and pass ``probs=None``.

Repeated sibling tokens are wasted: only the first copy can ever be accepted (once it is rejected
the residual gives its token probability 0), so the subtrees of later copies are never used;
drafters should merge them (build a trie). :func:`~genrefine.verify.greedy.verify_greedy_argmax` instead takes the deepest copy.

Edge cases: a candidate with ``q_c(x) = 0`` (a repeat under the without-replacement rule, or a
token the drafter's own ``q`` rules out) is skipped: never accepted, ``p`` left unchanged, which
keeps the rest of the walk lossless.

Vectorisation: the per-sibling recursion at every node does not depend on which path the walk
takes, so :func:`speculative_plan` computes, for every node at once (a Python loop over sibling
rank only), its acceptance probability and, for every row, the distribution the bonus would be
drawn from if the walk stopped there. :func:`verify_speculative` then draws one uniform per node,
takes the first success among each node's children, keeps the deepest all-success path, and
draws the bonus: one host sync in all (the accepted length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sampling import sample
from ..types import Draft, VerifyResult
from .greedy import finish
from .tree import TreeInfo, build_tree, deepest_path_row

SiblingSampling = Literal["without_replacement", "iid"]
SIBLING_MODES: tuple[str, ...] = ("without_replacement", "iid")
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SpeculativePlan:
    """The deterministic half of speculative verification for one draft."""

    # [n] float32: probability that node i is accepted given that it is tried, i.e. given that
    # its parent was accepted and all its earlier siblings were rejected
    accept_prob: Tensor
    # [n + 1, vocab] float32: row g is what the bonus is drawn from if the walk stops at row g:
    # p itself for a leaf (or the root of an empty draft), else the residual left after all of
    # that node's children were rejected
    bonus_probs: Tensor


def speculative_plan(
    draft: Draft, target_probs: Tensor, siblings: SiblingSampling = "without_replacement"
) -> SpeculativePlan:
    """Acceptance probabilities and stop distributions of :func:`verify_speculative`.

    target_probs: [n + 1, vocab], p at each row (processed like q, rows summing to 1).
    """
    info = _check(draft, target_probs, siblings)
    return _plan(draft, info, target_probs, siblings)


def verify_speculative(
    draft: Draft,
    target_probs: Tensor,
    generator: torch.Generator,
    siblings: SiblingSampling = "without_replacement",
) -> VerifyResult:
    """Lossless speculative sampling for chains and trees (see the module docstring).

    draft: n nodes, ``draft.probs`` [n, vocab] or None. target_probs: [n + 1, vocab], p at each
    row, processed with the same SamplingParams as q. generator: on ``target_probs.device``; the
    only source of randomness (n uniforms, then one multinomial draw). Results live on
    ``target_probs.device``. One host sync.
    """
    info = _check(draft, target_probs, siblings)
    plan = _plan(draft, info, target_probs, siblings)
    dev = target_probs.device
    u = torch.rand(info.num_nodes, generator=generator, device=dev)  # [n]
    hit = u < plan.accept_prob  # [n]: would be accepted if tried
    # tried = parent accepted and no earlier sibling accepted; the path test covers the parent
    first_hit = hit & ~(info.earlier_sibling & hit[None, :]).any(dim=1)  # [n]
    end_row = deepest_path_row(info, first_hit)  # 0-dim
    bonus = sample(plan.bonus_probs[end_row], generator)  # 0-dim
    return finish(info, draft.tokens.to(dev), end_row, bonus)


def verify_typical(
    draft: Draft,
    target_probs: Tensor,
    generator: torch.Generator,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> VerifyResult:
    """Medusa's typical acceptance (Cai et al. 2024). LOSSY: the output is *not* distributed as p.

    A node with token x is accepted when ``p(x) > min(posterior_threshold, posterior_alpha *
    exp(-H(p)))``, with p its parent's row and H the entropy (nats). The longest accepted path
    wins (ties: lowest index); the bonus is sampled from p at the row after it. With one-hot p
    (greedy) this is exactly greedy verification.

    target_probs: [n + 1, vocab] processed p. generator: on ``target_probs.device``.
    """
    n = len(draft)
    assert target_probs.dim() == 2 and target_probs.shape[0] == n + 1, (
        f"target_probs must be [n + 1, vocab] = [{n + 1}, vocab], got {tuple(target_probs.shape)}"
    )
    dev = target_probs.device
    info = build_tree(draft.parents, device=dev)
    p = target_probs.float()  # [n + 1, vocab]
    tokens = draft.tokens.to(dev)  # [n]
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # [n + 1]
    threshold = (posterior_alpha * torch.exp(-entropy)).clamp(max=posterior_threshold)  # [n + 1]
    px = p[info.parent_row, tokens]  # [n]
    end_row = deepest_path_row(info, px > threshold[info.parent_row])
    bonus = sample(p[end_row], generator)
    return finish(info, tokens, end_row, bonus)


def _check(draft: Draft, target_probs: Tensor, siblings: str) -> TreeInfo:
    n = len(draft)
    assert target_probs.dim() == 2 and target_probs.shape[0] == n + 1, (
        f"target_probs must be [n + 1, vocab] = [{n + 1}, vocab], got {tuple(target_probs.shape)}"
    )
    if draft.probs is not None:
        assert draft.probs.shape == (n, target_probs.shape[1]), (
            f"draft.probs must be [n, vocab] = [{n}, {target_probs.shape[1]}], "
            f"got {tuple(draft.probs.shape)}"
        )
    if siblings not in SIBLING_MODES:
        raise ConfigError(f"siblings must be one of {SIBLING_MODES}, got {siblings!r}")
    return build_tree(draft.parents, device=target_probs.device)


def _plan(draft: Draft, info: TreeInfo, target_probs: Tensor, siblings: str) -> SpeculativePlan:
    dev = target_probs.device
    tokens = draft.tokens.to(dev)  # [n]
    stop = target_probs.float().clone()  # [n + 1, vocab]: becomes SpeculativePlan.bonus_probs
    accept = torch.zeros(info.num_nodes, device=dev)  # [n]
    q = None if draft.probs is None else draft.probs.to(dev, torch.float32)  # [n, vocab]
    if q is not None and siblings == "without_replacement":
        q = _remove_earlier_siblings(q, tokens, info)
    # Nodes of one sibling rank have distinct parents, so each rank is one batched step of every
    # node's sibling recursion; `stop[row]` holds the current p of that row's recursion.
    for nodes in info.rank_nodes:
        rows = info.parent_row[nodes]  # [m]
        x = tokens[nodes, None]  # [m, 1]
        p = stop[rows]  # [m, vocab]
        px = p.gather(1, x).squeeze(1)  # [m]
        if q is None:  # point mass on x: accept with p(x); residual = p with x zeroed
            a = px
            rest = p.scatter(1, x, 0.0)
            s = rest.sum(dim=1, keepdim=True)
            new_p = torch.where(s > 0, rest / s.clamp_min(_TINY), p)
        else:
            qn = q[nodes]  # [m, vocab]
            qx = qn.gather(1, x).squeeze(1)  # [m]
            a = _accept_prob(px, qx)
            new_p = torch.where((qx > 0)[:, None], _residual(p, qn), p)  # q(x) = 0: skipped
        accept[nodes] = a
        stop[rows] = new_p
    return SpeculativePlan(accept_prob=accept, bonus_probs=stop)


def _accept_prob(px: Tensor, qx: Tensor) -> Tensor:
    """min(1, p(x) / q(x)), and 0 where q(x) = 0. px, qx: [m] -> [m]."""
    return torch.where(qx > 0, (px / qx.clamp_min(_TINY)).clamp(max=1.0), 0.0)


def _residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(p - q, 0)), falling back to p where that is all zero. p, q: [m, vocab]."""
    rest = (p - q).clamp_min(0.0)
    s = rest.sum(dim=1, keepdim=True)  # [m, 1]
    return torch.where(s > 0, rest / s.clamp_min(_TINY), p)


def _remove_earlier_siblings(q: Tensor, tokens: Tensor, info: TreeInfo) -> Tensor:
    """q of each node with the tokens of its earlier siblings removed and renormalised: the
    distribution a without-replacement draw really came from. q: [n, vocab] -> [n, vocab].
    A row whose mass is all removed becomes zero (its candidate is then skipped)."""
    later, earlier = info.earlier_sibling_pairs  # [e], [e]
    if later.numel() == 0:
        return q
    removed = torch.zeros_like(q, dtype=torch.bool)
    removed[later, tokens[earlier]] = True
    q = q.masked_fill(removed, 0.0)
    return q / q.sum(dim=1, keepdim=True).clamp_min(_TINY)
