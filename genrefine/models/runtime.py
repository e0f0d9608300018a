"""The native decoder runtime: Llama, Qwen2, Qwen3, Mistral, Gemma 2/3 in plain PyTorch.

Built for draft-and-verify rather than for training: a forward over any set of new tokens at
caller-given positions with an optional tree mask among them, on top of a preallocated
:class:`KVCache`; hidden states of chosen layers; a chosen subset of layers; logits only for the
rows that need them, optionally over a reduced vocabulary. Checked against transformers' logits in
``tests/test_runtime.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import ModelOutput
from .attention import BLOCK, BlockPlan, blocked_attention, plan_blocks
from .cache import KVCache
from .config import ModelConfig
from .invariance import probe_attention, probe_splits, split_linear
from ..kernels import (
    attend, fused_layer, layer_arguments, layer_stack, load_extension, rmsnorm, rope, run_layer_stack,
    run_layer_stack_batch,
)
from .quant import QuantWeight


@dataclass
class LayerWeights:
    qkv: Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: Tensor | None
    o: Tensor  # [hidden, heads * head_dim]
    o_bias: Tensor | None
    gate_up: Tensor  # [2 * intermediate, hidden]
    gate_up_bias: Tensor | None
    down: Tensor  # [hidden, intermediate]
    down_bias: Tensor | None
    input_norm: Tensor  # [hidden] float32 (1 + w for Gemma)
    post_attn_norm: Tensor  # [hidden] float32
    pre_ffn_norm: Tensor | None  # [hidden] float32, sandwich norms only
    post_ffn_norm: Tensor | None
    q_norm: Tensor | None  # [head_dim] float32
    k_norm: Tensor | None


class ReducedHead:
    """An output projection restricted to a subset of the vocabulary (for drafting).

    Logits it produces are indexed by position in ``ids``; ``ids[j]`` is the real token id.
    """

    def __init__(self, ids: Tensor, weight: Tensor) -> None:
        self.ids = ids  # [v] long
        self.weight = weight  # [v, hidden]


@dataclass
class ExactRows:
    """What :func:`genrefine.kernels.attend` needs to give each row exactly one-token decoding's
    attention: the new tokens' first slot, their positions, the tree mask (None: a causal chain)
    and the sliding window (None: global)."""

    start: int
    positions: Tensor
    tree: Tensor | None
    window: int | None


EXACT_ROWS_MAX = 64  # forwards of up to this many tokens use bitwise-exact attention (see forward)


class NativeModel:
    """A decoder-only transformer running on explicit weights.

    Construct with :meth:`from_state_dict` (transformers' parameter names) or :meth:`from_hf`.
    """

    supports_trees = True

    def __init__(
        self,
        config: ModelConfig,
        embed: Tensor,
        layers: list[LayerWeights],
        final_norm: Tensor,
        lm_head: Tensor,
        rope: dict[str, tuple[Tensor, float]],
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
    ) -> None:
        self.config = config
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.final_norm = final_norm  # [hidden] float32
        self.lm_head = lm_head  # [vocab, hidden], may share storage with embed
        self.rope = rope  # key -> (inv_freq [head_dim / 2] float32, attention scaling)
        self.dtype = dtype
        self.device = device
        self.name = name
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_layers
        self.hidden_size = config.hidden_size
        self.max_context = config.max_position_embeddings
        # Gemma multiplies embeddings by sqrt(hidden) rounded to the weights' dtype
        self._embed_scale = torch.tensor(config.embed_scale, dtype=dtype, device=device)
        self._act = (
            (lambda x: F.gelu(x, approximate="tanh")) if config.activation == "gelu_tanh" else F.silu
        )
        self._rope_keys = sorted(set(config.layer_rope))
        self._windows = sorted({w for w in config.layer_windows if w is not None})
        # reduction splits that make each weight's matmul batch-invariant (see invariance.py)
        self._splits: dict[tuple[int, int], int] = {}
        self.bitwise_exact = False
        self.attn_block = BLOCK  # key slots per block of the exact attention (attention.py)
        self.quantized = isinstance(lm_head, QuantWeight) or any(
            isinstance(w, QuantWeight) for lw in layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down)
        )
        # the KV cache and attention: the weights' dtype; quantized models pick theirs in
        # _calibrate (bfloat16 where float32 attention is not batch-invariant, as llama.cpp keeps
        # its cache in float16)
        self.attn_dtype = dtype
        self.exact_attention = False  # the C++ exact attention (quantized float32 models)
        # one C++ call per layer (genrefine.kernels.layer) where every step of it has a C++
        # kernel: quantized weights without biases, exact float32 attention; set in _calibrate,
        # and a test turns it off to compare with the op-by-op path
        self.fused_layers = False
        self._fused_args: dict[int, tuple] = {}
        self._stack = None  # every layer bound once for one call per forward (see _fused_stack)
        # seconds spent in matmuls ("weights") and attention while ``phase_seconds`` is a dict
        # (the bench sets it; None: not measured)
        self.phase_seconds: dict[str, float] | None = None
        # float32 rows on the CPU take the one-call RMSNorm and rotary kernels (genrefine.kernels)
        # in place of 5-7 small ops each: quantized models always (their exactness is built on
        # them), float32 ones where the extension builds (rotary: the same bits; the norm: its
        # own fixed summation order, so rows differ from the op-by-op path in rounding only)
        self.row_kernels = self.quantized or (
            dtype == torch.float32 and torch.device(device).type == "cpu" and load_extension(quiet=True)
        )
        if dtype in (torch.bfloat16, torch.float16) or self.quantized:
            self._calibrate()

    @property
    def weights_format(self) -> str:
        """What the matmuls run on: the dtype, or the GGUF block formats of quantized weights."""
        if not self.quantized:
            return str(self.dtype).replace("torch.", "")
        fmts = set()
        for w in [self.lm_head] + [x for lw in self.layers for x in (lw.qkv, lw.o, lw.gate_up, lw.down)]:
            fmts.update(w.formats if isinstance(w, QuantWeight) else [str(w.dtype).replace("torch.", "")])
        return "quantized:" + "+".join(sorted(f.upper() for f in fmts))

    def _calibrate(self) -> None:
        """Probe (once per machine, cached) how to make every float matmul batch-invariant;
        quantized weights are batch-invariant by construction (genrefine.kernels)."""
        weights = {}
        for w in [self.lm_head] + [x for lw in self.layers for x in (lw.qkv, lw.o, lw.gate_up, lw.down)]:
            if not isinstance(w, QuantWeight):
                weights.setdefault(tuple(w.shape), w)
        found = probe_splits(weights, self._activations) if weights else {}  # on a cache miss only
        self._splits = {shape: s for shape, s in found.items() if s not in (None, 1)}
        c = self.config

        def attention_exact(dt: torch.dtype) -> bool:
            return probe_attention(c.num_heads, c.num_kv_heads, c.head_dim, self.attn_block, dt, self.device)

        c = self.config
        if (
            self.quantized
            and self.dtype == torch.float32
            and c.head_dim % 16 == 0
            and c.num_heads // c.num_kv_heads <= 8
            and load_extension(quiet=True)
        ):
            self.exact_attention = True  # genrefine.kernels.attend: exact by construction
            exact = True
        else:
            exact = attention_exact(self.dtype)
            if not exact and self.quantized and attention_exact(torch.bfloat16):
                self.attn_dtype, exact = torch.bfloat16, True
        self.bitwise_exact = all(s is not None for s in found.values()) and exact
        self.fused_layers = self.exact_attention and self.attn_dtype == torch.float32 and all(
            all(isinstance(w, QuantWeight) for w in (lw.qkv, lw.o, lw.gate_up, lw.down))
            and all(b is None for b in (lw.qkv_bias, lw.o_bias, lw.gate_up_bias, lw.down_bias))
            for lw in self.layers
        )

    def _activations(self, rows: int = 128) -> dict[tuple[int, int], Tensor]:
        """What enters each weight shape's matmul in a forward over ``rows`` random tokens
        (weight shape -> [rows * uses, K]): the invariance probe's realistic inputs."""
        rows = min(rows, self.max_context)
        tokens = torch.randint(
            0, self.vocab_size, (rows,), generator=torch.Generator().manual_seed(0)
        ).to(self.device)
        seen: dict[tuple[int, int], list[Tensor]] = {}

        def record(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            if isinstance(weight, QuantWeight):
                return weight.linear(x) if bias is None else weight.linear(x) + bias
            seen.setdefault(tuple(weight.shape), []).append(x.reshape(-1, x.shape[-1]))
            return F.linear(x, weight, bias)

        self._linear = record  # type: ignore[method-assign]
        try:
            self.forward(tokens, self.new_cache(rows), exact=False)
        finally:
            del self._linear
        return {shape: torch.cat(xs) for shape, xs in seen.items()}

    def _linear(self, x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None) -> Tensor:
        return self._timed("weights", self._linear_untimed, x, weight, bias)

    def _linear_untimed(self, x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None) -> Tensor:
        if isinstance(weight, QuantWeight):
            y = weight.linear(x)
            return y if bias is None else y + bias
        split = self._splits.get(tuple(weight.shape))
        if split is None:
            return F.linear(x, weight, bias)
        return split_linear(x, weight, bias, split)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_state_dict(
        config: ModelConfig,
        sd: dict[str, Tensor],
        rope: dict[str, tuple[Tensor, float]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        name: str = "model",
        quantized: dict[str, QuantWeight] | None = None,
    ) -> "NativeModel":
        """Build from transformers-style parameter names (``model.layers.0.self_attn.q_proj...``).

        ``quantized``: weights under the same names to run quantized (see quant.py); they take
        the place of the float ones in ``sd``, which may then lack them.
        """
        device = torch.device(device)
        quantized = quantized or {}

        def w(key: str) -> Tensor:
            if key in quantized:
                return quantized[key]  # type: ignore[return-value]
            return sd[key].to(device=device, dtype=dtype).contiguous()

        def cat(parts: list) -> Tensor:
            if any(isinstance(p, QuantWeight) for p in parts):
                if not all(isinstance(p, QuantWeight) for p in parts):
                    raise ValueError("a fused projection mixes quantized and float weights")
                return QuantWeight.cat(parts)  # type: ignore[return-value]
            return torch.cat(parts)

        def norm(key: str) -> Tensor:
            t = sd[key].to(device=device, dtype=torch.float32)
            return (1.0 + t) if config.norm_offset else t

        def opt(key: str) -> Tensor | None:
            return w(key) if key in sd else None

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            qkv = cat([w(a + "q_proj.weight"), w(a + "k_proj.weight"), w(a + "v_proj.weight")])
            qkv_b = None
            if config.qkv_bias:
                qkv_b = torch.cat([w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")])
            gu_b = None
            if config.mlp_bias:
                gu_b = torch.cat([w(m + "gate_proj.bias"), w(m + "up_proj.bias")])
            layers.append(
                LayerWeights(
                    qkv=qkv,
                    qkv_bias=qkv_b,
                    o=w(a + "o_proj.weight"),
                    o_bias=opt(a + "o_proj.bias") if config.o_bias else None,
                    gate_up=cat([w(m + "gate_proj.weight"), w(m + "up_proj.weight")]),
                    gate_up_bias=gu_b,
                    down=w(m + "down_proj.weight"),
                    down_bias=opt(m + "down_proj.bias") if config.mlp_bias else None,
                    input_norm=norm(p + "input_layernorm.weight"),
                    post_attn_norm=norm(p + "post_attention_layernorm.weight"),
                    pre_ffn_norm=norm(p + "pre_feedforward_layernorm.weight")
                    if config.sandwich_norm
                    else None,
                    post_ffn_norm=norm(p + "post_feedforward_layernorm.weight")
                    if config.sandwich_norm
                    else None,
                    q_norm=norm(a + "q_norm.weight") if config.qk_norm else None,
                    k_norm=norm(a + "k_norm.weight") if config.qk_norm else None,
                )
            )
        embed = w("model.embed_tokens.weight")
        if config.tie_embeddings or ("lm_head.weight" not in sd and "lm_head.weight" not in quantized):
            lm_head = embed
        else:
            lm_head = w("lm_head.weight")
        rope_dev = {k: (inv.to(device), s) for k, (inv, s) in rope.items()}
        return NativeModel(
            config, embed, layers, norm("model.norm.weight"), lm_head, rope_dev, dtype, device, name
        )

    @staticmethod
    def from_hf(hf_model, dtype: torch.dtype = torch.float32, device="cpu") -> "NativeModel":
        """Build from a loaded transformers model (tests and conversion)."""
        from .config import from_hf_config, rope_tables

        cfg = from_hf_config(hf_model.config)
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        return NativeModel.from_state_dict(
            cfg, sd, rope_tables(hf_model.config, cfg.layer_rope), dtype, device
        )

    # ------------------------------------------------------------------ interface
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A preallocated cache for ``capacity`` tokens (default: the model's context)."""
        c = self.config
        cap = min(capacity or self.max_context, self.max_context)
        return KVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, cap, self.attn_dtype, self.device, self.attn_block
        )

    def reduced_head(self, ids: Tensor) -> ReducedHead:
        """Output projection restricted to token ids ``ids`` ([v] long), built once."""
        ids = ids.to(self.device, torch.long)
        return ReducedHead(ids, self.lm_head.index_select(0, ids).contiguous())

    def embed_tokens(self, tokens: Tensor, scaled: bool = True) -> Tensor:
        """[n] long -> [n, hidden], scaled as the model does (``scaled=False``: the stored rows,
        as a serving engine's embedding module returns them)."""
        if isinstance(self.embed, QuantWeight):
            x = self.embed.rows(tokens.reshape(-1)).reshape(*tokens.shape, self.hidden_size)
        else:
            x = F.embedding(tokens, self.embed)
        if scaled and self.config.embed_scale != 1.0:
            x = x * self._embed_scale
        return x

    def project(self, hidden: Tensor, head: ReducedHead | Tensor | None = None) -> Tensor:
        """Final norm + output projection. hidden: [m, hidden] residual -> [m, v] float32 logits."""
        h = self._norm(hidden, self.final_norm)
        weight = self.lm_head
        if isinstance(head, ReducedHead):
            weight = head.weight
        elif head is not None:
            weight = self.lm_head.index_select(0, head.to(self.device))
        logits = self._linear(h, weight, None).float()
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        cache: KVCache,
        positions: Tensor | None = None,
        tree_mask: Tensor | None = None,
        logits_rows: Tensor | None = None,
        hidden_layers: Sequence[int] = (),
        layers: Sequence[int] | None = None,
        vocab_subset: ReducedHead | Tensor | None = None,
        exact: bool | None = None,
    ) -> ModelOutput:
        """Run ``tokens`` ([n] long) on top of the cached prefix and append them to the cache.

        positions: [n] long, default ``cache.length + arange(n)``.
        tree_mask: [n, n] bool, new token i may attend to new token j; default causal.
        logits_rows: [m] long rows that need logits (None: all; empty: none).
        hidden_layers: return the residual stream after these many layers (0 = embeddings,
            num_layers = after the final norm).
        layers: run only these layer indices (ascending); skipped layers pass the residual
            through and leave their cache slots unwritten.
        vocab_subset: project only onto these token ids (a :class:`ReducedHead` is cached).
        exact: use blocked attention (see attention.py), whose rows equal one-token decoding
            bit for bit, so that with batch-invariant matmuls every row of a verification
            forward is exactly what sequential decoding computes. Default: on for up to
            ``EXACT_ROWS_MAX`` tokens (decoding and verification) when :attr:`bitwise_exact`
            (the matmuls were made batch-invariant, see invariance.py); off otherwise (float32
            here, prefill chunks), where fused attention is used.
        """
        n = int(tokens.shape[0])
        start = cache.reserve(n)
        total = start + n
        if positions is None:
            positions = torch.arange(start, total, device=self.device)
        c = self.config
        x = self.embed_tokens(tokens.to(self.device))  # [n, hidden]
        rope = self._rope_cos_sin(positions)
        if exact is None:
            exact = self.bitwise_exact and n <= EXACT_ROWS_MAX
        masks = self._masks(positions, tree_mask, start, n, exact)
        hidden: dict[int, Tensor] = {}
        want = set(hidden_layers)
        if 0 in want:
            hidden[0] = x
        run = range(c.num_layers) if layers is None else layers
        whole = layers is None and not (want - {0, c.num_layers})
        if whole and self.fused_layers and isinstance(masks[None], ExactRows):
            x = self._fused_stack(x, cache, rope, masks[None])
        else:
            for i in run:
                x = self._layer(i, x, cache, start, total, rope[c.layer_rope[i]], masks[c.layer_windows[i]])
                if (i + 1) in want and (i + 1) < c.num_layers:
                    hidden[i + 1] = x
        cache.length = total
        rows = x if logits_rows is None else x.index_select(0, logits_rows.to(self.device))
        logits = self.project(rows, vocab_subset) if rows.shape[0] else None
        if c.num_layers in want:
            hidden[c.num_layers] = self._norm(x, self.final_norm)
        return ModelOutput(logits=logits, hidden=hidden)

    # ------------------------------------------------------------------ batched
    @torch.inference_mode()
    def forward_batch(self, items: Sequence) -> list[Tensor]:
        """One forward for the new tokens of several sequences, each on its own cache.

        ``items``: objects with ``tokens`` ([n_i] long), ``cache``, ``positions`` ([n_i] long or
        None) and ``tree_mask`` ([n_i, n_i] bool or None), as :meth:`forward` takes them. The rows
        of all sequences are concatenated for everything that works row by row (embeddings,
        norms, projections, MLP, head: each weight is read once), attention runs per sequence
        against its own cache with the plan :meth:`forward` would use. Appends each sequence's
        tokens to its cache; returns each sequence's logits ([n_i, vocab] float32). Rows equal
        each sequence's own :meth:`forward` bit for bit as far as the matmuls are
        batch-invariant (:mod:`genrefine.models.batched` decides when to rely on that).
        """
        c = self.config
        sizes = [int(it.tokens.shape[0]) for it in items]
        starts = [it.cache.reserve(n) for it, n in zip(items, sizes)]
        seqs = []
        ropes = []
        for it, n, start in zip(items, sizes, starts):
            pos = it.positions
            if pos is None:
                pos = torch.arange(start, start + n, device=self.device)
            exact = bool(self.bitwise_exact) and n <= EXACT_ROWS_MAX  # what forward would pick
            seqs.append((it.cache, start, start + n, self._masks(pos, it.tree_mask, start, n, exact)))
            ropes.append(self._rope_cos_sin(pos))  # per sequence, as its own forward computes
        rope = {
            key: (torch.cat([r[key][0] for r in ropes]), torch.cat([r[key][1] for r in ropes]))
            for key in ropes[0]
        }  # key -> cos, sin: [N, head_dim]
        tokens = torch.cat([it.tokens.to(self.device) for it in items])  # [N]
        x = self.embed_tokens(tokens)  # [N, hidden]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        if self.fused_layers and all(isinstance(m[None], ExactRows) for *_, m in seqs):
            x = self._fused_stack_batch(x, seqs, sizes, rope)
        else:
            for i in range(c.num_layers):
                x = self._batched_layer(i, x, seqs, offsets, rope[c.layer_rope[i]])
        for cache, _, total, _ in seqs:
            cache.length = total
        logits = self.project(x)  # [N, V] float32
        return [logits[offsets[j] : offsets[j + 1]] for j in range(len(items))]

    def _fused_stack_batch(self, x: Tensor, seqs, sizes: list[int], rope) -> Tensor:
        """Every layer in one C++ call for the concatenated rows of several sequences
        (:func:`genrefine.kernels.run_layer_stack_batch`): what :meth:`_batched_layer` does layer
        by layer, with :meth:`_fused_stack`'s kernels, so each sequence's rows are those of its
        own forward."""
        stack, windows, ropes = self._layer_stack()
        masks = [m[None] for *_, m in seqs]
        timing = self._new_timing()
        out = run_layer_stack_batch(
            stack, x, [cache.keys for cache, *_ in seqs], [cache.values for cache, *_ in seqs],
            [m.start for m in masks], [m.positions for m in masks], [m.tree for m in masks], sizes,
            windows, ropes, [rope[k][0] for k in self._rope_keys], [rope[k][1] for k in self._rope_keys],
            timing,
        )
        self._add_timing(timing)
        return out

    def _batched_layer(self, i: int, x: Tensor, seqs, offsets: list[int], rope) -> Tensor:
        """Layer ``i`` on the concatenated rows ``x`` [N, hidden]: projections and MLP over all
        rows, attention per sequence (the pieces of :meth:`_layer`)."""
        c = self.config
        N = x.shape[0]
        window = c.layer_windows[i]
        q, k, v = self._qkv(i, x, rope, queries=True)  # [H, N, D], [KV, N, D], [KV, N, D]
        parts = []
        for j, (cache, start, total, masks) in enumerate(seqs):
            rows = slice(offsets[j], offsets[j + 1])
            cache.keys[i][:, start:total] = k[:, rows]
            cache.values[i][:, start:total] = v[:, rows]
            parts.append(self._attend(i, q[:, rows], cache, total, masks[window]))
        att = torch.cat(parts, dim=1).transpose(0, 1).reshape(N, c.num_heads * c.head_dim)
        att = att.to(self.dtype)
        return self._finish_layer(i, x, att)

    # ------------------------------------------------------------------ layer-by-layer
    @torch.inference_mode()
    def run_layers(self, x: Tensor, cache: KVCache, start: int, layers: Sequence[int]) -> Tensor:
        """Run ``layers`` (ascending) on the residual stream ``x`` [n, hidden] of new tokens at
        slots and positions ``start .. start + n - 1`` (causal among them); returns [n, hidden].

        Writes those layers' cache slots but leaves ``cache.length`` alone: a caller stepping
        through the layers in groups (early exit) reserves the slots first and sets the length
        when the tokens are done. ``x`` for the first group is :meth:`embed_tokens`.
        """
        n = int(x.shape[0])
        if start + n > cache.capacity:
            raise ValueError(f"KV cache full: slots {start}..{start + n - 1} exceed {cache.capacity}")
        c = self.config
        positions = torch.arange(start, start + n, device=self.device)
        rope = self._rope_cos_sin(positions)
        masks = self._masks(positions, None, start, n)
        for i in layers:
            x = self._layer(i, x, cache, start, start + n, rope[c.layer_rope[i]], masks[c.layer_windows[i]])
        return x

    @torch.inference_mode()
    def write_kv(self, x: Tensor, cache: KVCache, start: int, layers: Sequence[int]) -> None:
        """Fill the key/value slots ``start .. start + n - 1`` of ``layers`` as if ``x``
        [n, hidden] were the residual stream entering each of them (nothing else is computed).

        This is CALM's state propagation: after an early exit the exit layer's hidden state
        stands in for the skipped layers' inputs, so later tokens find their cache filled.
        """
        n = int(x.shape[0])
        c = self.config
        rope = self._rope_cos_sin(torch.arange(start, start + n, device=self.device))
        for i in layers:
            _, k, v = self._qkv(i, x, rope[c.layer_rope[i]], queries=False)
            cache.keys[i][:, start : start + n] = k
            cache.values[i][:, start : start + n] = v

    # ------------------------------------------------------------------ internals
    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """RMSNorm over the last dim in float32; weight already holds (1 + w) for Gemma."""
        if self.row_kernels and x.dtype == torch.float32 and (self.quantized or x.shape[-1] % 16 == 0):
            return rmsnorm(x, weight, self.config.rms_norm_eps)  # one call, same rounding per row
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        if self.config.norm_offset:
            return (xf * weight).to(x.dtype)
        return weight.to(x.dtype) * xf.to(x.dtype)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotary embedding of x [H, n, D]; float32 rows on the CPU use the one-call kernel
        (:attr:`row_kernels`), which computes the same expression to the bit."""
        if self.row_kernels and x.dtype == torch.float32 and cos.dtype == torch.float32:
            return rope(x, cos, sin)
        return x * cos + _rotate_half(x) * sin

    def _rope_cos_sin(self, positions: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        pos = positions.to(self.device, torch.float32)
        for key in self._rope_keys:
            inv, scale = self.rope[key]
            freqs = pos[:, None] * inv[None, :]  # [n, head_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [n, head_dim]
            cos = (emb.cos() * scale).to(self.dtype)
            sin = (emb.sin() * scale).to(self.dtype)
            out[key] = (cos, sin)
        return out

    def _masks(
        self, positions: Tensor, tree_mask: Tensor | None, start: int, n: int, exact: bool = False
    ) -> dict:
        """Per window size: a :class:`BlockPlan` with ``exact``, else (first visible slot, bool
        mask [n, visible slots] or None) for fused attention."""
        pos = positions.to(self.device)
        if exact:
            chain = tree_mask is None and bool(
                (pos.cpu() == torch.arange(start, start + n)).all()
            )
            tm = None if chain else tree_mask
            if tm is None and not chain:
                tm = torch.ones(n, n, dtype=torch.bool).tril_()
            if self.exact_attention:
                return {w: ExactRows(start, pos.cpu(), tm, w) for w in [None, *self._windows]}
            return {
                w: plan_blocks(pos, start, tm, w, self.attn_block) for w in [None, *self._windows]
            }
        masks: dict[int | None, tuple[int, Tensor | None]] = {}
        if n == 1 and tree_mask is None:
            masks[None] = (0, None)
            for w in self._windows:
                masks[w] = (max(0, start + 1 - w), None)
            return masks
        if tree_mask is None:
            new = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
        else:
            new = tree_mask.to(self.device, torch.bool)
        full = torch.cat([torch.ones(n, start, dtype=torch.bool, device=self.device), new], dim=1)
        masks[None] = (0, full)
        if self._windows:
            key_pos = torch.cat([torch.arange(start, device=self.device), pos])  # [start + n]
            dist = pos[:, None] - key_pos[None, :]  # [n, start + n]
            min_pos = int(pos.min())
            for w in self._windows:
                first = max(0, min_pos + 1 - w)
                m = full & (dist < w)
                masks[w] = (first, m[:, first:])
        return masks

    def _qkv(
        self, i: int, x: Tensor, rope: tuple[Tensor, Tensor], queries: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Layer ``i``'s rotated queries ([H, n, D], None unless ``queries``), keys and values
        ([KV, n, D]) for the residual stream ``x`` [n, hidden] entering the layer."""
        c = self.config
        lw = self.layers[i]
        n = x.shape[0]
        hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        h = self._norm(x, lw.input_norm)
        if queries:
            qkv = self._linear(h, lw.qkv, lw.qkv_bias)  # [n, (H + 2 KV) * D]
            q, k, v = torch.split(qkv, [nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:  # only the key/value rows of the fused projection
            bias = None if lw.qkv_bias is None else lw.qkv_bias[nh * hd :]
            w = lw.qkv.row_range(nh * hd) if isinstance(lw.qkv, QuantWeight) else lw.qkv[nh * hd :]
            if isinstance(w, QuantWeight):
                kv = w.linear(h) if bias is None else w.linear(h) + bias
            else:
                kv = F.linear(h, w, bias)
            k, v = torch.split(kv, [nkv * hd, nkv * hd], dim=-1)
            q = None
        k = k.view(n, nkv, hd).transpose(0, 1)  # [KV, n, D]
        v = v.view(n, nkv, hd).transpose(0, 1)
        cos, sin = rope
        if q is not None:
            q = q.view(n, nh, hd).transpose(0, 1)  # [H, n, D]
            if lw.q_norm is not None:
                q = self._norm(q, lw.q_norm)
            q = self._rope(q, cos, sin)
        if lw.k_norm is not None:
            k = self._norm(k, lw.k_norm)
        k = self._rope(k, cos, sin)
        if self.attn_dtype != self.dtype:
            q = None if q is None else q.to(self.attn_dtype)
            k, v = k.to(self.attn_dtype), v.to(self.attn_dtype)
        return q, k, v

    def _attention(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        """q: [H, n, D], keys/values: [KV, S, D], mask: [n, S] bool or None -> [H, n, D]."""
        c = self.config
        if c.attn_logit_softcap:
            return _softcap_attention(q, keys, values, mask, c.attn_scale, c.attn_logit_softcap)
        return F.scaled_dot_product_attention(
            q.unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            scale=c.attn_scale,
            enable_gqa=c.num_heads != c.num_kv_heads,
        )[0]

    def _layer(
        self,
        i: int,
        x: Tensor,
        cache: KVCache,
        start: int,
        total: int,
        rope: tuple[Tensor, Tensor],
        mask: tuple[int, Tensor | None],
    ) -> Tensor:
        c = self.config
        n = x.shape[0]
        hd, nh = c.head_dim, c.num_heads
        if self.fused_layers and isinstance(mask, ExactRows):
            return self._fused_layer(i, x, cache, start, rope, mask)
        q, k, v = self._qkv(i, x, rope, queries=True)
        cache.keys[i][:, start:total] = k
        cache.values[i][:, start:total] = v
        att = self._attend(i, q, cache, total, mask)
        return self._finish_layer(i, x, att.transpose(0, 1).reshape(n, nh * hd).to(self.dtype))

    def _fused_stack(
        self, x: Tensor, cache: KVCache, rope: dict[str, tuple[Tensor, Tensor]], mask: ExactRows
    ) -> Tensor:
        """Every layer in one C++ call (:func:`genrefine.kernels.run_layer_stack`): what
        :meth:`_fused_layer` does layer by layer, the same bits, without a call per layer."""
        stack, windows, ropes = self._layer_stack()
        timing = self._new_timing()
        out = run_layer_stack(
            stack, x, 0, self.config.num_layers, cache.keys, cache.values, mask.start, mask.positions,
            mask.tree, windows, ropes, [rope[k][0] for k in self._rope_keys],
            [rope[k][1] for k in self._rope_keys], timing,
        )
        self._add_timing(timing)
        return out

    def _layer_stack(self) -> tuple:
        """(:func:`genrefine.kernels.layer_stack` of every layer, each layer's window (0: all),
        each layer's index into ``_rope_keys``), built once."""
        c = self.config
        if self._stack is None:
            args = [self._layer_args(i) for i in range(c.num_layers)]
            self._stack = (
                layer_stack(args, c.num_heads, c.num_kv_heads, c.head_dim, c.activation == "gelu_tanh",
                            c.rms_norm_eps, c.attn_scale, c.attn_logit_softcap),
                [int(w or 0) for w in c.layer_windows],
                [self._rope_keys.index(r) for r in c.layer_rope],
            )
        return self._stack

    def _new_timing(self) -> Tensor | None:
        """What the C++ layers add their seconds to (float64 [matmuls, attention]) while
        ``phase_seconds`` is measured, else None."""
        return torch.zeros(2, dtype=torch.float64) if self.phase_seconds is not None else None

    def _add_timing(self, timing: Tensor | None) -> None:
        """Seconds the C++ layers measured (float64 [matmuls, attention]) into ``phase_seconds``."""
        if timing is not None:
            ph = self.phase_seconds
            ph["weights"] = ph.get("weights", 0.0) + float(timing[0])
            ph["attention"] = ph.get("attention", 0.0) + float(timing[1])

    def _layer_args(self, i: int) -> tuple:
        """:func:`genrefine.kernels.layer_arguments` of layer ``i``, built once."""
        args = self._fused_args.get(i)
        if args is None:
            lw = self.layers[i]
            args = layer_arguments(
                [lw.qkv, lw.o, lw.gate_up, lw.down],
                [lw.input_norm, lw.post_attn_norm, lw.pre_ffn_norm, lw.post_ffn_norm, lw.q_norm, lw.k_norm],
            )
            self._fused_args[i] = args
        return args

    def _fused_layer(
        self, i: int, x: Tensor, cache: KVCache, start: int, rope: tuple[Tensor, Tensor], mask: ExactRows
    ) -> Tensor:
        """Layer ``i`` in one C++ call (:func:`genrefine.kernels.layer`): the same kernels in the
        same order as the op-by-op path below, so the same bits, without its Python overhead."""
        args = self._layer_args(i)
        c = self.config
        timing = self._new_timing()
        cos, sin = rope
        out = fused_layer(
            x, args, c.rms_norm_eps, cache.keys[i], cache.values[i], mask.start, mask.positions,
            mask.tree, mask.window, c.attn_scale, c.attn_logit_softcap, cos, sin, c.num_heads,
            c.num_kv_heads, c.head_dim, c.activation == "gelu_tanh", timing,
        )
        self._add_timing(timing)
        return out

    def _attend(self, i: int, q: Tensor, cache: KVCache, total: int, mask) -> Tensor:
        """Layer ``i``'s attention of q [H, n, D] over ``cache`` (slots below ``total`` filled),
        with ``mask`` from :meth:`_masks`: a :class:`BlockPlan` (bitwise-exact blocked
        attention) or (first visible slot, [n, S] bool or None) for fused attention."""
        if isinstance(mask, ExactRows):
            c = self.config
            return self._timed("attention", attend, q, cache.keys[i], cache.values[i], mask.start,
                               mask.positions, mask.tree, mask.window, c.attn_scale,
                               c.attn_logit_softcap)
        return self._timed("attention", self._attend_untimed, i, q, cache, total, mask)

    def _timed(self, phase: str, fn, *args):
        """``fn(*args)``, its seconds added to ``phase_seconds[phase]`` while that is measured."""
        if self.phase_seconds is None:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - t0
        return out

    def _attend_untimed(self, i: int, q: Tensor, cache: KVCache, total: int, mask) -> Tensor:
        c = self.config
        if isinstance(mask, BlockPlan):  # bitwise-exact: rows as one-token decoding computes them
            return blocked_attention(
                q, cache.keys[i], cache.values[i], mask, c.attn_scale, c.attn_logit_softcap
            )
        first, m = mask
        keys = cache.keys[i][:, first:total]  # [KV, S, D]
        values = cache.values[i][:, first:total]
        return self._attention(q, keys, values, m)

    def _finish_layer(self, i: int, x: Tensor, att: Tensor) -> Tensor:
        """Layer ``i`` after attention: output projection, norms, MLP, residuals.
        x: [n, hidden] residual entering the layer, att: [n, H * D] -> [n, hidden]."""
        lw = self.layers[i]
        a = self._linear(att, lw.o, lw.o_bias)
        if lw.pre_ffn_norm is not None:
            x = x + self._norm(a, lw.post_attn_norm)
            h = self._norm(x, lw.pre_ffn_norm)
        else:
            x = x + a
            h = self._norm(x, lw.post_attn_norm)
        gu = self._linear(h, lw.gate_up, lw.gate_up_bias)
        gate, up = gu.chunk(2, dim=-1)
        mlp = self._linear(self._act(gate) * up, lw.down, lw.down_bias)
        if lw.post_ffn_norm is not None:
            mlp = self._norm(mlp, lw.post_ffn_norm)
        return x + mlp


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _softcap_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float
) -> Tensor:
    """Attention with tanh soft-capped scores (Gemma 2). q: [H, n, D], k/v: [KV, S, D]."""
    rep = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(rep, dim=0)
    v = v.repeat_interleave(rep, dim=0)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [H, n, S]
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype)) @ v
