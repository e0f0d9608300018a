"""llama-cpp-python's own loop on several builds of its library, interleaved: the stock library(s)
given as NAME=LIBDIR (each in a child process, as the bench's llamacpp_plain) against genrefine's exact
build in this process (llamacpp_exact); 96 new tokens, greedy, the embedded model.

    python benchmarks/bench_llamacpp_stock.py THREADS ROUNDS stock=$GENREFINE_CACHE/llamacpp-stock/<key>/lib
"""
import os, statistics, sys, time
from genrefine.models.default import embedded_model_path
from genrefine.bench.baselines import LlamaCppStockBackend, LlamaCppExactBackend
from genrefine.models.llamacpp import LlamaCppModel
threads, rounds = int(sys.argv[1]), int(sys.argv[2])
p = str(embedded_model_path())
m = LlamaCppModel(p, n_ctx=2048)
PROMPTS = [
    "Write a Python function that parses an ISO 8601 date string and returns a datetime object. Explain each step.",
    "Summarize the following: The city council met on Tuesday to discuss the new public library, which will open in March and hold forty thousand books.",
    "Explain the difference between a process and a thread in an operating system.",
    "Write the docstring for a function `merge_intervals(intervals)` that merges overlapping intervals.",
    "Give three tips for writing clear technical documentation.",
    "What is the capital of Australia, and why was it chosen?",
]
prompts = [m.tokenize(f"<start_of_turn>user\n{t}<end_of_turn>\n<start_of_turn>model\n") for t in PROMPTS]
m.close()
eos = [1, 106]
b = {}
for a in sys.argv[3:]:
    k, lib = a.split("=", 1)
    b[k] = LlamaCppStockBackend(p, eos, 2048, threads, lib)
    print(k, b[k].system_info)
b["exact"] = LlamaCppExactBackend(p, eos, 2048, threads)
for x in b.values():
    x.run(prompts[0], 16, 0.0, None)
tot = {k: [0, 0.0] for k in b}
per = {k: [] for k in b}
toks = {k: [] for k in b}
names = list(b)
for rnd in range(rounds):
    for i, pr in enumerate(prompts):
        j = (i + rnd) % len(names)
        order = names[j:] + names[:j]
        for k in order:
            r = b[k].run(pr, 96, 0.0, None)
            tot[k][0] += len(r.token_ids); tot[k][1] += r.seconds
            per[k].append(len(r.token_ids) / r.seconds)
            if rnd == 0: toks[k].append(r.token_ids)
        print(rnd, i, {k: f"{per[k][-1]:.1f}" for k in b}, "load %.2f" % os.getloadavg()[0], flush=True)
for k, (n, s) in tot.items():
    same = sum(t == e for t, e in zip(toks[k], toks["exact"]))
    print(f"{k}: {n} tokens in {s:.1f} s = {n/s:.1f} tok/s; median per run {statistics.median(per[k]):.1f}; "
          f"best {max(per[k]):.1f}; greedy tokens = exact's on {same}/{len(toks[k])} prompts")
for x in b.values():
    if hasattr(x, "close"): x.close()
