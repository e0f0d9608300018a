"""Trained drafters on disk: one safetensors file per drafter, tied to its target model.

A drafter directory holds ``drafter.safetensors``: the weights, the draft vocabulary
(``vocab_ids``) and, in the file's metadata, the kind (``heads`` or ``eagle``), the drafter's
configuration (JSON) and the target it was trained for (name, sizes and a fingerprint of its
embedding rows). Loading checks the target and refuses another model's drafter with a message
naming both. Nothing here unpickles anything.

Drafters trained for the embedded model ship in the package (``genrefine/shipped``) and
are found by the target's fingerprint when no ``--drafter`` is given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...errors import ConfigError

FORMAT = "genrefine-drafter-1"


FILE = "drafter.safetensors"


SHIPPED = Path(__file__).resolve().parents[2] / "shipped"


def target_fingerprint(model) -> str:
    """A short hash of the target's first embedding rows and sizes: which model a drafter fits.

    The rows are rounded to bfloat16 first, so the same model loaded in float32, bfloat16 or
    float16 has one fingerprint."""
    h = hashlib.sha256()
    h.update(f"{model.vocab_size}|{model.hidden_size}|{model.num_layers}|".encode())
    rows = model.embed[:8].detach().to("cpu").to(torch.bfloat16).to(torch.float32).contiguous()
    h.update(rows.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class StoredDrafter:
    kind: str  # "heads" | "eagle"
    config: dict
    tensors: dict[str, Tensor]
    target: str  # the target's name when trained
    path: Path


def save_drafter(
    out: str | Path, kind: str, model, config: dict, tensors: dict[str, Tensor]
) -> Path:
    """Write ``out/drafter.safetensors`` (atomically); returns the file's path."""
    from ...diskcache import save_tensors

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "target": str(getattr(model, "name", "model")),
        "target_fingerprint": target_fingerprint(model),
    }
    path = out / FILE
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_tensors(path, tensors, metadata=meta)
    return path


def read_drafter(path: str | Path) -> StoredDrafter:
    """Read a drafter directory (or its file) without checking the target."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    f = p / FILE if p.is_dir() else p
    if not f.exists():
        raise ConfigError(
            f"no trained drafter at {p}: expected {FILE} in that folder "
            "(make one with `genrefine train heads|eagle --out DIR`)"
        )
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise ConfigError(f"{f} is not a readable drafter file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{f} is not a genrefine drafter (format {meta.get('format')!r})")
    return StoredDrafter(
        kind=meta.get("kind", "?"),
        config=json.loads(meta.get("config", "{}")),
        tensors=tensors,
        target=meta.get("target", "?") + "|" + meta.get("target_fingerprint", ""),
        path=f,
    )


def load_drafter(path: str | Path, kind: str, model) -> StoredDrafter:
    """Read a drafter and check it was trained for ``model`` and is of ``kind``."""
    d = read_drafter(path)
    name, _, fp = d.target.partition("|")
    d.target = name
    if d.kind != kind:
        raise ConfigError(
            f"{d.path} holds a {d.kind!r} drafter but this method needs {kind!r} "
            f"(train one with `genrefine train {kind}`)"
        )
    if fp != target_fingerprint(model):
        raise ConfigError(
            f"the drafter at {d.path} was trained for model {name!r}, not for "
            f"{getattr(model, 'name', 'model')!r}: train one for this model with "
            f"`genrefine train {kind} --model ...`"
        )
    return d


def find_drafter(model, kind: str, path: str | Path | None = None) -> StoredDrafter:
    """The drafter at ``path``, or a shipped one trained for ``model`` (matched by fingerprint)."""
    if path is not None:
        return load_drafter(path, kind, model)
    fp = target_fingerprint(model)
    if SHIPPED.is_dir():
        for f in sorted(SHIPPED.glob(f"*/{kind}/{FILE}")):
            d = read_drafter(f)
            name, _, got = d.target.partition("|")
            if got == fp and d.kind == kind:
                d.target = name
                return d
    raise ConfigError(
        f"no trained {kind} drafter for {getattr(model, 'name', 'model')!r}: train one with "
        f"`genrefine train {kind} --out DIR` and pass --drafter DIR"
    )
