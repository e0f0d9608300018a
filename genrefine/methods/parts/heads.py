"""Prediction heads on the target's last hidden state: BPD, Medusa and lattice rescoring.

Blockwise parallel decoding (Stern et al. 2018) and Medusa (Cai et al. 2024) add ``K`` small heads
to the target. Head ``j`` (``1 <= j <= K``) reads the target's final hidden state at the token
before the root, the state that predicted the root, and predicts the token ``j`` places after the
root. Each head here is one residual block, ``h + SiLU(W_j h + b_j)``, followed by the target's own
output projection restricted to a reduced draft vocabulary (``vocab_ids``, the most frequent
tokens), so a head adds ``hidden^2`` weights and no output matrix. ``W_j`` starts at zero: an
untrained head repeats the target's next-token prediction.

What the four heads methods share is here: the network (:class:`HeadsNet`), the rescoring LM's
network (:class:`WindowLM`), the trained drafter's loading, the static tree's choice
(:func:`static_tree`) and :class:`HeadsDrafter` (candidates and the cost-aware cut). How each
drafts is in its own module: ``bpd`` (:mod:`genrefine.methods.bpd`), ``medusa``
(:mod:`genrefine.methods.medusa`), ``bpd+ngram`` (:mod:`genrefine.methods.bpd_ngram`),
``bpd+lm`` (:mod:`genrefine.methods.bpd_lm`). Drafts are deterministic and verified by the
target, so every one of them is lossless.

The heads need ``Context.hidden`` (``wants_hidden``), so they run on backends that return final
hidden states: the native runtime (and the transformers adapter).
"""

from __future__ import annotations

import heapq
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...costs import target_costs
from ...errors import ConfigError
from ...types import Draft
from ..base import Context, FixedPolicy, Method, MethodOptions, StepFeedback
from .draft_size import TreeCut
from .draft_vocab import trained_vocab
from .store import find_drafter


class HeadsNet(nn.Module):
    """``K`` residual blocks on the final hidden state: [..., H] -> [..., K, H]."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden, hidden))  # [K, H_out, H_in]
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden))  # [K, H]

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, h: Tensor) -> Tensor:
        y = torch.einsum("...i,koi->...ko", h, self.weight) + self.bias
        return h.unsqueeze(-2) + F.silu(y)


class WindowLM(nn.Module):
    """A fixed-window neural LM: the last ``window`` tokens' embeddings (the target's rows,
    frozen, passed in) -> MLP -> a state scored against the target's output rows.

    ``forward(emb [..., window, H]) -> [..., H]``; logits are ``state @ head_rows.T``.
    """

    def __init__(self, hidden: int, window: int = 4, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or hidden
        self.window = window
        self.norm = nn.Parameter(torch.ones(hidden))
        self.up = nn.Linear(window * hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, emb: Tensor) -> Tensor:
        x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        x = x.flatten(-2)
        return self.down(F.silu(self.up(x)))


def output_logits(model, x: Tensor, rows: Tensor) -> Tensor:
    """The target's output projection of already-normalised states ``x`` [m, H] onto ``rows``
    [v, H] (its softcap included): [m, v] float32."""
    logits = (x.to(rows.dtype) @ rows.T).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcap", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def static_tree(acc: Tensor, nodes: int) -> list[tuple[int, ...]]:
    """Medusa's static tree: the ``nodes`` candidate paths of highest estimated acceptance.

    acc: [K, k] float, ``acc[j, i]`` the rate at which head ``j + 1``'s ``i``-th candidate is
    the target's token (measured on held-back text). A path ``(i_1, .., i_d)`` is worth
    ``prod_j acc[j, i_j]``; paths are taken best first, each only after its parent, so any prefix
    of the returned list is a tree."""
    K, k = acc.shape
    acc = acc.clamp(min=1e-6)
    out: list[tuple[int, ...]] = []
    heap = [(-float(acc[0, i]), (i,)) for i in range(k)]
    heapq.heapify(heap)
    while heap and len(out) < nodes:
        neg, path = heapq.heappop(heap)
        out.append(path)
        d = len(path)
        if d < K:
            for i in range(k):
                heapq.heappush(heap, (neg * float(acc[d, i]), path + (i,)))
    return out


def paths_draft(paths: list[tuple[int, ...]], cand: Tensor) -> Draft:
    """Index paths (each after its parent) into a draft of candidate tokens cand [K, k]."""
    index = {(): -1}
    tokens, parents = [], []
    for p in paths:
        index[p] = len(tokens)
        tokens.append(int(cand[len(p) - 1, p[-1]]))
        parents.append(index[p[:-1]])
    return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


class HeadsDrafter:
    """Drafts from trained prediction heads: what the heads methods share (the network, the
    candidates, the cut). Each method subclasses it with its own :meth:`_draft`:
    :class:`~genrefine.methods.bpd.BpdDrafter`, :class:`~genrefine.methods.medusa.MedusaDrafter`,
    :class:`~genrefine.methods.bpd_ngram.NgramRescoredDrafter`,
    :class:`~genrefine.methods.bpd_lm.LmRescoredDrafter`."""

    wants_hidden = True
    name = "heads"

    def __init__(self, model, net: HeadsNet, vocab_ids: Tensor, topk: int = 4, cost=None) -> None:
        self.model = model
        self.net = net.to(model.device, model.dtype).eval()
        self.ids = vocab_ids.to(model.device, torch.long)  # [v]
        self.rows = model.lm_head.index_select(0, self.ids).contiguous()  # [v, H]
        self.topk = max(1, topk)
        # given the target's forward times, drafts are cut to what pays on this machine
        self.cut = None if cost is None else TreeCut(cost)

    @property
    def num_heads(self) -> int:
        return self.net.num_heads

    def reset(self) -> None:
        if self.cut is not None:
            self.cut.reset()

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        if self.cut is not None:
            self.cut.observe(feedback.result.num_accepted, len(feedback.draft))

    @torch.inference_mode()
    def candidates(self, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Each head's top-``k``: (token ids [K, k] long, log-probs [K, k] float32)."""
        x = self.net(h.to(self.model.dtype))  # [K, H]
        logp = output_logits(self.model, x, self.rows).log_softmax(-1)  # [K, v]
        top, idx = logp.topk(k, dim=-1)
        return self.ids[idx].cpu(), top.cpu()

    @torch.inference_mode()
    def propose(self, ctx: Context, budget: int) -> Draft:
        if ctx.hidden is None or ctx.hidden.shape[0] == 0:
            raise ConfigError("prediction heads need the target's hidden states (use the engine)")
        draft, ids, logp = self._draft(ctx, ctx.hidden[-1], budget)  # the state that predicted the root
        return self._cut(draft, ids, logp)

    def _draft(self, ctx: Context, h: Tensor, budget: int) -> tuple[Draft, Tensor, Tensor]:
        """The method's draft from the state ``h`` [H] that predicted the root, with the
        candidates it came from (ids, log-probs [K, k]) for the cut."""
        raise NotImplementedError

    def _cut(self, draft: Draft, ids: Tensor, logp: Tensor) -> Draft:
        """The draft cut to its nodes that pay on this machine (:class:`TreeCut`), a node's
        acceptance estimated by the product of the heads' probabilities along its path."""
        n = int(draft.tokens.shape[0])
        if self.cut is None or n <= 1:
            return draft
        toks, par = draft.tokens.tolist(), draft.parents.tolist()
        by_head = [dict(zip(ids[j].tolist(), logp[j].tolist())) for j in range(ids.shape[0])]
        depth: list[int] = []
        lp: list[float] = []
        for t, p in zip(toks, par):
            d = 0 if p < 0 else depth[p] + 1
            depth.append(d)
            lp.append((0.0 if p < 0 else lp[p]) + by_head[d].get(t, -math.inf))
        # best path probability first (a child never above its parent; on ties the shallower
        # first), so every prefix of the order is closed under parents
        order = sorted(range(n), key=lambda i: (-lp[i], depth[i], i))
        keep = sorted(order[: self.cut([math.exp(lp[i]) for i in order])])
        new = {old: j for j, old in enumerate(keep)}
        return Draft(
            torch.tensor([toks[i] for i in keep], dtype=torch.long),
            torch.tensor([-1 if par[i] < 0 else new[par[i]] for i in keep], dtype=torch.long),
        )


def load_heads(model, opts: MethodOptions, tokenizer=None):
    """``(stored drafter, heads, rescoring LM, draft vocabulary ids)`` of the trained heads
    drafter for ``model`` (``opts.drafter`` or the one shipped for it), the vocabulary cut to
    ``--draft-vocab`` (:func:`~genrefine.methods.parts.draft_vocab.trained_vocab`)."""
    d = find_drafter(model, "heads", opts.drafter)
    t, cfg = d.tensors, d.config
    net = HeadsNet(model.hidden_size, int(cfg["num_heads"]))
    net.load_state_dict({"weight": t["heads.weight"].float(), "bias": t["heads.bias"].float()})
    lm = WindowLM(model.hidden_size, int(cfg["lm_window"]))
    lm.load_state_dict({k[3:]: v.float() for k, v in t.items() if k.startswith("lm.")})
    return d, net, lm, trained_vocab(model, opts, tokenizer, t["vocab_ids"].long())


def heads_method(cls, model, opts: MethodOptions, net, ids, budget: int, **kw) -> Method:
    """The :class:`Method` of a heads drafter of class ``cls`` drafting at most ``budget`` nodes
    (or ``--draft-len``); drafts are cut to what pays on this machine (:class:`TreeCut`) unless
    ``opts.tree_cut`` is off."""
    budget = min(budget, opts.draft_len or budget)
    cost = target_costs(model) if opts.tree_cut else None
    drafter = cls(model, net, ids, cost=cost, **kw)
    return Method(cls.name, [drafter], FixedPolicy(drafter, budget), budget, opts.acceptance)
