"""``genrefine generate`` and ``genrefine demo``."""

from __future__ import annotations

import sys
import time

from ..diskcache import cpu_model
from ..models.protocol import weights_format
from .options import (
    add_draft_model_option,
    add_drafter_option,
    add_generation_options,
    add_model_options,
    method_options,
    read_prompt,
    validate_before_load,
)

DEMO_PROMPT = (
    "Summarize the following notes in two sentences, reusing their wording.\n\n"
    "Notes: The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
    "The council voted to extend the bicycle lanes on Main Street to the river by next summer. "
    "Shop owners on Main Street asked the council to keep parking on one side of Main Street. "
    "The council agreed to keep parking on the north side of Main Street and to review the "
    "bicycle lanes after one year.\n\nSummary: The city council"
)


def add_generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text from a prompt and print speed figures",
        description="Stream a continuation of PROMPT to stdout; a summary line goes to stderr.",
    )
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    add_model_options(g)
    add_generation_options(g)



def add_demo_parser(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="run plain decoding and speculative methods on one prompt and compare their speed",
        description=(
            "Generate from a built-in summarization prompt with each method, check that greedy "
            "outputs are identical, and print tokens/s and speedup over plain decoding."
        ),
    )
    d.add_argument("--methods", default="ar,pld,jacobi,auto", help="comma-separated methods")
    d.add_argument("--prompt", default=None, help="prompt text (default: a built-in one)")
    d.add_argument("--max-new-tokens", type=int, default=96)
    add_model_options(d)
    add_draft_model_option(d)
    add_drafter_option(d)


def _summary(result, elapsed: float) -> str:
    s = result.stats
    acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
    return (
        f"[{s.new_tokens} tokens in {elapsed:.2f} s, {s.tokens_per_s:.1f} tokens/s, "
        f"method {s.method}, {s.tokens_per_step:.2f} tokens/step{acc}]"
    )


def cmd_generate(args) -> int:
    from ..api import load
    from ..types import SamplingParams

    prompt = read_prompt(args.prompt)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # validates
    opts = method_options(args)
    validate_before_load(args, [args.method])
    gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    t0 = time.perf_counter()
    stream = gen.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        method=args.method,
        stop=args.stop,
        options=opts,
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_summary(stream.result, time.perf_counter() - t0), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from ..api import load
    from ..methods.base import MethodOptions
    from ..registry import is_lossless

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ar" not in methods:
        methods.insert(0, "ar")
    validate_before_load(args, methods)
    opts = MethodOptions(draft_model=args.draft_model, drafter=args.drafter)
    prompt = args.prompt or DEMO_PROMPT
    t0 = time.perf_counter()
    gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    print(f"model: {gen.name}, weights {weights_format(gen.model)}, CPU {cpu_model()}, "
          f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    gen.generate(prompt, max_new_tokens=8)  # warm-up
    results = {}
    for m in methods:
        results[m] = gen.generate(prompt, max_new_tokens=args.max_new_tokens, method=m, options=opts)
    base = results["ar"]
    print(f"\n--- ar output ---\n{base.text.strip()}\n")
    print(f"{'method':<10} {'tokens/s':>9} {'speedup':>8} {'tok/step':>9}  same output as ar")
    for m, r in results.items():
        s = r.stats
        same = r.token_ids == base.token_ids
        if not same and is_lossless(m):
            flag = "NO (a lossless method must match: please report this)"
        else:
            flag = "yes" if same else "no (lossy)"
        print(
            f"{m:<10} {s.tokens_per_s:>9.1f} {s.tokens_per_s / base.stats.tokens_per_s:>7.2f}x "
            f"{s.tokens_per_step:>9.2f}  {flag}"
        )
    return 0
