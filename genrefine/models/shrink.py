"""``genrefine draft-model shrink``: a draft model cut out of the target (its first K layers).

    genrefine draft-model shrink --layers 6 --out /tmp/gemma-6l      # from the embedded model
    genrefine generate "..." --method sps --draft-model /tmp/gemma-6l

Writes the first ``K`` decoder layers of a model, its final norm and its embedding (the output
head stays tied to it, or is copied when the model has its own) as a Hugging Face directory
(``config.json``, ``model.safetensors``, the tokenizer) that ``--model`` and ``--draft-model``
load like any other.

This is a *shallow copy of the target, not a trained drafter*: the first layers followed by the
final norm and head were never trained to predict the next token on their own (no distillation,
no fine-tuning), so their drafts agree with the target far less often than a real small model of
the same family would, and because the embedding and head are kept whole, a draft token still
reads all of the head's weights (on Gemma 3 270M the 262k x 640 head is most of the model). It
exists so that ``sps`` and ``hf_assisted`` can be run end to end on the embedded model, where no
smaller model of the same tokenizer is available offline; figures from it say little about
independent draft models in general.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from .loading import _DTYPE_ALIASES, DTYPES, _load_hf, load_tokenizer, resolve_source


def shrink_model(
    spec: str | os.PathLike | None, layers: int, out: str | os.PathLike, dtype: str = "bfloat16"
) -> Path:
    """Write the first ``layers`` layers of model ``spec`` (None: the embedded model) to ``out``
    (a new or empty directory) in ``dtype``; returns the directory."""
    from transformers import AutoConfig

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {str(out)!r} exists and is not an empty directory: give a new one"
        )
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    src = resolve_source(spec)
    try:
        config = AutoConfig.from_pretrained(src.load_dir, **src.hf_kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src.display_name!r} has no readable model config: {e}") from e
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int) or total < 2:
        raise ConfigError(f"{src.display_name!r} does not say how many layers it has")
    if not 1 <= layers < total:
        raise ConfigError(
            f"--layers must be between 1 and {total - 1} (the model has {total}), got {layers}"
        )
    print(f"genrefine: loading {src.display_name} through transformers ...", file=sys.stderr,
          flush=True)
    hf = _load_hf(src, torch.float32)  # dequantized in float32 (as the target's conversion)
    body = getattr(getattr(hf, "model", None), "layers", None)
    if body is None:
        raise ConfigError(
            f"cannot shrink {src.display_name!r}: its decoder layers are not at model.layers"
        )
    hf.model.layers = body[:layers]
    hf.config.num_hidden_layers = layers
    for key in ("layer_types",):  # per-layer settings (Gemma 3, Qwen 3: sliding or full attention)
        per_layer = getattr(hf.config, key, None)
        if isinstance(per_layer, list):
            setattr(hf.config, key, per_layer[:layers])
    # written by hand: transformers refuses save_pretrained() for a model loaded from GGUF
    from safetensors.torch import save_file

    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    sd = {
        k: v.detach().to(DTYPES[name]).contiguous()
        for k, v in hf.state_dict().items()
        if not (tied and k == "lm_head.weight")  # the head is the embedding
    }
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.architectures = [type(hf).__name__]
    hf.config.dtype = name
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(str(out))
    load_tokenizer(src).save_pretrained(str(out))
    return out


def shrink_main(model: str | None, layers: int, out: str, dtype: str) -> int:
    path = shrink_model(model, layers, out, dtype)
    print(
        f"wrote {path}: the first {layers} layers of the model (a shallow copy, not a trained "
        f"drafter); use it with --method sps --draft-model {path}",
        file=sys.stderr,
    )
    return 0
