"""Plain greedy decoding: genrefine ``ar`` against transformers' ``generate`` on the same weights.

Both run the embedded Gemma 3 270M (one GGUF file; genrefine through its native runtime,
transformers through ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``) in the same
dtype and the same process, on the same prompts (the first turns of the first ``--n`` Spec-Bench
questions, as :meth:`genrefine.Generator.chat_prompt` builds them), interleaved per prompt with
the order alternating, after one warm-up generation each. Greedy, ``max_new_tokens`` as given,
no ``min_new_tokens``: each side's count is the tokens it actually generated, EOS included.

It also times ``genrefine.load()`` in fresh subprocesses: cold (``GENREFINE_CACHE`` pointing at a
new empty directory, so the model is assembled and converted through transformers) and then
warm (the same directory again).

    python benchmarks/bench_ar.py                          # 18 questions, 128 tokens, fp32 + bf16
    python benchmarks/bench_ar.py --n 6 --max-new-tokens 64 --dtypes bfloat16

Figures on a shared CPU are noisy; run it on an idle machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
DTYPES = ("float32", "bfloat16")
WARMUP_TOKENS = 16

_LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import genrefine
t1 = time.perf_counter()
gen = genrefine.load(dtype=sys.argv[1], quiet=True)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


@dataclass
class Totals:
    """Tokens and seconds summed over the prompts, per backend."""

    tokens: int = 0
    seconds: float = 0.0
    engine_seconds: float = 0.0  # genrefine only: Stats.time_total (no text decoding)
    per_prompt: list[float] = field(default_factory=list)  # tokens/s of each prompt

    def add(self, tokens: int, seconds: float, engine_seconds: float = 0.0) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.engine_seconds += engine_seconds
        self.per_prompt.append(tokens / seconds if seconds > 0 else 0.0)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="genrefine ar vs transformers greedy generate on the embedded model"
    )
    p.add_argument(
        "--questions",
        type=Path,
        default=DEFAULT_QUESTIONS,
        help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl "
        "relative to the repository root)",
    )
    p.add_argument("--n", type=int, default=18, help="first N questions (first turns only)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma-separated, from: " + ", ".join(DTYPES)
    )
    p.add_argument(
        "--skip-load-times", action="store_true", help="do not time cold and warm loads"
    )
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes takes a comma-separated list from {', '.join(DTYPES)}; got {bad}")
    if args.n < 1 or args.max_new_tokens < 1:
        p.error("--n and --max-new-tokens must be positive")
    if not args.questions.is_file():
        p.error(f"question file {str(args.questions)!r} not found: give --questions FILE.jsonl")
    return args


def first_turns(path: Path, n: int) -> list[str]:
    """The first turn of each of the first ``n`` questions of a Spec-Bench JSONL file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["turns"][0])
                if len(out) == n:
                    break
    return out


def time_loads(dtypes: list[str]) -> list[tuple[str, str, dict]]:
    """(kind, dtype, {"import_s", "load_s", "process_s"}) for a cold load then warm loads."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="genrefine-bench-cache-") as cache:
        env = dict(os.environ, GENREFINE_CACHE=cache)
        plan = [("cold", dtypes[0])] + [("warm", d) for d in dtypes]
        for kind, dtype in plan:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", _LOAD_SNIPPET, dtype],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} load failed:\n{proc.stderr[-2000:]}")
            d = json.loads(proc.stdout.strip().splitlines()[-1])
            d["process_s"] = wall
            rows.append((kind, dtype, d))
    return rows


def run_genrefine(gen, prompt_ids: list[int], max_new: int) -> tuple[int, float, float, list[int]]:
    """(tokens generated with EOS, wall seconds of generate(), engine seconds, token ids)."""
    t0 = time.perf_counter()
    r = gen.generate(prompt_ids, max_new_tokens=max_new, method="ar")
    wall = time.perf_counter() - t0
    ended_eos = r.finish_reason == "stop"  # no stop strings here: "stop" means an EOS token
    return len(r.token_ids) + int(ended_eos), wall, r.stats.time_total, list(r.token_ids)


def run_transformers(hf, prompt_ids, max_new, eos, pad) -> tuple[int, float, list[int]]:
    """(tokens generated with EOS, wall seconds of generate(), token ids without EOS)."""
    import torch

    x = torch.tensor([prompt_ids], dtype=torch.long)  # [1, L]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        wall = time.perf_counter() - t0
    new = out[0, len(prompt_ids) :].tolist()  # generate returns the prompt too
    ids = new
    for i, t in enumerate(new):
        if t in eos:
            new, ids = new[: i + 1], new[:i]
            break
    return len(new), wall, ids


def bench_dtype(dtype: str, prompts: list[str], max_new: int) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    import genrefine
    from genrefine.models.default import embedded_model_path

    gen = genrefine.load(dtype=dtype, quiet=True)
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)
    ).eval()
    eos = sorted(gen.eos_ids)
    pad = gen.tokenizer.pad_token_id
    encoded = [gen.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    run_genrefine(gen, encoded[0], WARMUP_TOKENS)  # warm-up: first-call costs
    run_transformers(hf, encoded[0], WARMUP_TOKENS, eos, pad)
    ours, theirs = Totals(), Totals()
    same = 0
    for i, ids in enumerate(tqdm(encoded, desc=dtype, unit="prompt", file=sys.stderr)):
        order = ("g", "t") if i % 2 == 0 else ("t", "g")  # alternate who goes first
        for who in order:
            if who == "g":
                n, wall, engine, g_ids = run_genrefine(gen, ids, max_new)
                ours.add(n, wall, engine)
            else:
                n, wall, t_ids = run_transformers(hf, ids, max_new, eos, pad)
                theirs.add(n, wall)
        same += int(g_ids == t_ids)
    del hf, gen
    return {
        "dtype": dtype,
        "ours": ours,
        "theirs": theirs,
        "same": same,
        "n": len(encoded),
        "prompt_tokens": sum(len(e) for e in encoded),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import torch

    prompts = first_turns(args.questions, args.n)
    print("command:", shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv))
    print(
        f"{len(prompts)} prompts (first turns of {args.questions}), max_new_tokens "
        f"{args.max_new_tokens}, greedy, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} CPUs visible"
    )
    results = [bench_dtype(d, prompts, args.max_new_tokens) for d in args.dtypes]

    print()
    print(
        f"{'dtype':<9} {'genrefine ar tok/s':>18} {'(engine only)':>13} "
        f"{'transformers tok/s':>18} {'ratio g/t':>9} {'tokens g/t':>11} {'identical':>9}"
    )
    for r in results:
        o, t = r["ours"], r["theirs"]
        engine = o.tokens / o.engine_seconds if o.engine_seconds > 0 else 0.0
        ratio = o.tokens_per_s / t.tokens_per_s if t.tokens_per_s > 0 else float("nan")
        print(
            f"{r['dtype']:<9} {o.tokens_per_s:>18.1f} {engine:>13.1f} {t.tokens_per_s:>18.1f} "
            f"{ratio:>9.2f} {o.tokens:>5}/{t.tokens:<5} {r['same']:>4}/{r['n']:<4}"
        )
    print("tok/s = tokens generated (EOS included) / seconds of generate(), summed over prompts")
    print("(engine only) = genrefine's Stats.time_total, i.e. without incremental text decoding")
    for r in results:
        o, t = r["ours"], r["theirs"]
        per = [a / b for a, b in zip(o.per_prompt, t.per_prompt) if b > 0]
        if per and t.tokens_per_s > 0:
            print(
                f"ratio genrefine/transformers, {r['dtype']}: "
                f"{o.tokens_per_s / t.tokens_per_s:.2f} (per prompt: median "
                f"{statistics.median(per):.2f}, min {min(per):.2f}, max {max(per):.2f})"
            )

    if not args.skip_load_times:
        print()
        print(f"{'load':<5} {'dtype':<9} {'load() s':>9} {'import s':>9} {'process s':>10}")
        for kind, dtype, d in time_loads(args.dtypes):
            print(
                f"{kind:<5} {dtype:<9} {d['load_s']:>9.1f} {d['import_s']:>9.1f} "
                f"{d['process_s']:>10.1f}"
            )
        print("cold: GENREFINE_CACHE = a new empty directory (assemble + convert); warm: again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
