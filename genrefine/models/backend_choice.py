"""``--backend auto``: the faster of the native runtime and llama.cpp for a model on this machine.

Measured once per model file, dtype, machine and llama.cpp version, and cached as JSON under
``$GENREFINE_CACHE/backend/``. The measure is a short decode on both backends: after a 64-token
prompt, 16 one-token forwards (plain decoding) and 4 eight-token forwards each rolled back
(verification of a draft), twice each, interleaved; the backend with the smaller total wins.
Models that are not GGUF files, a missing llama.cpp extra or a GPU device choose native without
measuring.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..diskcache import cache_root, machine_key, write_text

PROMPT_TOKENS = 64
DECODE_STEPS = 16
VERIFY_TOKENS = 8
VERIFY_STEPS = 4
ROUNDS = 2


def decode_seconds(model) -> float:
    """Seconds for the short decode described in the module docstring (one round)."""
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.vocab_size)
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=gen)  # [64]
    draft = torch.randint(0, vocab, (VERIFY_TOKENS,), generator=gen)  # [8]
    cache = model.new_cache(PROMPT_TOKENS + DECODE_STEPS + VERIFY_TOKENS + 1)
    logits = model.forward(prompt, cache, logits_rows=torch.tensor([PROMPT_TOKENS - 1])).logits
    tok = logits.argmax(dim=-1)  # [1]
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        tok = model.forward(tok.reshape(1), cache).logits.argmax(dim=-1)
    for _ in range(VERIFY_STEPS):
        model.forward(draft, cache).logits.argmax(dim=-1)
        cache.rollback(VERIFY_TOKENS)
    return time.perf_counter() - t0


def _key(src, fingerprint: str, dtype: torch.dtype, device: torch.device) -> str:
    import llama_cpp

    return "|".join(
        [
            src.path.name,
            fingerprint,
            str(dtype),
            machine_key(device),
            f"llama_cpp={getattr(llama_cpp, '__version__', '?')}",
        ]
    )


def choice_path(key: str) -> Path:
    return cache_root() / "backend" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def choose_backend(
    src,
    fingerprint: str,
    dtype: torch.dtype,
    dev: torch.device,
    load: Callable[[str], object],
    notice: Callable[[str], None],
) -> str:
    """"native" or "llama.cpp" for ``src`` (a :class:`~genrefine.models.loading.ModelSource`
    whose file has ``fingerprint``), loaded as ``load(backend)`` when it must be measured."""
    from .llamacpp import is_available

    if not src.gguf or dev.type != "cpu" or not is_available():
        return "native"
    key = _key(src, fingerprint, dtype, dev)
    path = choice_path(key)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key and saved.get("backend") in ("native", "llama.cpp"):
                return saved["backend"]
        except (OSError, ValueError):
            pass  # unreadable: measure again
    notice("measuring which backend is faster for this model here (once) ...")
    models = {
        "native": load("native"),
        "llama.cpp": load("llama.cpp"),
    }
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up
            decode_seconds(model)
        for _ in range(ROUNDS):
            for name, model in models.items():
                t = decode_seconds(model)
                seconds[name] = min(seconds.get(name, t), t)
    best = min(seconds, key=seconds.get)
    record = {"key": key, "backend": best, "seconds": seconds, "measure": __doc__.split("\n\n")[1]}
    write_text(path, json.dumps(record, indent=2) + "\n")
    notice(
        f"backend {best}: short decode {seconds['native'] * 1000:.0f} ms native, "
        f"{seconds['llama.cpp'] * 1000:.0f} ms llama.cpp (cached in {path})"
    )
    return best
