"""``genrefine methods``, ``genrefine index build`` and ``genrefine draft-model shrink``."""

from __future__ import annotations

import sys

from ..errors import GenrefineError
from ..diskcache import cpu_model, machine_key


def add_index_parser(sub) -> None:
    ix = sub.add_parser(
        "index",
        help="build a retrieval datastore for method rest",
        description="Datastores for retrieval drafting (method rest).",
    )
    ix_sub = ix.add_subparsers(dest="index_command", metavar="ACTION")
    ib = ix_sub.add_parser(
        "build",
        help="tokenize a folder of text files into a suffix-indexed datastore",
        description="Tokenize every .txt, .md, .py and .rst file under DIR with the model's "
        "tokenizer and write a suffix-array datastore (safetensors) to --out.",
    )
    ib.add_argument("directory", metavar="DIR", help="folder of text files (searched recursively)")
    ib.add_argument("--out", required=True, help="datastore file to write (.safetensors)")
    ib.add_argument("--model", default=None,
                    help="model whose tokenizer to use (default: the embedded Gemma 3 270M)")



def add_draft_model_parser(sub) -> None:
    dm = sub.add_parser(
        "draft-model",
        help="make a draft model for method sps",
        description="Draft models for method sps.",
    )
    dm_sub = dm.add_subparsers(dest="draft_model_command", metavar="ACTION")
    ds = dm_sub.add_parser(
        "shrink",
        help="write the target's first K layers as a draft model (a shallow copy, not trained)",
        description="Write the first K decoder layers, the final norm and the embedding/head of "
        "a model as a Hugging Face directory that --draft-model loads. A shallow copy of the "
        "target, not a trained drafter: expect low acceptance (see genrefine/models/shrink.py).",
    )
    ds.add_argument("--model", default=None,
                    help="the model to cut (default: the embedded Gemma 3 270M)")
    ds.add_argument("--layers", type=int, required=True, metavar="K", help="layers to keep")
    ds.add_argument("--out", required=True, metavar="DIR", help="new directory to write")
    ds.add_argument("--dtype", default="bfloat16", help="weights as saved (default bfloat16)")



def add_methods_parser(sub) -> None:
    sub.add_parser(
        "methods",
        help="list the methods and whether each is lossless",
        description="List the methods: name, lossless or lossy, and what each does.",
    )


def cmd_index(args) -> int:
    from ..methods.parts.datastore import index_build_main

    if args.index_command != "build":
        raise GenrefineError("say what to do: genrefine index build DIR --out FILE")
    return index_build_main(args.directory, args.model, args.out)


def cmd_draft_model(args) -> int:
    from ..models.shrink import shrink_main

    if args.draft_model_command != "shrink":
        raise GenrefineError("say what to do: genrefine draft-model shrink --layers K --out DIR")
    return shrink_main(args.model, args.layers, args.out, args.dtype)


def cmd_methods(args) -> int:
    from ..registry import METHODS

    for m in METHODS.values():
        kind = "lossless" if m.lossless else "lossy"
        print(f"{m.name:<10} {kind:<9} {m.summary}")
    print("genrefine: note: lossless = greedy tokens equal ar's when the model runs bitwise exact "
          "(the GGUF's quantized weights: by construction; bf16: with batch-invariant kernels, "
          "probed); otherwise (float32, some CPUs, the transformers backend) a near-tie can "
          "differ. genrefine bench records bitwise_exact and the weights' format per run",
          file=sys.stderr)
    print(f"genrefine: this CPU: {cpu_model()} ({', '.join(cpu_features()) or 'no SIMD flags read'}); "
          f"weights: {auto_weights_summary()}", file=sys.stderr)
    return 0


def cpu_features() -> list[str]:
    """The instruction sets the quantized kernels dispatch on, as /proc/cpuinfo lists them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"]
    return [w for w in wanted if w in flags]


def auto_weights_summary() -> str:
    """What ``--dtype auto`` chose for the embedded model here, when it was measured."""
    import json

    from ..diskcache import cache_root

    found = sorted((cache_root() / "weights").glob("*.json"))
    for path in found:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("key", "").startswith(machine_key("cpu") + "|"):
            w = "the GGUF's own quantized weights" if rec["weights"] == "gguf" else "bfloat16"
            return f"--dtype auto runs GGUF models on {w} here (measured, {path})"
    return "--dtype auto measures on the first load of a GGUF model whether its quantized weights or bfloat16 run faster here"
