"""Block efficiency and speed of the trained drafters on held-back training text (not benchmark text).

The paper's table for lattice rescoring (Kim et al. 2024) compares tokens per step of BPD drafts
before and after rescoring. This prints that comparison for the embedded model's drafters (or
the folders given), on prompts cut from the held-back windows of the training corpus, greedy,
each output checked equal to ``ar``'s, with each method's speed over ``ar`` (the methods run one
after another on each prompt, so slow drifts of the machine hit all alike)::

    python benchmarks/bench_trained.py --prompts 8
    python benchmarks/bench_trained.py --prompts 8 --draft-vocab 32768
    python benchmarks/bench_trained.py --heads DIR --eagle DIR --self-generated 400 --max-tokens 250000
    python benchmarks/bench_trained.py --prompts 8 --no-cut    # whole drafts, as the papers compare
    python benchmarks/bench_trained.py --prompts 8 --eagle-engine DIR   # and an engine-style EAGLE

``bpd+ngram (chain)`` verifies only the best rescored path (``p = 1``), the like-for-like
comparison with ``bpd``; ``bpd+ngram`` is the method's default, the best 4 paths as a tree.
The corpus options must match the training run's for the held-back windows to be held back.
"""

from __future__ import annotations

import argparse
import time

import torch

import genrefine
from genrefine.methods.base import FixedPolicy, Method, MethodOptions
from genrefine.registry import build_method
from genrefine.train.corpus import default_corpus
from genrefine.train.record import record
from genrefine.engine import Engine, Stats
from genrefine.train.run import HELD_OUT
from genrefine.types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default=None, help="heads drafter folder (default: shipped)")
    ap.add_argument("--eagle", default=None, help="eagle drafter folder (default: shipped)")
    ap.add_argument("--eagle-engine", default=None, metavar="DIR",
                    help="also run this EAGLE drafter (say, one trained with --eagle-style engine, "
                    "the shape `genrefine export --format eagle` writes) as `eagle (DIR's style)`")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--self-generated", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=250_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--no-cut", action="store_true",
                    help="verify whole drafts (no cost-aware cut; --no-tree-cut of the CLI)")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="draft onto the N most frequent trained tokens (default: the methods')")
    args = ap.parse_args()
    g = genrefine.load(quiet=True)
    m, tok = g.model, g.tokenizer
    texts = default_corpus(tok)
    if args.self_generated:
        from genrefine.train.selfgen import self_generated_texts

        texts = self_generated_texts(m, tok, set(g.eos_ids), args.self_generated) + texts
    rec = record(m, tok, texts, 256, args.max_tokens)
    test = rec.split(HELD_OUT, args.seed)[1]
    prompts = [test.tokens[i, : args.prompt_len] for i in range(min(args.prompts, test.tokens.shape[0]))]
    methods = {"ar": Method("ar")}
    for name in ("bpd", "bpd+ngram (chain)", "bpd+ngram", "bpd+lm", "medusa", "eagle"):
        base = name.split(" ")[0]
        folder = args.eagle if base == "eagle" else args.heads
        opts = MethodOptions(drafter=folder, draft_vocab=args.draft_vocab, tree_cut=not args.no_cut)
        method = build_method(base, m, opts, tok)
        if name.endswith("(chain)"):
            d = method.drafters[0]
            d.num_paths = 1
            method = Method(name, [d], FixedPolicy(d, d.num_heads), d.num_heads)
        methods[name] = method
    if args.eagle_engine:
        opts = MethodOptions(drafter=args.eagle_engine, draft_vocab=args.draft_vocab, tree_cut=not args.no_cut)
        method = build_method("eagle", m, opts, tok)
        methods[f"eagle ({method.drafters[0].net.style})"] = method

    def one(method, prompt):
        st = Stats(method.name)
        t0 = time.perf_counter()
        out = [t for piece in Engine(m, method).generate(prompt, args.new_tokens, SamplingParams(), stats=st)
               for t in piece]
        return time.perf_counter() - t0, st.steps, st.decode_tokens, out

    one(methods["ar"], prompts[0])  # warm-up
    tot = {name: [0.0, 0, 0, True] for name in methods}
    for prompt in prompts:
        ref = None
        for name, method in methods.items():
            secs, steps, toks, out = one(method, prompt)
            ref = out if ref is None else ref
            t = tot[name]
            t[0], t[1], t[2], t[3] = t[0] + secs, t[1] + steps, t[2] + toks, t[3] and out == ref
    ar_rate = tot["ar"][2] / tot["ar"][0]
    rows = []
    print(f"{'method':<20} tokens/step  speedup over ar  output")
    for name, (secs, steps, toks, same) in tot.items():
        tps = toks / steps if steps else 1.0
        rate = toks / secs
        rows.append((name, tps, same))
        print(f"{name:<20} {tps:11.2f}  {rate / ar_rate:14.2f}x  {'same as ar' if same else 'DIFFERS FROM ar'}"
              + (f"  ({rate:.1f} tokens/s)" if name == "ar" else ""), flush=True)
    rows = rows[1:]
    bpd = rows[0][1]
    print()
    for name, tps, _ in rows[1:4]:
        print(f"{name:<20} {100 * (tps / bpd - 1):+5.1f}% tokens/step over bpd")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
