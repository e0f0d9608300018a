"""The server under concurrent load: throughput and latency at 1, 2, 4, 8 and 16 clients.

Starts ``genrefine serve``'s app in this process (uvicorn on a thread, 127.0.0.1, a free port)
on the embedded Gemma 3 270M (or ``--model``), then for each method and each number of concurrent
clients sends the same requests over HTTP (``POST /v1/chat/completions``, greedy, the first turns
of Spec-Bench questions, one per category first) and measures

* throughput: completion tokens of all requests / wall time from the first send to the last reply;
* median latency: per request, from its send to its complete reply.

The methods run level by level (all methods at one level, then the next level), each level's
order rotated from the last, so a slow drift of the host's speed does not fall on one method.
``--rounds N`` runs every level N times, each round in another order, and reports the median
round per method and level with the range beside it: on a shared 2-core host one run of the
same method at 16 clients varies by 10-15%, more than the differences being measured.

By default ``ar`` batching (plain decoding, one forward per step for the whole batch), ``pld``
and ``auto`` (which weighs the batch: it drafts less, or not at all, when the shared forward is
full) are compared; ``--methods best`` compares ``ar`` with the best of ``--candidates`` instead,
picked first by a short run of each with one client. Every reply's text is checked against
the first method's reply with one client: greedy output must not depend on the method or on
what else is in the batch. The output names the CPU, and a summary table gives tokens/s per
method per level and ``auto`` against the best of the others.

    python benchmarks/bench_server.py                        # 1, 2, 4, 8, 16 clients; ar, pld, auto
    python benchmarks/bench_server.py --quick                # smoke test: 1, 2 clients, short
    python benchmarks/bench_server.py --methods ar,pld --json out/server.json
    python benchmarks/bench_server.py --clients 16 --rounds 3     # medians of 3 rounds

Figures on a shared CPU are noisy; run it on an idle machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FALLBACK_PROMPTS = [
    "Summarize the plot of a heist movie in five sentences.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "List the planets of the solar system with one fact about each.",
    "Explain how a bicycle's gears work to a ten-year-old.",
]


@dataclass
class Level:
    """One method at one number of concurrent clients."""

    method: str
    clients: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    median_latency_s: float
    same_as_ar: int  # replies whose text equals ar's with one client
    steps: int = 0  # target forwards after the prefills, summed over the requests (usage)
    drafted: int = 0  # draft tokens sent to verification, summed (usage.speculative)
    decoded: float = 0.0  # tokens those steps emitted (tokens per step x steps), summed
    round: int = 0  # which of --rounds (0-based)


def prompts(n: int) -> list[str]:
    from genrefine.bench.questions import default_questions_path, load_questions

    path = default_questions_path()
    if path is None:
        qs = FALLBACK_PROMPTS
    else:  # one question per category first, then the rest, in file order
        questions = load_questions(path)
        seen, first, rest = set(), [], []
        for q in questions:
            (rest if q.category in seen else first).append(q.turns[0])
            seen.add(q.category)
        qs = first + rest
    return [qs[i % len(qs)] for i in range(n)]


class LiveServer:
    def __init__(self, gen, config) -> None:
        import httpx
        import uvicorn

        from genrefine.server import bind, create_app

        self.app = create_app(gen, config)
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.local = threading.local()
        self.httpx = httpx

    def client(self):
        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = self.httpx.Client(base_url=self.url, timeout=3600)
        return c

    def chat(self, prompt: str, method: str, max_tokens: int) -> tuple[str, dict, float]:
        t0 = time.perf_counter()
        r = self.client().post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "method": method})
        seconds = time.perf_counter() - t0
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["message"]["content"], body["usage"], seconds

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def run_level(s: LiveServer, method: str, clients: int, reqs: list[str], max_tokens: int,
              reference: dict[str, str] | None) -> tuple[Level, dict[str, str]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: s.chat(p, method, max_tokens), reqs))
    seconds = time.perf_counter() - t0
    tokens = sum(u["completion_tokens"] for _, u, _ in results)
    spec = [u.get("speculative") or {} for _, u, _ in results]
    texts = {p: text for p, (text, _, _) in zip(reqs, results)}
    same = sum(reference is not None and reference.get(p) == t for p, (t, _, _) in zip(reqs, results))
    return Level(method, clients, len(reqs), tokens, seconds, tokens / seconds,
                 statistics.median(sec for _, _, sec in results), same,
                 sum(x.get("steps", 0) for x in spec), sum(x.get("drafted", 0) for x in spec),
                 sum((x.get("tokens_per_step") or 0.0) * x.get("steps", 0) for x in spec)), texts


def run_order(methods: list[str], level_index: int, round_index: int) -> list[str]:
    """The methods' order at one level of one round: rotated by one per level and per round,
    so that each method runs early and late alike (the first level of the first round keeps
    ``methods``' order: its first method's replies are the reference texts)."""
    k = (level_index + round_index) % len(methods)
    return methods[k:] + methods[:k]


def summarize(rows: list[Level], methods: list[str], levels: list[int]) -> list[dict]:
    """Per level: the median over rounds of each method's tokens/s (``tokens_per_s``), their
    range (``range``: [min, max]) and, when ``auto`` ran beside others, ``auto``'s median over
    the fastest of the others' (``auto_vs_best``, 1.0 = as fast)."""
    runs: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        runs.setdefault((r.method, r.clients), []).append(r.tokens_per_s)
    out = []
    for c in levels:
        row: dict = {"clients": c,
                     "tokens_per_s": {m: statistics.median(runs[m, c]) for m in methods if (m, c) in runs},
                     "range": {m: [min(runs[m, c]), max(runs[m, c])] for m in methods if (m, c) in runs}}
        others = [v for m, v in row["tokens_per_s"].items() if m != "auto"]
        if "auto" in row["tokens_per_s"] and others:
            row["auto_vs_best"] = row["tokens_per_s"]["auto"] / max(others)
        out.append(row)
    return out


def summary_table(summary: list[dict], methods: list[str]) -> str:
    """The Markdown table of :func:`summarize`: one row per level, one column per method."""
    vs = any("auto_vs_best" in row for row in summary)
    rounds = any(lo != hi for row in summary for lo, hi in row.get("range", {}).values())
    others = " / ".join(f"`{m}`" for m in methods if m != "auto")
    head = "| clients | " + " | ".join(f"`{m}` tokens/s" for m in methods)
    head += f" | `auto` vs best of {others} |" if vs else " |"
    lines = [head, "| ---: |" + " ---: |" * (len(methods) + vs)]

    def cell(row, m):
        if m not in row["tokens_per_s"]:
            return "-"
        text = f"{row['tokens_per_s'][m]:.1f}"
        if rounds and m in row.get("range", {}):
            lo, hi = row["range"][m]
            text += f" ({lo:.1f}-{hi:.1f})"
        return text

    for row in summary:
        cells = [cell(row, m) for m in methods]
        if vs:
            cells.append(f"{row['auto_vs_best']:.2f}x" if "auto_vs_best" in row else "-")
        lines.append(f"| {row['clients']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", default="1,2,4,8,16",
                   help="concurrency levels (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    p.add_argument("--max-tokens", type=int, default=96, help="per request (default 96)")
    p.add_argument("--methods", default="ar,pld,auto",
                   help="methods to compare (default ar,pld,auto; 'best': ar and the best of "
                        "--candidates)")
    p.add_argument("--candidates", default="pld,jacobi,lookahead,rest,auto",
                   help="with --methods best: speculative methods to pick the best from (one "
                        "client, 4 requests)")
    p.add_argument("--batching", default="auto", choices=["auto", "always", "never"])
    p.add_argument("--rounds", type=int, default=1,
                   help="run every level this many times, in rotated method orders, and report "
                        "medians with their range (default 1)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="smoke test: 1, 2 clients, 4 requests, 24 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.max_tokens = "1,2", 4, 24
    levels = [int(c) for c in args.clients.split(",")]
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")

    import torch

    import genrefine
    from genrefine.diskcache import cpu_model
    from genrefine.server import ServerConfig

    gen = genrefine.load(args.model, dtype=args.dtype, device=args.device)
    config = ServerConfig(method="ar", max_batch=max(levels), max_queue=max(args.requests, 1),
                          batching=args.batching)
    s = LiveServer(gen, config)
    print(f"model {gen.name}, {str(gen.model.dtype).replace('torch.', '')}, "
          f"{gen.model.device}, batched forward {'on' if s.app.state.server.scheduler.batched else 'off'}",
          file=sys.stderr)
    cpu = f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"CPU {cpu}", file=sys.stderr)
    try:
        reqs = prompts(args.requests)
        s.chat(reqs[0], "ar", 8)  # warm-up
        if args.methods != "best":
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            for m in methods:
                s.chat(reqs[0], m, 8)  # builds the method (auto: its cost table) before timing
        else:
            picks = {}
            for m in [c.strip() for c in args.candidates.split(",") if c.strip()]:
                s.chat(reqs[0], m, 8)  # builds the method (auto: its cost table)
                lvl, _ = run_level(s, m, 1, reqs[:4], args.max_tokens, None)
                picks[m] = lvl.tokens_per_s
                print(f"  candidate {m}: {lvl.tokens_per_s:.1f} tokens/s with one client",
                      file=sys.stderr)
            methods = ["ar", max(picks, key=picks.get)]
        rows: list[Level] = []
        reference = None
        for i, c in enumerate(levels):
            for r in range(args.rounds):
                for m in run_order(methods, i, r):
                    lvl, texts = run_level(s, m, c, reqs, args.max_tokens, reference)
                    lvl.round = r
                    if reference is None:  # the first method at the first level
                        reference = texts
                        lvl.same_as_ar = lvl.requests
                    rows.append(lvl)
                    tag = f" (round {r + 1})" if args.rounds > 1 else ""
                    print(f"  {m} x{c}{tag}: {lvl.tokens_per_s:.1f} tokens/s, median latency "
                          f"{lvl.median_latency_s:.2f} s", file=sys.stderr)
    finally:
        s.close()

    print(f"\nmodel {gen.name}, {str(gen.model.dtype).replace('torch.', '')}, {gen.model.device}; "
          f"CPU {cpu}; {args.requests} requests per level, {args.max_tokens} tokens each, greedy"
          + (f"; median of {args.rounds} rounds (range)" if args.rounds > 1 else ""))
    summary = summarize(rows, methods, levels)
    print()
    print(summary_table(summary, methods))
    rows.sort(key=lambda r: (methods.index(r.method), levels.index(r.clients), r.round))
    rnd = args.rounds > 1
    print(f"\n| method | clients |{' round |' if rnd else ''} requests | tokens | tokens/s | median latency (s) | "
          f"tokens/step | drafted/step | same text as {methods[0]} x{levels[0]} |")
    print("| --- | ---: |" + (" ---: |" if rnd else "") + " ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        per = (lambda x: f"{x / r.steps:.2f}") if r.steps else (lambda x: "-")
        print(f"| {r.method} | {r.clients} |{f' {r.round + 1} |' if rnd else ''} {r.requests} | {r.tokens} | {r.tokens_per_s:.1f} | "
              f"{r.median_latency_s:.2f} | {per(r.decoded)} | {per(r.drafted)} | {r.same_as_ar}/{r.requests} |")
    if "auto" in methods and len(methods) > 1:
        ok = all(row["auto_vs_best"] >= 1.0 for row in summary)
        print(f"\nauto at least as fast as {', '.join(m for m in methods if m != 'auto')} at every "
              f"level: {'yes' if ok else 'no'}")
    if args.json:
        out = {"command": "python benchmarks/bench_server.py " + " ".join(argv or sys.argv[1:]),
               "model": gen.name, "dtype": str(gen.model.dtype), "device": str(gen.model.device),
               "cpu": cpu_model(), "threads": torch.get_num_threads(),
               "requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "summary": summary, "levels": [asdict(r) for r in rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
