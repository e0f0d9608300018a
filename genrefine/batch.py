"""Batch generation over a JSONL file: ``genrefine batch`` and its Python API.

    from genrefine.batch import BatchSettings, run_batch, run_batch_ray
    gen = genrefine.load()
    summary = run_batch(gen, "in.jsonl", "out.jsonl", BatchSettings(method="pld"))
    summary = run_batch_ray({"model": None}, "in.jsonl", "out.jsonl", BatchSettings(), num_actors=2)

Input: one JSON object per line::

    {"id": "q1", "prompt": "Once upon a time"}
    {"id": 7, "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 64,
     "temperature": 0.7, "seed": 3, "method": "pld", "meta": {"anything": "passed through"}}

``id`` (a string or an integer, unique in the file) and exactly one of ``prompt`` (text) or
``messages`` (chat, through the tokenizer's chat template) are required; ``max_new_tokens``,
``temperature``, ``seed`` and ``method`` override the run's settings for that line; ``meta`` is
copied to the result as it is. Any other field is a mistake (a misspelt option must not be
ignored), so the line is bad. Blank lines are skipped.

Output: one JSON object per finished line, appended and flushed as each finishes, so a crash
loses nothing done: ``id``, ``text``, ``token_ids``, ``finish_reason``, ``method``, ``seed`` (the
one used, None when greedy), ``prompt_tokens``, ``new_tokens``, ``steps``, ``drafted``,
``accepted``, ``tokens_per_step``, ``acceptance_rate``, ``drafter_steps``, ``time_s``, ``line``
(the input line number) and ``meta`` when the input had one. A rerun skips the ids already in the
output (resumable); a last line cut short by a crash is dropped and redone.

Bad lines (not JSON, no prompt, wrong types) and lines that fail to generate (a prompt longer
than the context) are reported with their line number, skipped and counted; duplicate ids are
an error before anything runs.

Seeds: a sampled line (temperature > 0) uses its own ``seed`` or one derived from the run's seed
and its id (:func:`line_seed`), and is decoded by a method instance built for it alone, so its
output depends on the line only: a serial run and a Ray run give the same outputs line for line.
Greedy lines share the generator's method instances (drafters that learn keep what they learned;
a lossless method's greedy output is the same whatever its drafter drafts).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, GenrefineError
from .methods.base import MethodOptions
from .types import SEED_RANGE

LINE_FIELDS = ("id", "prompt", "messages", "max_new_tokens", "temperature", "seed", "method", "meta")


@dataclass(frozen=True)
class BatchSettings:
    """The run's defaults; a line may override max_new_tokens, temperature, seed and method."""

    method: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # the base of the seeds derived for sampled lines without a seed of their own
    stop: tuple[str, ...] = ()
    options: MethodOptions = field(default_factory=MethodOptions)

    def __post_init__(self) -> None:
        from .registry import METHODS
        from .types import SamplingParams

        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be a positive integer")
        SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)  # validates


@dataclass(frozen=True)
class BatchLine:
    """One valid input line."""

    id: str | int
    line_no: int  # 1-based, in the input file
    prompt: str | None = None
    messages: tuple | None = None  # of {"role": str, "content": str}
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    method: str | None = None
    meta: object = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BatchLine":
        d = json.loads(text)
        if d["messages"] is not None:
            d["messages"] = tuple(d["messages"])
        return cls(**d)


@dataclass(frozen=True)
class BadLine:
    """A line that was skipped, and why."""

    line_no: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.message}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_line(text: str, line_no: int) -> BatchLine:
    """One input line as a :class:`BatchLine`; a :class:`ValueError` says what is wrong."""
    from .registry import METHODS

    try:
        d = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"a line must be a JSON object, got {type(d).__name__}")
    unknown = [k for k in d if k not in LINE_FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(LINE_FIELDS)})")
    if "id" not in d:
        raise ValueError("no id")
    i = d["id"]
    if not (_is_int(i) or (isinstance(i, str) and i)):
        raise ValueError(f"id must be a non-empty string or an integer, got {i!r}")
    if ("prompt" in d) == ("messages" in d):
        raise ValueError("give exactly one of prompt (text) and messages (chat)")
    prompt = messages = None
    if "prompt" in d:
        prompt = d["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
    else:
        messages = d["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for k, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{k}] must be an object with string role and content")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    n = d.get("max_new_tokens")
    if n is not None and not (_is_int(n) and n >= 1):
        raise ValueError(f"max_new_tokens must be a positive integer, got {n!r}")
    t = d.get("temperature")
    if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {t!r}")
    s = d.get("seed")
    if s is not None and not (_is_int(s) and SEED_RANGE[0] <= s <= SEED_RANGE[1]):
        raise ValueError(f"seed must be an integer, got {s!r}")
    m = d.get("method")
    if m is not None and m not in METHODS:
        raise ValueError(f"unknown method {m!r}")
    return BatchLine(i, line_no, prompt, messages, n, None if t is None else float(t), s, m,
                     d.get("meta"))


def read_input(path: str | os.PathLike) -> tuple[list[BatchLine], list[BadLine]]:
    """The valid lines and the bad ones of a JSONL file.

    Raises :class:`ConfigError` when the file cannot be read or an id appears twice (with the
    line numbers of every duplicate), before anything runs.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"input {str(path)!r} does not exist or is not a file")
    lines: list[BatchLine] = []
    bad: list[BadLine] = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                lines.append(parse_line(text, no))
            except ValueError as e:
                bad.append(BadLine(no, str(e)))
    seen: dict[str, list[int]] = {}
    for ln in lines:
        seen.setdefault(json.dumps(ln.id), []).append(ln.line_no)
    dups = [(k, v) for k, v in seen.items() if len(v) > 1]
    if dups:
        shown = "; ".join(f"id {k} on lines {', '.join(map(str, v))}" for k, v in dups[:5])
        more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
        raise ConfigError(f"duplicate ids in {str(path)!r}: {shown}{more}")
    return lines, bad


def finished_ids(out: str | os.PathLike) -> set[str]:
    """The ids (as JSON text, so 1 and "1" differ) already in an output file.

    A last line cut short by a crash is removed from the file (it is redone)."""
    p = Path(out)
    if not p.exists():
        return set()
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a partial last line: drop it so appends start on a fresh line
        with open(p, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    ids = set()
    for no, text in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            ids.add(json.dumps(json.loads(text)["id"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"output {str(out)!r} line {no} is not a result line: write to another file"
            ) from None
    return ids


def line_seed(line: BatchLine, settings: BatchSettings) -> int | None:
    """The seed a line samples with: its own, else one derived from the run's seed and the line's
    id (a stable hash, the same on every machine and in every process); None when greedy."""
    temperature = settings.temperature if line.temperature is None else line.temperature
    if temperature == 0:
        return None
    if line.seed is not None:
        return line.seed
    key = f"{settings.seed}\0{json.dumps(line.id)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def run_line(gen, line: BatchLine, settings: BatchSettings) -> dict:
    """Generate one line with a :class:`genrefine.Generator`; its result record."""
    from .registry import build_method

    method = line.method or settings.method
    temperature = settings.temperature if line.temperature is None else line.temperature
    seed = line_seed(line, settings)
    prompt = gen.chat_prompt(list(line.messages)) if line.messages is not None else line.prompt
    # sampled lines: a fresh method, so no drafter state from other lines changes the draws
    m = method if temperature == 0 else build_method(method, gen.model, settings.options,
                                                     tokenizer=gen.tokenizer)
    t0 = time.perf_counter()
    r = gen.stream_tokens(
        prompt,
        max_new_tokens=line.max_new_tokens or settings.max_new_tokens,
        temperature=temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=seed,
        method=m,
        stop=list(settings.stop),
        options=settings.options,
    )
    for _ in r:
        pass
    res = r.result
    s = res.stats
    rec = {
        "id": line.id,
        "text": res.text,
        "token_ids": res.token_ids,
        "finish_reason": res.finish_reason,
        "method": s.method,
        "seed": seed,
        "prompt_tokens": len(res.prompt_ids),
        "new_tokens": s.new_tokens,
        "steps": s.steps,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "tokens_per_step": s.tokens_per_step,
        "acceptance_rate": s.acceptance_rate,
        "drafter_steps": dict(s.drafter_steps),
        "time_s": time.perf_counter() - t0,
        "line": line.line_no,
    }
    if line.meta is not None:
        rec["meta"] = line.meta
    return rec


@dataclass
class Summary:
    """What a run did: counts, speed, tokens per step per method."""

    done: int = 0  # lines generated by this run
    skipped: int = 0  # lines already in the output
    bad: list[BadLine] = field(default_factory=list)  # not valid input
    failed: list[BadLine] = field(default_factory=list)  # valid, but generation refused them
    new_tokens: int = 0
    seconds: float = 0.0
    per_method: dict[str, list[int]] = field(default_factory=dict)  # method -> [lines, decode tokens, steps]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, rec: dict) -> None:
        self.done += 1
        self.new_tokens += rec["new_tokens"]
        row = self.per_method.setdefault(rec["method"], [0, 0, 0])
        row[0] += 1
        row[1] += max(rec["new_tokens"] - 1, 0)  # the first token comes from the prefill
        row[2] += rec["steps"]

    def tokens_per_step(self, method: str) -> float:
        _, tokens, steps = self.per_method[method]
        return tokens / steps if steps else 1.0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.failed

    def lines(self) -> list[str]:
        """The summary as printed by ``genrefine batch``."""
        out = [
            f"{self.done} done, {self.skipped} already in the output, {len(self.bad)} bad, "
            f"{len(self.failed)} failed; {self.new_tokens} tokens in {self.seconds:.1f} s, "
            f"{self.tokens_per_s:.1f} tokens/s"
        ]
        for m, (n, _, _) in sorted(self.per_method.items()):
            out.append(f"  {m}: {n} lines, {self.tokens_per_step(m):.2f} tokens/step")
        return out


def _pending(input_path, out_path, summary: Summary, settings: BatchSettings) -> list[BatchLine]:
    if Path(out_path).resolve() == Path(input_path).resolve():
        raise ConfigError("--out must not be the input file")
    lines, bad = read_input(input_path)
    summary.bad.extend(bad)
    for b in bad:
        print(f"genrefine batch: skipped {b}", file=sys.stderr)
    done = finished_ids(out_path)
    pending = [ln for ln in lines if json.dumps(ln.id) not in done]
    summary.skipped = len(lines) - len(pending)
    return pending


def _write_all(results: Iterable[tuple[BatchLine | None, dict | BadLine]], out_path, summary,
               total: int, progress: bool) -> None:
    """Append each result as it comes (flushed), report failures, drive the progress bar."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f, tqdm(
        total=total, unit="line", disable=not progress, file=sys.stderr, dynamic_ncols=True
    ) as bar:
        for _, res in results:
            if isinstance(res, BadLine):
                summary.failed.append(res)
                bar.write(f"genrefine batch: failed {res}", file=sys.stderr)
            else:
                f.write(json.dumps(res, ensure_ascii=False) + "\n")
                f.flush()
                summary.add(res)
            summary.seconds = time.perf_counter() - t0
            bar.set_postfix_str(f"{summary.tokens_per_s:.1f} tokens/s", refresh=False)
            bar.update(1)
    summary.seconds = time.perf_counter() - t0


def _run_one(gen, line: BatchLine, settings: BatchSettings) -> dict | BadLine:
    try:
        return run_line(gen, line, settings)
    except GenrefineError as e:
        return BadLine(line.line_no, f"id {json.dumps(line.id)}: {e}")


def run_batch(gen, input_path, out_path, settings: BatchSettings | None = None,
              progress: bool = True) -> Summary:
    """Generate every line of ``input_path`` not yet in ``out_path`` with ``gen`` (a
    :class:`genrefine.Generator`), in input order, appending results to ``out_path``."""
    settings = settings or BatchSettings()
    summary = Summary()
    pending = _pending(input_path, out_path, summary, settings)

    def results() -> Iterator:
        for line in pending:
            yield line, _run_one(gen, line, settings)

    _write_all(results(), out_path, summary, len(pending), progress)
    return summary


class _RayWorker:
    """A Ray Data actor: one loaded generator, lines in (JSON), result records out (JSON)."""

    def __init__(self, load_kwargs: dict, settings: BatchSettings) -> None:
        from .api import load

        self.gen = load(quiet=True, **load_kwargs)
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        out = []
        for text in batch["line"]:
            res = _run_one(self.gen, BatchLine.from_json(str(text)), self.settings)
            out.append(json.dumps(asdict(res) if isinstance(res, BadLine) else {"ok": res}))
        return {"result": out}


def import_ray():
    """The ``ray`` module with Ray Data; a one-line :class:`ConfigError` when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'genrefine[ray]'") from None
    return ray


def run_batch_ray(load_kwargs: dict, input_path, out_path, settings: BatchSettings | None = None,
                  address: str | None = None, num_actors: int = 1, num_cpus: int | None = None,
                  progress: bool = True) -> Summary:
    """As :func:`run_batch`, on Ray Data: ``map_batches`` over ``num_actors`` actors, each with a
    generator loaded by ``genrefine.load(**load_kwargs)``; the driver writes results as they
    come back (in any order). Ray: the one already initialized in this process, else the cluster
    at ``address``, else a local instance with ``num_cpus`` CPUs (default ``num_actors``)."""
    settings = settings or BatchSettings()
    if num_actors < 1:
        raise ConfigError(f"--num-actors must be >= 1, got {num_actors}")
    ray = import_ray()
    summary = Summary()
    pending = _pending(input_path, out_path, summary, settings)
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or num_actors, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        by_no = {ln.line_no: ln for ln in pending}

        def results() -> Iterator:
            if not pending:
                return
            ds = ray.data.from_items([{"line": ln.to_json()} for ln in pending])
            ds = ds.map_batches(
                _RayWorker,
                fn_constructor_kwargs={"load_kwargs": load_kwargs, "settings": settings},
                batch_size=1,
                concurrency=num_actors,
                num_cpus=1,
            )
            for row in ds.iter_rows():
                d = json.loads(row["result"])
                if "ok" in d:
                    yield by_no.get(d["ok"]["line"]), d["ok"]
                else:
                    yield by_no.get(d["line_no"]), BadLine(**d)

        _write_all(results(), out_path, summary, len(pending), progress)
    finally:
        if started:
            ray.shutdown()
    return summary
