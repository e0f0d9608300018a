"""Self-drafting with and without a reduced draft vocabulary, against plain decoding.

Runs ``ar``, then ``early-exit-draft`` and ``swift`` drafting onto the N most frequent tokens and
onto the whole vocabulary, on the first question of each Spec-Bench category (first turn), in one
process after a warm-up, and checks every output equals ``ar``'s. Prints tokens/s, the ratio to
``ar`` and tokens per step::

    python benchmarks/bench_draft_vocab.py --n 6 --max-new-tokens 128 --vocab 32768
"""

from __future__ import annotations

import argparse
import time

import genrefine
from genrefine.bench.questions import default_questions_path, load_questions
from genrefine.methods.base import MethodOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=6, help="questions (one per category)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32768, help="reduced draft vocabulary size")
    args = ap.parse_args()
    g = genrefine.load(quiet=True)
    picks, seen = [], set()
    for q in load_questions(default_questions_path()):
        if q.category not in seen:
            seen.add(q.category)
            picks.append(q)
    picks = picks[: args.n]
    full = g.model.vocab_size
    cfgs = [("ar", None)] + [
        (name, MethodOptions(draft_vocab=v))
        for v in (args.vocab, full)
        for name in ("early-exit-draft", "swift")
    ]
    for name, opts in cfgs:  # warm-up: frequency table, kernels
        g.generate("Hello there, how are you?", max_new_tokens=16, method=name, options=opts)
    totals = [[0, 0.0, 0] for _ in cfgs]  # tokens, seconds, steps
    for q in picks:
        prompt = g.chat_prompt([{"role": "user", "content": q.turns[0]}])
        ref = None
        for i, (name, opts) in enumerate(cfgs):
            t0 = time.perf_counter()
            r = g.generate(prompt, max_new_tokens=args.max_new_tokens, method=name, options=opts)
            totals[i][1] += time.perf_counter() - t0
            ref = r.token_ids if ref is None else ref
            if r.token_ids != ref:
                raise SystemExit(f"{name} (vocab {opts.draft_vocab}) differs from ar on {q.category}")
            totals[i][0] += len(r.token_ids)
            totals[i][2] += r.stats.steps
    ar = totals[0][0] / totals[0][1]
    print(f"{len(picks)} questions, {args.max_new_tokens} new tokens, {g.model.dtype}")
    for (name, opts), (tokens, seconds, steps) in zip(cfgs, totals):
        vocab = "-" if opts is None else opts.draft_vocab
        rate = tokens / seconds
        print(f"{name:18s} draft vocab {vocab!s:>7}: {rate:6.1f} tokens/s {rate / ar:5.2f}x ar, "
              f"{tokens / max(1, steps):.2f} tokens/step")


if __name__ == "__main__":
    main()
