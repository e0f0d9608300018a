"""How often greedy ``ar`` on the GGUF's own quantized weights (the native runtime's integer
kernels) agrees token for token with llama.cpp on the same file (genrefine's llama.cpp backend,
exact kernels), and with the native runtime on float32 and bfloat16 weights.

For each prompt: the number of new tokens both produce before the first difference, and whether
the whole continuation is identical. Prompts: the first turns of the first ``--n`` questions of a
question file (default: Spec-Bench), as chat prompts.

    python benchmarks/bench_agreement.py [--n 12] [--max-new-tokens 64] [--questions FILE]
"""

from __future__ import annotations

import argparse
import json

import genrefine
from genrefine.bench.questions import default_questions_path, load_questions
from genrefine.diskcache import cpu_model


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--questions", default=None)
    args = ap.parse_args()
    path = args.questions or default_questions_path()
    questions = load_questions(path)[: args.n]
    quant = genrefine.load(dtype="gguf", quiet=True)
    others = {"llama.cpp": genrefine.load(backend="llama.cpp", quiet=True)}
    for dt in ("float32", "bfloat16"):
        others[dt] = genrefine.load(dtype=dt, quiet=True)
    rows = {name: [] for name in others}
    for q in questions:
        prompt = quant.chat_prompt([{"role": "user", "content": q.turns[0]}])
        ref = quant.generate(prompt, max_new_tokens=args.max_new_tokens, method="ar").token_ids
        for name, g in others.items():
            out = g.generate(prompt, max_new_tokens=args.max_new_tokens, method="ar").token_ids
            rows[name].append((first_difference(ref, out), ref == out, len(ref)))
    summary = {
        "cpu": cpu_model(),
        "prompts": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "questions": str(path),
        "against_quantized_ar": {
            name: {
                "identical_continuations": sum(r[1] for r in rs),
                "mean_tokens_before_first_difference": sum(r[0] for r in rs) / len(rs),
                "tokens_before_first_difference": [r[0] for r in rs],
            }
            for name, rs in rows.items()
        },
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
