"""``genrefine export``: a trained drafter in the format a serving engine loads."""

from __future__ import annotations

import sys

from .options import add_model_options, validate_before_load


def add_export_parser(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="write a trained drafter in a serving engine's format (vLLM Medusa, vLLM/SGLang EAGLE)",
        description="Write the drafter in --drafter DIR to --out in the format an engine loads: "
        "medusa (vLLM; heads drafters, output rows copied from --model); eagle (vLLM EAGLE-1) and "
        "sglang-eagle (SGLang EAGLE-1): EAGLE drafters trained with `genrefine train eagle "
        "--eagle-style engine` (the default style is refused with the reason). speculators is refused: vLLM reads EAGLE-3 "
        "speculators only, and genrefine trains no EAGLE-3 drafter.",
    )
    ex.add_argument("--drafter", required=True, metavar="DIR", help="a `genrefine train` output folder")
    ex.add_argument("--format", required=True, metavar="FORMAT", help="medusa, eagle, sglang-eagle or speculators")
    ex.add_argument("--out", required=True, metavar="DIR", help="folder to write the export to")
    add_model_options(ex)


def cmd_export(args) -> int:
    from ..export import export_drafter, read_for_export

    read_for_export(args.drafter, args.format)  # a wrong folder, format or kind: before loading
    validate_before_load(args, [])
    from ..api import load

    dtype = "bfloat16" if args.dtype in ("auto", "gguf") else args.dtype  # plain output rows
    gen = load(args.model, dtype=dtype, device=args.device, quiet=True, backend="native")
    out = export_drafter(args.drafter, args.format, args.out, gen.model)
    print(f"genrefine: wrote {args.format} export to {out}", file=sys.stderr)
    return 0
