"""The output layer of the embedded model (262,144 x 640) as one matmul over M = 1, 4, 16 and 64
rows: bfloat16 ``F.linear``, torch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``
(row by row, no weight reuse), and genrefine's exact integer kernel on the file's own Q8_0
weights (every instruction-set path this CPU runs, and the PyTorch fallback for one row), plus
a one-token and a 16-token forward of the whole model on its quantized weights and the machine's
read bandwidth (a large copy), so that the issue's goals can be read off:

* one-token forward <= 1.3 x (bytes of the quantized weights / bandwidth),
* 16-token forward <= 1.5 x one-token forward.

    python benchmarks/bench_kernels.py [--json out.json] [--threads N]

Median of ``--repeats`` after a warm-up; one process, nothing else should be running.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from genrefine.diskcache import cpu_model
    from genrefine.kernels import ISAS, best_isa, qlinear
    from genrefine.models.loading import load_model

    model, _ = load_model(dtype="gguf")
    head = model.lm_head.segments[0]  # Q8_0 [262144, 640]
    n, k = head.n, head.k
    w32 = model.lm_head.rows(torch.arange(n))  # the dequantized weights, float32
    wb = w32.to(torch.bfloat16)
    # torch's weight-only kernels on the same shape (their own quantization of these weights)
    scale8 = w32.abs().amax(1) / 127.0
    w8 = torch.round(w32 / scale8[:, None]).clamp(-127, 127).to(torch.int8)
    w4 = None
    try:
        wq = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed4 = torch._convert_weight_to_int4pack_for_cpu(wq, 8)
        sz4 = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
        w4 = (packed4, sz4)
    except (RuntimeError, AttributeError) as e:
        print(f"int4pack unavailable: {e}", file=sys.stderr)
    isas = ["generic", "avx2", "avx512-vnni", "amx"]
    mine = isas[: isas.index(best_isa()) + 1] if best_isa() in ISAS else []
    rows = {}
    for m in (1, 4, 16, 64):
        x = torch.randn(m, k)
        xb = x.to(torch.bfloat16)
        r = {"bf16 F.linear": median_ms(lambda: F.linear(xb, wb), args.repeats)}
        r["_weight_int8pack_mm"] = median_ms(lambda: torch._weight_int8pack_mm(xb, w8, scale8.to(torch.bfloat16)), args.repeats)
        if w4 is not None:
            r["_weight_int4pack_mm_for_cpu"] = median_ms(
                lambda: torch._weight_int4pack_mm_for_cpu(xb, w4[0], 32, w4[1]), args.repeats
            )
        for isa in mine:
            r[f"genrefine {isa}"] = median_ms(lambda: qlinear(x, head, isa), args.repeats)
        if m == 1:
            r["genrefine reference (PyTorch)"] = median_ms(lambda: qlinear(x, head, "reference"), 2)
        rows[m] = r
        print(m, {a: round(b, 2) for a, b in r.items()}, flush=True)

    # the whole model: one token and 16 tokens after a 64-token prefix
    cache = model.new_cache(256)
    model.forward(torch.arange(1000, 1064), cache)
    fwd = {}
    for t in (1, 16):
        toks = torch.arange(2000, 2000 + t)

        def step():
            model.forward(toks, cache)
            cache.rollback(t)

        fwd[t] = median_ms(step, args.repeats)
    weight_bytes = sum(w.nbytes for lw in model.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down))
    weight_bytes += model.lm_head.nbytes
    big = torch.empty(512 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(big)
    copy_ms = median_ms(lambda: dst.copy_(big), 5)
    bandwidth = 2 * big.numel() / (copy_ms / 1000)  # read + write bytes per second
    read_ms = weight_bytes / bandwidth * 1000
    out = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "isa": best_isa(),
        "matmul_ms": rows,
        "forward_ms": fwd,
        "weights_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "read_weights_ms": read_ms,
        "one_token_over_read": fwd[1] / read_ms,
        "sixteen_over_one": fwd[16] / fwd[1],
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
