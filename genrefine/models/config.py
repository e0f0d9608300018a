"""One family-agnostic description of a decoder-only transformer.

Behaviour is driven by these fields (norm style, sandwich norms, QK-norm, windows...), never by
matching model names. :func:`from_hf_config` maps a transformers config onto it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

# transformers ``model_type`` values whose architecture the native runtime implements
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2")
_SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    activation: str  # "silu" | "gelu_tanh"
    norm_offset: bool  # Gemma: x * (1 + w) in float32; otherwise w * x
    sandwich_norm: bool  # Gemma 2/3: norms after attention and after the MLP as well
    qk_norm: bool  # Qwen3, Gemma 3: RMSNorm on each head's queries and keys
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    embed_scale: float  # Gemma: sqrt(hidden_size); 1.0 otherwise
    attn_scale: float  # multiplies q.k
    layer_windows: tuple[int | None, ...]  # sliding window per layer, None = global attention
    layer_rope: tuple[str, ...]  # which rotary table each layer uses
    tie_embeddings: bool
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "ModelConfig":
        d = json.loads(text)
        d["layer_windows"] = tuple(d["layer_windows"])
        d["layer_rope"] = tuple(d["layer_rope"])
        return ModelConfig(**d)


class UnsupportedArchitecture(Exception):
    """The native runtime does not implement this config (the generic adapter is used)."""


def _rope_params(hf_config, layer_type: str | None) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if "rope_type" in params or "rope_theta" in params:
        return params
    # older configs
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    out = {"rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
    out.update(scaling)
    out.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return out


def rope_tables(hf_config, layer_keys: tuple[str, ...]) -> dict[str, tuple]:
    """Inverse frequencies and attention scaling for each rotary table, via transformers."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    tables = {}
    for key in sorted(set(layer_keys)):
        layer_type = None if key == "global" else key
        params = _rope_params(hf_config, layer_type)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params["rope_theta"]
            inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:
            fn = ROPE_INIT_FUNCTIONS[rope_type]
            try:
                inv, scale = fn(hf_config, "cpu", layer_type=layer_type)
            except TypeError:
                inv, scale = fn(hf_config, "cpu")
        tables[key] = (inv.float(), float(scale))
    return tables


def from_hf_config(hf_config) -> ModelConfig:
    """Map a transformers config onto :class:`ModelConfig`, or raise UnsupportedArchitecture."""
    mt = getattr(hf_config, "model_type", None)
    if mt not in NATIVE_MODEL_TYPES:
        raise UnsupportedArchitecture(f"model_type {mt!r} has no native runtime")
    n_layers = hf_config.num_hidden_layers
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    gemma = mt in ("gemma3_text", "gemma2")
    layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * n_layers
    window = getattr(hf_config, "sliding_window", None)
    windows: list[int | None] = []
    for lt in layer_types:
        if lt == "sliding_attention" and window:
            windows.append(int(window))
        elif mt == "mistral" and window:
            windows.append(int(window))
        else:
            windows.append(None)
    params = getattr(hf_config, "rope_parameters", None) or {}
    per_type = any(isinstance(params.get(lt), dict) for lt in set(layer_types))
    layer_rope = tuple(lt if per_type else "global" for lt in layer_types)
    for key in set(layer_rope):
        rt = _rope_params(hf_config, None if key == "global" else key).get("rope_type", "default")
        if rt not in _SUPPORTED_ROPE:
            raise UnsupportedArchitecture(f"rope type {rt!r} is not implemented natively")
    if gemma:
        act = "gelu_tanh"
        attn_scale = float(hf_config.query_pre_attn_scalar) ** -0.5
        embed_scale = math.sqrt(hf_config.hidden_size)
    else:
        act_name = getattr(hf_config, "hidden_act", "silu")
        if act_name not in ("silu", "swish"):
            raise UnsupportedArchitecture(f"activation {act_name!r} is not implemented natively")
        act = "silu"
        attn_scale = head_dim**-0.5
        embed_scale = 1.0
    if mt == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(getattr(hf_config, "attention_bias", False))
    return ModelConfig(
        model_type=mt,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
        activation=act,
        norm_offset=gemma,
        sandwich_norm=gemma,
        qk_norm=mt in ("qwen3", "gemma3_text"),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        embed_scale=embed_scale,
        attn_scale=attn_scale,
        layer_windows=tuple(windows),
        layer_rope=layer_rope,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attn_logit_softcap=getattr(hf_config, "attn_logit_softcapping", None) if gemma else None,
        final_logit_softcap=getattr(hf_config, "final_logit_softcapping", None) if gemma else None,
    )
