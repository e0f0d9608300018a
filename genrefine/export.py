"""Trained drafters written in the formats that serving engines load, and read back.

``genrefine export`` turns a drafter directory (:mod:`genrefine.methods.parts.store`) into a
folder an engine loads as its speculative model. A format is written only when the engine would
compute the same draft function as genrefine; where the engine's network differs (a norm it does
not have, a residual it places elsewhere) the export is refused with a :class:`ConfigError`
naming the difference, rather than written to draft something else.

Formats (what each engine's loader expects, read from its published source):

- ``medusa``: vLLM's Medusa (``vllm/model_executor/models/medusa.py``, config
  ``vllm/transformers_utils/configs/medusa.py``). ``config.json`` with ``model_type: medusa``;
  tensors ``blocks.{i}.layers.0.weight`` / ``.bias`` (head ``i``'s residual block
  ``x + SiLU(W x + b)``, ``medusa_fc_bias: true``), one shared output matrix
  ``lm_heads.0.weight`` (``original_lm_head: true``) holding the target's output rows of the draft
  vocabulary, and ``token_map`` (the draft vocabulary's target ids) when the draft vocabulary is
  reduced (``truncated_vocab_size < vocab_size``). Takes a ``heads`` drafter; the rows come from
  the target model, since genrefine's heads reuse the target's output projection.
- ``eagle`` and ``sglang-eagle``: the EAGLE-1 head of vLLM (``EagleLlamaForCausalLM``,
  ``vllm/model_executor/models/llama_eagle.py``; the config is mapped there from
  ``architectures: ["LlamaForCausalLM"]`` by ``vllm/transformers_utils/configs/eagle.py``) and
  of SGLang (``LlamaForCausalLMEagle``, named so in ``architectures``,
  ``python/sglang/srt/models/llama_eagle.py``, whose ``fc`` has a bias: written as zeros, where
  vLLM's ``fc`` has none and its loader would fail on one). A Llama
  ``config.json`` with one layer; tensors ``fc.weight`` [H, 2H] over ``[embedding, feature]``
  and the layer's ``layers.0.self_attn.{q,k,v,o}_proj``, ``layers.0.post_attention_layernorm``
  and ``layers.0.mlp.{gate,up,down}_proj`` weights (no ``input_layernorm``: the engines replace
  the first layer's by the identity). The embedding and the output projection are the
  target's, shared by the engine, so neither is written. Takes an EAGLE drafter trained with
  ``--eagle-style engine``, whose network is the engines' (:class:`~genrefine.methods.eagle.
  EagleNet`); genrefine's own style is refused, see :func:`eagle_mismatches`. One difference
  stays: the engine projects the drafted feature onto the target's whole vocabulary, genrefine
  onto the drafter's reduced draft vocabulary (recorded as ``genrefine.draft_vocab``), so a token
  outside it can be drafted there; the network and its features are the same.
- ``speculators`` (the config vLLM reads through
  ``vllm/transformers_utils/configs/speculators/``): refused, vLLM reads EAGLE-3 speculators
  only and genrefine trains no EAGLE-3 drafter.

The vocabulary maps of EAGLE-3 drafters with a reduced vocabulary (``d2t``/``t2d``) are
:func:`vocab_maps` and :func:`ids_from_vocab_maps`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import ConfigError
from .methods.parts.heads import HeadsNet
from .methods.parts.store import StoredDrafter, read_drafter

if TYPE_CHECKING:
    from .methods.eagle import EagleNet

# format -> the drafter kind it takes
FORMATS = {"medusa": "heads", "eagle": "eagle", "sglang-eagle": "eagle", "speculators": "eagle"}
# the EAGLE-1 formats -> the ``architectures`` entry their engine loads (vLLM maps
# LlamaForCausalLM to EagleLlamaForCausalLM; SGLang takes its class name)
EAGLE1_ARCHITECTURES = {"eagle": "LlamaForCausalLM", "sglang-eagle": "LlamaForCausalLMEagle"}
# EagleNet's tensors -> the engines' names of their equal row blocks (EagleNet.forward: k rows
# before v rows; gate, up = chunk(2))
_L0 = "layers.0."
EAGLE1_NAMES = {
    "fc.weight": ("fc.weight",),  # [H, 2H] over [embedding, feature]
    "q.weight": (_L0 + "self_attn.q_proj.weight",),
    "kv.weight": (_L0 + "self_attn.k_proj.weight", _L0 + "self_attn.v_proj.weight"),
    "o.weight": (_L0 + "self_attn.o_proj.weight",),
    "mlp_norm": (_L0 + "post_attention_layernorm.weight",),
    "gate_up.weight": (_L0 + "mlp.gate_proj.weight", _L0 + "mlp.up_proj.weight"),
    "down.weight": (_L0 + "mlp.down_proj.weight",),
}

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


# ------------------------------------------------------------------------------ vocabulary maps
def vocab_maps(ids: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """EAGLE-3's maps of a reduced draft vocabulary ``ids`` [v] (target ids):
    ``d2t`` [v] long with ``target_id = draft_id + d2t[draft_id]`` (vLLM
    ``llama_eagle3.py``, ``compute_logits``: ``targets = base + self.draft_id_to_target_id``),
    and ``t2d`` [vocab_size] bool, true at the target ids the draft vocabulary holds."""
    ids = ids.long().flatten()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ConfigError(f"draft vocabulary ids must lie in [0, {vocab_size})")
    if torch.unique(ids).numel() != ids.numel():
        raise ConfigError("the draft vocabulary repeats a token id")
    d2t = ids - torch.arange(ids.numel())
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def ids_from_vocab_maps(d2t: Tensor) -> Tensor:
    """The draft vocabulary's target ids [v] long from an EAGLE-3 ``d2t`` map [v]."""
    return torch.arange(d2t.numel()) + d2t.long()


# ------------------------------------------------------------------------------ medusa
def medusa_files(stored: StoredDrafter, rows: Tensor, vocab_size: int) -> tuple[dict, dict]:
    """vLLM Medusa's ``(config, tensors)`` for a ``heads`` drafter.

    rows: [v, H] the target's output rows of the drafter's vocabulary (``vocab_ids`` order);
    vocab_size: the target's. The rescoring LM and n-gram of ``bpd+lm`` / ``bpd+ngram`` are not
    part of the format and are left out."""
    if stored.kind != "heads":
        raise ConfigError(f"--format medusa takes a heads drafter, {stored.path} holds {stored.kind!r}")
    t = stored.tensors
    w, b = t["heads.weight"], t["heads.bias"]  # [K, H, H], [K, H]
    ids = t["vocab_ids"].long()  # [v]
    K, H = int(w.shape[0]), int(w.shape[1])
    v = int(ids.numel())
    if tuple(rows.shape) != (v, H):
        raise ConfigError(f"output rows of shape {tuple(rows.shape)} do not fit {v} ids x hidden {H}")
    tensors: dict[str, Tensor] = {}
    for i in range(K):
        tensors[f"blocks.{i}.layers.0.weight"] = w[i].contiguous()  # nn.Linear: [out, in]
        tensors[f"blocks.{i}.layers.0.bias"] = b[i].contiguous()
    if v == vocab_size:
        # vLLM keeps no token_map at full size: the rows go in token order
        order = torch.argsort(ids)
        if not torch.equal(ids[order], torch.arange(vocab_size)):
            raise ConfigError("the drafter's vocabulary ids are not the target's vocabulary")
        rows = rows[order]
    else:
        tensors["token_map"] = ids.contiguous()
    tensors["lm_heads.0.weight"] = rows.to(w.dtype).contiguous()
    cfg = stored.config
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": H,
        "vocab_size": int(vocab_size),
        "num_heads": K,
        "num_hidden_layers": 1,
        "truncated_vocab_size": v,
        "medusa_fc_bias": True,
        "original_lm_head": True,
        "topk": int(cfg.get("topk", 10)),
        "max_paths": len(cfg.get("tree", [])) or 64,
        "torch_dtype": str(w.dtype).removeprefix("torch."),
        "genrefine": {"kind": "heads", "target": stored.target, "config": cfg},
    }
    return config, tensors


@dataclass
class ExportedHeads:
    """A Medusa export read back: the heads, the draft vocabulary and the output rows."""

    net: HeadsNet
    vocab_ids: Tensor  # [v] long, target ids
    rows: Tensor  # [v, H] output rows, vocab_ids order
    config: dict


@dataclass
class ExportedEagle:
    """An EAGLE-1 export read back into an ``engine``-style :class:`EagleNet`."""

    net: EagleNet
    config: dict


def load_exported(out: str | Path) -> ExportedHeads | ExportedEagle:
    """Read an export written by :func:`export_drafter` back into genrefine's network
    (``medusa``: :class:`HeadsNet`; ``eagle``: an ``engine``-style EagleNet), tensors
    unchanged."""
    from safetensors.torch import load_file

    out = Path(out).expanduser()
    if not (out / CONFIG).exists() or not (out / WEIGHTS).exists():
        raise ConfigError(f"no export at {out}: expected {CONFIG} and {WEIGHTS}")
    config = json.loads((out / CONFIG).read_text())
    t = load_file(str(out / WEIGHTS))
    if config.get("model_type") == "llama" and "fc.weight" in t:
        return _load_eagle(config, t)
    if config.get("model_type") != "medusa":
        raise ConfigError(
            f"{out} is not a medusa or eagle export (model_type {config.get('model_type')!r})"
        )
    K, H = int(config["num_heads"]), int(config["hidden_size"])
    net = HeadsNet(H, K).to(t["blocks.0.layers.0.weight"].dtype)
    net.load_state_dict({
        "weight": torch.stack([t[f"blocks.{i}.layers.0.weight"] for i in range(K)]),
        "bias": torch.stack([t[f"blocks.{i}.layers.0.bias"] for i in range(K)]),
    })
    ids = t["token_map"].long() if "token_map" in t else torch.arange(int(config["vocab_size"]))
    return ExportedHeads(net, ids, t["lm_heads.0.weight"], config)


def _load_eagle(config: dict, t: dict) -> ExportedEagle:
    from .methods.eagle import EagleNet

    if "fc.bias" in t and bool(t["fc.bias"].any()):
        raise ConfigError("this EAGLE checkpoint's fc has a bias, which genrefine's EagleNet has not")
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise ConfigError("genrefine's EagleNet has one layer, this checkpoint has more")
    net = EagleNet(
        int(config["hidden_size"]), heads=int(config["num_attention_heads"]),
        kv_heads=int(config["num_key_value_heads"]), head_dim=int(config["head_dim"]),
        inner=int(config["intermediate_size"]), rope_theta=float(config["rope_theta"]),
        style="engine",
    ).to(t["fc.weight"].dtype)
    net.load_state_dict({k: torch.cat([t[n] for n in names]) for k, names in EAGLE1_NAMES.items()})
    return ExportedEagle(net, config)


# ------------------------------------------------------------------------------ eagle
def eagle_mismatches(stored: StoredDrafter, fmt: str) -> list[str]:
    """Why the engine behind ``fmt`` would not compute genrefine's EAGLE drafter
    (:class:`~genrefine.methods.eagle.EagleNet`): one sentence per difference, empty when it
    would.

    EagleNet is ``x = fc([norm_f(f), norm_e(e)])``, a pre-norm decoder layer whose first norm is
    ``attn_norm``, then ``out_norm``; the normed output is both fed back and projected onto the
    draft vocabulary. vLLM's ``EagleLlamaForCausalLM`` replaces the first layer's
    ``input_layernorm`` by the identity and has no output norm (its optional ``add_para_norm``
    norms match ``norm_e``/``norm_f``) and projects onto the target's full vocabulary; SGLang's
    ``LlamaForCausalLMEagle`` has neither the input norms nor the first layer's norm nor an output
    norm (and both project onto the target's full vocabulary, or SGLang's hot-token subset).
    vLLM reads speculators configs only for ``eagle3`` (``algos.py``), whose layer attends
    over ``[norm(e), norm(h)]`` (2H wide) with the residual on ``h``: another network.
    A drafter trained with ``--eagle-style engine`` has none of those norms and passes."""
    t = stored.tensors
    out: list[str] = []
    if fmt == "speculators":
        out.append(
            "vLLM reads speculators configs of EAGLE-3 only (speculators_model_type eagle3), whose "
            "decoder layer attends over [norm(embedding), norm(feature)] with the residual on the "
            "feature, not over genrefine's fc([norm(feature), norm(embedding)])"
        )
        return out
    if "net.attn_norm" in t:
        out.append(
            "the engines' EAGLE layer skips the first layer's input norm "
            "(vLLM and SGLang llama_eagle.py: input_layernorm = Identity), genrefine's applies "
            "attn_norm there"
        )
    if "net.out_norm" in t:
        out.append(
            "the engines' EAGLE model has no output norm, genrefine's normalises its output "
            "(out_norm) before feeding it back and projecting it"
        )
    if "net.norm_e" in t or "net.norm_f" in t:
        out.append(
            "the engines' fc reads the raw embedding and feature, genrefine's style normalises "
            "both first (norm_e, norm_f)"
        )
    if not out and stored.config.get("style") != "engine":
        out.append(f"the drafter's style is {stored.config.get('style', 'genrefine')!r}, not 'engine'")
    if out:
        out.append("train one the engines run with `genrefine train eagle --eagle-style engine`")
    return out


def eagle_files(
    stored: StoredDrafter, vocab_size: int, max_positions: int, fmt: str = "eagle"
) -> tuple[dict, dict]:
    """The EAGLE-1 ``(config, tensors)`` vLLM (``fmt="eagle"``) or SGLang (``"sglang-eagle"``)
    loads, for an ``engine``-style EAGLE drafter (:func:`eagle_mismatches` empty).
    vocab_size, max_positions: the target's (the engines share the target's embedding, whose
    shape the config states)."""
    if fmt not in EAGLE1_ARCHITECTURES:
        raise ConfigError(f"eagle_files writes {' or '.join(EAGLE1_ARCHITECTURES)}, not {fmt!r}")
    _refuse_mismatches(stored, fmt)
    cfg, t = stored.config, stored.tensors
    H, heads, kv, D = (int(cfg[k]) for k in ("hidden", "heads", "kv_heads", "head_dim"))
    inner = int(cfg["inner"])
    tensors = {}
    for k, names in EAGLE1_NAMES.items():
        tensors.update(zip(names, t["net." + k].chunk(len(names))))
    dtype = t["net.fc.weight"].dtype
    if fmt == "sglang-eagle":  # SGLang's fc = nn.Linear(2H, H) keeps its default bias
        tensors["fc.bias"] = torch.zeros(H, dtype=dtype)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    config = {
        "architectures": [EAGLE1_ARCHITECTURES[fmt]],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": inner,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": D,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,  # EagleNet's _rms
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(max_positions),
        "vocab_size": int(vocab_size),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "genrefine": {"kind": "eagle", "target": stored.target, "config": cfg,
                      "draft_vocab": int(t["vocab_ids"].numel())},
    }
    return config, tensors


# ------------------------------------------------------------------------------ export
def check_format(fmt: str) -> str:
    """``fmt`` if it is a known format, else a :class:`ConfigError` listing them."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    return fmt


def read_for_export(drafter: str | Path, fmt: str) -> StoredDrafter:
    """The drafter at ``drafter``, checked to be of the kind ``fmt`` takes; for the EAGLE
    formats, also checked to be computable by the engine (:func:`eagle_mismatches`)."""
    check_format(fmt)
    stored = read_drafter(drafter)
    want = FORMATS[fmt]
    if stored.kind != want:
        raise ConfigError(
            f"--format {fmt} takes a {want!r} drafter, {stored.path} holds a {stored.kind!r} one"
            + (" (export heads drafters with --format medusa)" if stored.kind == "heads" else "")
        )
    if want == "eagle":
        _refuse_mismatches(stored, fmt)
    return stored


def _refuse_mismatches(stored: StoredDrafter, fmt: str) -> None:
    """A :class:`ConfigError` naming :func:`eagle_mismatches`, if there are any."""
    why = eagle_mismatches(stored, fmt)
    if why:
        raise ConfigError(
            f"refusing --format {fmt}: the engine would draft with another function than "
            f"this EAGLE drafter ({'; '.join(why)})"
        )


def export_drafter(drafter: str | Path, fmt: str, out: str | Path, model=None) -> Path:
    """Write the drafter at ``drafter`` in format ``fmt`` (:data:`FORMATS`) to folder ``out``
    (``config.json`` + ``model.safetensors``); returns ``out``.

    model: the target the drafter was trained for (needed by ``medusa``, whose output rows are
    the target's); the drafter must have been trained for it."""
    from .methods.parts.store import load_drafter

    stored = read_for_export(drafter, fmt)
    if model is None:
        raise ConfigError(f"--format {fmt} needs the target model the drafter was trained for")
    stored = load_drafter(stored.path, stored.kind, model)
    if fmt in EAGLE1_ARCHITECTURES:
        config, tensors = eagle_files(stored, int(model.vocab_size), int(model.max_context), fmt)
        return _write(out, config, tensors)
    head = model.lm_head
    if not isinstance(head, Tensor) or not head.is_floating_point():
        raise ConfigError(
            "the model's output matrix is quantized: load it with --dtype bfloat16 or float32"
        )
    ids = stored.tensors["vocab_ids"].long()
    rows = head.detach().index_select(0, ids.to(head.device)).cpu()
    config, tensors = medusa_files(stored, rows, int(model.vocab_size))
    return _write(out, config, tensors)


def _write(out: str | Path, config: dict, tensors: dict) -> Path:
    from .diskcache import save_tensors

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS, tensors, metadata={"format": "pt"})
    (out / WEIGHTS).chmod(0o644)  # an engine often runs as another user
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
