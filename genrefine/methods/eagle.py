"""EAGLE-style feature drafter with dynamic draft trees (EAGLE-1/2, Li et al. 2024).

The drafter is one small transformer layer that works on the target's *features*, its final
hidden states (after the last norm, the input of the output projection). At position ``t`` it
reads ``f_t`` and the embedding of the next token ``x_{t+1}`` (the target's own embedding rows,
frozen) and predicts ``f_{t+1}``; the target's output projection, restricted to a reduced draft
vocabulary, turns a predicted feature into draft probabilities. Drafting continues from predicted
features, so a chain of ``d`` tokens costs ``d`` passes of one layer, not of the target.

The drafter keeps its own key/value cache over the committed prefix (fed the target's true
features, which the engine hands over in ``Context.hidden``) and writes draft nodes after it.

Draft trees are dynamic (EAGLE-2): each node's score is the sum of draft log-probabilities along
its path; at every depth the ``width`` best nodes of that depth are expanded (one batched pass of
the layer, each node attending to the prefix and its own ancestors) into their ``topk`` best
children, until a depth's best path probability falls under ``min_prob``; finally the ``budget``
best nodes of the whole tree are kept. Since a child never scores
above its parent, the kept set is a tree. Verification is the target's, so the method is lossless.

With a cost table (``cost``: seconds of one target forward of ``n`` new tokens) the kept set is
cut further to the size that maximises the expected tokens per second of the step
(:class:`genrefine.methods.parts.draft_size.TreeCut`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..costs import target_costs
from ..errors import ConfigError
from ..types import Draft
from .base import Context, FixedPolicy, Method, MethodOptions, MethodSpec, StepFeedback
from .parts.draft_size import TreeCut
from .parts.draft_vocab import trained_vocab
from .parts.heads import output_logits


def _rms(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x: [..., heads, T, D], positions: [T] or [B, T] long."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.to(torch.float32).unsqueeze(-1) * inv  # [.., T, D/2]
    if ang.dim() == 3:  # [B, T, D/2] -> [B, 1, T, D/2]
        ang = ang.unsqueeze(1)
    cos, sin = (
        torch.cat([ang.cos()] * 2, -1).to(x.dtype),
        torch.cat([ang.sin()] * 2, -1).to(x.dtype),
    )
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


STYLES = ("genrefine", "engine")


class EagleNet(nn.Module):
    """One decoder layer that predicts the target's next feature.

    ``style="genrefine"`` (the default and the shipped drafter): the layer reads
    ``fc([norm(f_t), norm(e_{t+1})])`` with the model's scaled embedding ``e``, is pre-norm, and
    normalises its output like the target's features (the output norm starts from the target's
    final norm).

    ``style="engine"``: the network the serving engines run as an EAGLE-1 head (vLLM
    ``EagleLlamaForCausalLM`` and SGLang ``LlamaForCausalLMEagle``, ``llama_eagle.py``):
    ``x = fc([e_{t+1}, f_t])`` over the *unscaled* embedding rows (the engines call the target's
    embedding module, without Gemma's ``sqrt(hidden)`` factor), no norm before attention, a
    post-attention norm before the MLP, and no output norm: ``x + attn(x)`` then
    ``+ mlp(norm(.))`` is both fed back and projected. Only this style can be exported
    (:mod:`genrefine.export`)."""

    def __init__(
        self,
        hidden: int,
        heads: int = 4,
        kv_heads: int = 1,
        head_dim: int = 64,
        inner: int = 1024,
        rope_theta: float = 10000.0,
        out_norm: Tensor | None = None,
        style: str = "genrefine",
    ) -> None:
        super().__init__()
        if style not in STYLES:
            raise ConfigError(f"unknown EAGLE drafter style {style!r}: one of {', '.join(STYLES)}")
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.rope_theta = rope_theta
        self.style = style
        engine = style == "engine"
        if not engine:
            self.norm_f = nn.Parameter(torch.ones(hidden))
            self.norm_e = nn.Parameter(torch.ones(hidden))
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        if not engine:
            self.attn_norm = nn.Parameter(torch.ones(hidden))
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(hidden))
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        if not engine:
            init = torch.ones(hidden) if out_norm is None else out_norm.detach().float().clone()
            self.out_norm = nn.Parameter(init)

    def config(self) -> dict:
        cfg = {
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "inner": self.down.in_features,
            "rope_theta": self.rope_theta,
        }
        if self.style != "genrefine":  # drafters saved before styles existed read as genrefine
            cfg["style"] = self.style
        return cfg

    def embed(self, model, tokens: Tensor) -> Tensor:
        """The embedding this style reads for ``tokens``: the model's own (scaled) one, or for
        ``engine`` the unscaled rows."""
        return model.embed_tokens(tokens, scaled=self.style != "engine")

    def forward(
        self,
        f: Tensor,
        e: Tensor,
        positions: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """f, e: [B, T, H]; positions [T] or [B, T]; past: keys/values [B, KV, P, D]; mask:
        [B or 1, 1, T, P + T] bool (None: causal over the new rows, no past).
        Returns (predicted features [B, T, H], new keys, new values [B, KV, T, D])."""
        B, T, _ = f.shape
        engine = self.style == "engine"
        if engine:
            x = self.fc(torch.cat([e, f], -1))
            h = x
        else:
            x = self.fc(torch.cat([_rms(f, self.norm_f), _rms(e, self.norm_e)], -1))
            h = _rms(x, self.attn_norm)
        q = self.q(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(h).view(B, T, 2, self.kv_heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        q, k = _rope(q, positions, self.rope_theta), _rope(k, positions, self.rope_theta)
        keys, values = (
            (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        )
        rep = self.heads // self.kv_heads
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None and past is None
        )
        x = x + self.o(att.transpose(1, 2).reshape(B, T, -1))
        g, u = self.gate_up(_rms(x, self.mlp_norm)).chunk(2, -1)
        x = x + self.down(F.silu(g) * u)
        return (x if engine else _rms(x, self.out_norm)), k, v


class EagleDrafter:
    """Drafts a dynamic tree (or a chain with ``width = topk = 1``) from an :class:`EagleNet`."""

    wants_hidden = True

    def __init__(
        self,
        model,
        net: EagleNet,
        vocab_ids: Tensor,
        depth: int = 6,
        width: int = 4,
        topk: int = 4,
        name: str = "eagle",
        min_prob: float = 0.02,
        cost=None,
    ) -> None:
        if depth < 1 or width < 1 or topk < 1:
            raise ConfigError("eagle: depth, width and topk must be >= 1")
        self.name = name
        self.model = model
        self.net = net.to(model.device, model.dtype).eval()
        self.ids = vocab_ids.to(model.device, torch.long)  # [v]
        self.rows = model.lm_head.index_select(0, self.ids).contiguous()  # [v, H]
        self.depth, self.width, self.topk = depth, width, topk
        # stop growing the tree once no node of the newest depth has a path probability above
        # this (a draft pass costs a few ms on a CPU; such nodes are rarely accepted)
        self.min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
        self.cut = None if cost is None else TreeCut(cost)
        self.reset()

    def reset(self) -> None:
        self._k: Tensor | None = None  # [1, KV, cap, D]
        self._v: Tensor | None = None
        self._done = 0  # committed positions in the drafter's cache
        self._last: Tensor | None = None  # [H] feature predicted at the last committed position
        if self.cut is not None:
            self.cut.reset()

    def observe(self, ctx: Context, feedback: StepFeedback) -> None:
        if self.cut is not None:
            self.cut.observe(feedback.result.num_accepted, len(feedback.draft))

    def _ensure(self, need: int) -> None:
        net = self.net
        if self._k is not None and self._k.shape[2] >= need:
            return
        cap = max(need, 2 * (0 if self._k is None else self._k.shape[2]), 256)
        shape = (1, net.kv_heads, cap, net.head_dim)
        k = torch.zeros(shape, dtype=self.model.dtype, device=self.model.device)
        v = torch.zeros_like(k)
        if self._k is not None:
            k[:, :, : self._done] = self._k[:, :, : self._done]
            v[:, :, : self._done] = self._v[:, :, : self._done]
        self._k, self._v = k, v

    def _catch_up(self, ctx: Context) -> Tensor:
        """Feed the committed positions not yet in the drafter's cache; the feature predicted at
        the last one ([H], the root's children come from it)."""
        C = int(ctx.hidden.shape[0])
        if C < self._done:
            self.reset()
        if C == self._done and self._last is not None:
            return self._last
        s = self._done
        dev = self.model.device
        self._ensure(C + self.depth * self.width + 1)
        f = ctx.hidden[s:C].to(dev, self.model.dtype).unsqueeze(0)  # [1, n, H]
        e = self.net.embed(self.model, ctx.tokens[s + 1 : C + 1].to(dev)).unsqueeze(0)
        pos = torch.arange(s, C, device=dev)
        n = C - s
        mask = None
        past = None
        if s > 0:
            past = (self._k[:, :, :s], self._v[:, :, :s])
            mask = torch.ones(n, s + n, dtype=torch.bool, device=dev)
            mask[:, s:] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
            mask = mask.view(1, 1, n, s + n)
        out, k, v = self.net(f, e, pos, past, mask)
        self._k[:, :, s:C], self._v[:, :, s:C] = k, v
        self._done = C
        self._last = out[0, -1]
        return self._last

    def _top(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Each feature's ``topk`` draft tokens: (log-probs [m, k] on the CPU, positions in the
        draft vocabulary [m, k]); one log-sum-exp instead of a full log-softmax."""
        logits = output_logits(self.model, feats, self.rows)  # [m, v]
        top, idx = logits.topk(min(self.topk, logits.shape[-1]), dim=-1)
        return (top - logits.logsumexp(-1, keepdim=True)).cpu(), idx

    @torch.inference_mode()
    def propose(self, ctx: Context, budget: int) -> Draft:
        if ctx.hidden is None:
            raise ConfigError("the eagle drafter needs the target's hidden states (use the engine)")
        dev, model = self.model.device, self.model
        f0 = self._catch_up(ctx)
        C = self._done
        top, idx = self._top(f0.unsqueeze(0))
        top, idx = top[0], idx[0]
        # candidate nodes: token, parent (-1 = root), score, depth, feature source
        tok = [self.ids[i] for i in idx]
        tokens: list[Tensor] = list(tok)
        parents: list[int] = [-1] * len(tok)
        scores: list[float] = top.tolist()
        depths: list[int] = [1] * len(tok)
        feat: dict[int, Tensor] = {}  # node -> its predicted feature (expanded nodes)
        slot: dict[int, int] = {}  # node -> its slot in the drafter's cache
        frontier = list(range(len(tok)))
        used = C

        def best() -> list[int]:  # the ``budget`` best nodes so far, best first (a parent first)
            return sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))[:budget]

        # a kept tree of ``budget`` nodes is at most ``budget`` deep: deeper passes would be wasted
        for d in range(1, min(self.depth, budget)):
            if not frontier or max(scores[i] for i in frontier) < self.min_logp:
                break
            if self.cut is not None:
                # stop once no frontier node would be verified: their children score lower still
                ranked = best()
                kept = set(ranked[: self.cut.size([math.exp(scores[i]) for i in ranked])])
                if not kept.intersection(frontier):
                    break
            expand = sorted(frontier, key=lambda i: -scores[i])[: self.width]
            m = len(expand)
            pf = torch.stack([f0 if parents[i] < 0 else feat[parents[i]] for i in expand])  # [m, H]
            e = self.net.embed(model, torch.stack([tokens[j] for j in expand]))  # [m, H]
            pos = torch.full((m,), C + d - 1, device=dev)
            mask = torch.zeros(m, used + m, dtype=torch.bool, device=dev)
            mask[:, :C] = True
            for r, i in enumerate(expand):
                a = parents[i]
                while a >= 0:
                    mask[r, slot[a]] = True
                    a = parents[a]
                mask[r, used + r] = True
            out, k, v = self.net(
                pf.unsqueeze(0),
                e.unsqueeze(0),
                pos,
                (self._k[:, :, :used], self._v[:, :, :used]),
                mask.view(1, 1, m, used + m),
            )
            self._k[:, :, used : used + m], self._v[:, :, used : used + m] = k, v
            for r, i in enumerate(expand):
                feat[i], slot[i] = out[0, r], used + r
            used += m
            ctop, cidx = self._top(out[0])  # [m, k]
            frontier = []
            for r, i in enumerate(expand):
                for c in range(ctop.shape[1]):
                    tokens.append(self.ids[cidx[r, c]])
                    parents.append(i)
                    scores.append(scores[i] + float(ctop[r, c]))
                    depths.append(d + 1)
                    frontier.append(len(tokens) - 1)
        order = best()
        if self.cut is not None:
            order = order[: self.cut([math.exp(scores[i]) for i in order])]
        keep = sorted(order, key=lambda i: (depths[i], i))
        new = {old: j for j, old in enumerate(keep)}
        toks = torch.stack([tokens[i] for i in keep]).cpu()
        par = torch.tensor(
            [-1 if parents[i] < 0 else new[parents[i]] for i in keep], dtype=torch.long
        )
        return Draft(toks, par)


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .parts.store import find_drafter

    d = find_drafter(model, "eagle", opts.drafter)
    cfg = dict(d.config)
    topk = int(cfg.pop("topk", 4))
    net = EagleNet(**cfg)
    net.load_state_dict({k[4:]: v.float() for k, v in d.tensors.items() if k.startswith("net.")})
    budget = opts.draft_len or 16
    ids = trained_vocab(model, opts, tokenizer, d.tensors["vocab_ids"].long())
    # the tree is cut to the size that maximises expected tokens per second on this machine
    cost = target_costs(model) if opts.tree_cut else None
    drafter = EagleDrafter(model, net, ids, topk=topk, cost=cost)
    return Method("eagle", [drafter], FixedPolicy(drafter, budget), budget, opts.acceptance)


SPEC = MethodSpec(
    name="eagle", lossless=True, build=build, native_only=True, drafter_kind="eagle", order=12,
    summary="EAGLE-2: a one-layer feature drafter grows a dynamic tree by draft confidence",
)
