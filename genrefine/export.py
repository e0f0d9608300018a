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
- ``eagle`` (vLLM ``EagleLlamaForCausalLM``, ``vllm/model_executor/models/llama_eagle.py``;
  SGLang ``LlamaForCausalLMEagle``, ``python/sglang/srt/models/llama_eagle.py``) and
  ``speculators`` (the config vLLM reads through
  ``vllm/transformers_utils/configs/speculators/``): both refused for genrefine's EAGLE drafter,
  see :func:`eagle_mismatches`.

The vocabulary maps of EAGLE-3 drafters with a reduced vocabulary (``d2t``/``t2d``) are
:func:`vocab_maps` and :func:`ids_from_vocab_maps`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigError
from .methods.parts.heads import HeadsNet
from .methods.parts.store import StoredDrafter, read_drafter

# format -> the drafter kind it takes
FORMATS = {"medusa": "heads", "eagle": "eagle", "speculators": "eagle"}

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


def load_exported(out: str | Path) -> ExportedHeads:
    """Read an export written by :func:`export_drafter` back into genrefine's network (so far:
    ``medusa`` exports, into :class:`HeadsNet`), tensors unchanged."""
    from safetensors.torch import load_file

    out = Path(out).expanduser()
    if not (out / CONFIG).exists() or not (out / WEIGHTS).exists():
        raise ConfigError(f"no export at {out}: expected {CONFIG} and {WEIGHTS}")
    config = json.loads((out / CONFIG).read_text())
    if config.get("model_type") != "medusa":
        raise ConfigError(f"{out} is not a medusa export (model_type {config.get('model_type')!r})")
    t = load_file(str(out / WEIGHTS))
    K, H = int(config["num_heads"]), int(config["hidden_size"])
    net = HeadsNet(H, K).to(t["blocks.0.layers.0.weight"].dtype)
    net.load_state_dict({
        "weight": torch.stack([t[f"blocks.{i}.layers.0.weight"] for i in range(K)]),
        "bias": torch.stack([t[f"blocks.{i}.layers.0.bias"] for i in range(K)]),
    })
    ids = t["token_map"].long() if "token_map" in t else torch.arange(int(config["vocab_size"]))
    return ExportedHeads(net, ids, t["lm_heads.0.weight"], config)


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
    over ``[norm(e), norm(h)]`` (2H wide) with the residual on ``h``: another network."""
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
    return out


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
        why = eagle_mismatches(stored, fmt)
        if why:
            raise ConfigError(
                f"refusing --format {fmt}: the engine would draft with another function than "
                f"genrefine's EAGLE drafter ({'; '.join(why)})"
            )
    return stored


def export_drafter(drafter: str | Path, fmt: str, out: str | Path, model=None) -> Path:
    """Write the drafter at ``drafter`` in format ``fmt`` (:data:`FORMATS`) to folder ``out``
    (``config.json`` + ``model.safetensors``); returns ``out``.

    model: the target the drafter was trained for (needed by ``medusa``, whose output rows are
    the target's); the drafter must have been trained for it."""
    from .diskcache import save_tensors
    from .methods.parts.store import load_drafter

    stored = read_for_export(drafter, fmt)
    if model is None:
        raise ConfigError(f"--format {fmt} needs the target model the drafter was trained for")
    stored = load_drafter(stored.path, stored.kind, model)
    head = model.lm_head
    if not isinstance(head, Tensor) or not head.is_floating_point():
        raise ConfigError(
            "the model's output matrix is quantized: load it with --dtype bfloat16 or float32"
        )
    ids = stored.tensors["vocab_ids"].long()
    rows = head.detach().index_select(0, ids.to(head.device)).cpu()
    config, tensors = medusa_files(stored, rows, int(model.vocab_size))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS, tensors, metadata={"format": "pt"})
    (out / WEIGHTS).chmod(0o644)  # an engine often runs as another user
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
