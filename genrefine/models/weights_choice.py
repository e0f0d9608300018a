"""``--dtype auto``: bfloat16 weights or the GGUF file's own quantized weights, whichever is
faster on this machine, measured once and cached as JSON under ``$GENREFINE_CACHE/weights/``.

Both configurations are exact (every row of a verification forward equals one-token decoding:
bfloat16 through probed reduction splits, quantized weights by construction), so the choice is
speed alone. The measure: one output-layer-sized matmul ([65536, K] weights, K the model's
hidden size) over 1 row and over 16 rows (plain decoding and verification), bfloat16
``F.linear`` against the integer kernel on Q8_0 weights, median of 5 after a warm-up; the
smaller sum of the two wins. Files that are not GGUF, and GPUs, use bfloat16 without measuring.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..diskcache import cache_root, machine_key, write_text

ROWS = (1, 16)
OUTPUTS = 65536
REPEATS = 5


def _median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def measure(hidden: int) -> dict[str, float]:
    """Milliseconds for 1 and 16 rows of each configuration (keys like ``bfloat16@16``)."""
    from ..kernels import qlinear
    from .quant import quantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUTPUTS, hidden, generator=g) * 0.02
    wb = w.to(torch.bfloat16)
    q = quantize_weight(w, "q8_0").segments[0]
    out: dict[str, float] = {}
    with torch.inference_mode():
        for m in ROWS:
            x = torch.randn(m, hidden, generator=g)
            xb = x.to(torch.bfloat16)
            out[f"bfloat16@{m}"] = _median_ms(lambda: F.linear(xb, wb))
            out[f"gguf@{m}"] = _median_ms(lambda: qlinear(x, q))
    return out


def _key(hidden: int) -> str:
    from ..kernels import best_isa, source_key

    return "|".join([machine_key("cpu"), f"isa={best_isa()}", f"kernels={source_key()}", torch.__version__, str(hidden)])


def choice_path(key: str) -> Path:
    return cache_root() / "weights" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def choose_weights(hidden: int, notice=None) -> str:
    """"gguf" or "bfloat16" for a GGUF model of this hidden size on this CPU (cached)."""
    key = _key(hidden)
    path = choice_path(key)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key and saved.get("weights") in ("gguf", "bfloat16"):
                return saved["weights"]
        except (OSError, ValueError):
            pass  # unreadable: measure again
    ms = measure(hidden)
    total = {name: sum(ms[f"{name}@{m}"] for m in ROWS) for name in ("bfloat16", "gguf")}
    best = min(total, key=total.get)
    record = {"key": key, "weights": best, "milliseconds": ms, "measure": __doc__.split("\n\n")[1]}
    write_text(path, json.dumps(record, indent=2) + "\n")
    if notice is not None:
        notice(
            f"weights {best}: an output-layer matmul for 1 + 16 rows takes "
            f"{total['gguf']:.1f} ms quantized, {total['bfloat16']:.1f} ms bfloat16 here "
            f"(measured once, cached in {path})"
        )
    return best
