"""``genrefine bench``: the Spec-Bench harness (:mod:`genrefine.bench`)."""

from __future__ import annotations

import sys

from .options import add_draft_model_option, add_drafter_option, add_model_options


DESCRIPTION = (
    "Run every method on every question (interleaved, after a warm-up), check that lossless "
    "methods reproduce ar's greedy tokens, and write a JSON report (plus Markdown and a plot on "
    "request). Per-question results go to OUT.questions.jsonl as they finish; running the same "
    "command again resumes."
)


def add_bench_parser(sub) -> None:
    summary = "benchmark methods against plain decoding on Spec-Bench questions"
    b = sub.add_parser("bench", help=summary, description=DESCRIPTION)
    b.add_argument(
        "--questions",
        default=None,
        help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl "
        "beside the repository, when it exists)",
    )
    b.add_argument(
        "--methods",
        default="ar,pld,jacobi,auto",
        help="comma-separated genrefine methods and hf_generate, hf_prompt_lookup, "
        "hf_assisted (transformers baselines; hf_assisted and sps need --draft-model); ar is "
        "always run (default ar,pld,jacobi,auto)",
    )
    b.add_argument("--categories", default=None, help="comma-separated categories (default all)")
    b.add_argument("--limit-per-category", type=int, default=None, metavar="N",
                   help="the first N questions of each category")
    b.add_argument("--max-new-tokens", type=int, default=128, help="per turn (default 128)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    b.add_argument("--repeats", type=int, default=1, help="runs of each question (default 1)")
    b.add_argument("--json", required=True, metavar="OUT.json", help="the JSON report")
    b.add_argument("--report", default=None, metavar="OUT.md", help="also a Markdown report")
    b.add_argument("--plot", default=None, metavar="OUT.png", help="also a figure")
    b.add_argument("--quick", action="store_true",
                   help="smoke test: 1 question per category, 24 new tokens")
    b.add_argument("--fresh", action="store_true",
                   help="discard earlier per-question results instead of resuming")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--no-tree-cut", dest="tree_cut", action="store_false",
                   help="verify whole drafts instead of cutting them to what pays on this machine "
                   "(trained methods; pld and rest on llama.cpp): block efficiency as the papers "
                   "measure it")
    b.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="self-drafting, trained methods and sps: project drafts onto the N most "
                   "frequent tokens (default: each method's own, see genrefine generate --help)")
    b.add_argument("--hf-dtype", choices=["bfloat16", "float32"], default=None,
                   help="the transformers baselines' dtype (default: genrefine's float dtype; with "
                   "quantized weights, bfloat16 where the CPU has native bfloat16 instructions, "
                   "else float32)")
    add_model_options(b)
    add_draft_model_option(b)
    add_drafter_option(b)


def cmd_bench(args) -> int:
    from ..bench.plan import BenchConfig, plan_bench
    from ..bench.runner import command_line, execute

    argv = sys.argv[1:] if sys.argv[1:2] == ["bench"] else _bench_argv(args)
    config = BenchConfig(
        json_path=args.json,
        questions=args.questions,
        methods=args.methods,
        model=args.model,
        draft_model=args.draft_model,
        drafter=args.drafter,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        categories=args.categories,
        limit_per_category=args.limit_per_category,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        report_path=args.report,
        plot_path=args.plot,
        quick=args.quick,
        fresh=args.fresh,
        progress=not args.no_progress,
        command=command_line(argv),
        tree_cut=args.tree_cut,
        draft_vocab=args.draft_vocab,
        hf_dtype=args.hf_dtype,
    )
    plan = plan_bench(config)  # every check that needs no model
    result = execute(plan)
    print(result.markdown)
    written = [plan.json_path, plan.jsonl_path, plan.report_path, plan.plot_path]
    print("wrote " + ", ".join(str(p) for p in written if p is not None), file=sys.stderr)
    bad = [m for m, r in result.report["methods"].items() if r.get("lossless") is False]
    if bad:
        print(f"genrefine: warning: output differs from the reference for {', '.join(bad)}",
              file=sys.stderr)
    return 0


def _bench_argv(args) -> list[str]:
    """The bench options as a command line (for the report, when sys.argv is not ours)."""
    out = ["bench"]
    for opt in ("questions", "methods", "model", "draft_model", "drafter", "categories", "limit_per_category",
                "max_new_tokens", "temperature", "repeats", "draft_vocab", "dtype", "device",
                "backend", "json",
                "report",
                "plot"):
        v = getattr(args, opt)
        if v is not None:
            out += [f"--{opt.replace('_', '-')}", str(v)]
    for flag in ("quick", "fresh"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    if not getattr(args, "tree_cut", True):
        out.append("--no-tree-cut")
    return out
