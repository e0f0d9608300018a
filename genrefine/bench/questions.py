"""The bench's inputs, all checked before a model is loaded.

* question files in Spec-Bench's format: one JSON object a line with ``question_id``,
  ``category`` and ``turns`` (a list of one or more non-empty strings);
* the category filter and the per-category limit;
* the list of methods (genrefine's own, plus the transformers baselines ``hf_*``);
* the output paths.

Every mistake raises :class:`~genrefine.errors.ConfigError` with a message that says what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: transformers' own generation on the same weights: greedy ``generate`` and prompt lookup.
HF_METHODS = {
    "hf_generate": "transformers' generate() on the same weights (greedy or sampled)",
    "hf_prompt_lookup": "transformers' generate(prompt_lookup_num_tokens=10)",
    "hf_assisted": "transformers' generate(assistant_model=the --draft-model)",
}

#: external baselines through llama-cpp-python (the ``genrefine[llamacpp]`` extra)
LLAMACPP_METHODS = {
    "llamacpp_plain": "llama-cpp-python's own greedy (or sampled) completion, Llama.generate(), "
    "on the same GGUF file, as a user gets it: stock llama.cpp (default kernels), built once",
    "llamacpp_exact": "the same completion loop on genrefine's exact build of llama.cpp (no "
    "repacked weights, no tiled or llamafile matmuls: the llama.cpp backend's kernels)",
}

#: methods that need ``--draft-model``
DRAFT_MODEL_METHODS = ("sps", "hf_assisted")

_SPEC_BENCH_RELATIVE = Path("shared") / "data" / "spec_bench" / "question.jsonl"


@dataclass(frozen=True)
class Question:
    """One benchmark question; ``turns`` are the user's messages, asked in order."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]


def default_questions_path() -> Path | None:
    """The Spec-Bench question file beside the repository (``../shared/data/...``), if present."""
    repo = Path(__file__).resolve().parents[2]
    for base in (repo.parent, Path.cwd().parent, Path.cwd()):
        p = base / _SPEC_BENCH_RELATIVE
        if p.is_file():
            return p
    return None


def parse_question_line(line: str, lineno: int, path: str = "questions") -> Question:
    """Parse one line of a question file; errors name ``path:lineno``."""
    where = f"{path}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg}): each line must be one JSON object")
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with question_id, category, turns")
    missing = [k for k in ("question_id", "category", "turns") if k not in obj]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} (Spec-Bench format)")
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise ConfigError(f"{where}: question_id must be an integer or a non-empty string")
    cat = obj["category"]
    if not isinstance(cat, str) or not cat.strip():
        raise ConfigError(f"{where}: category must be a non-empty string")
    turns = obj["turns"]
    if (
        not isinstance(turns, list)
        or not turns
        or not all(isinstance(t, str) and t.strip() for t in turns)
    ):
        raise ConfigError(f"{where}: turns must be a non-empty list of non-empty strings")
    return Question(qid, cat.strip(), tuple(turns))


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a Spec-Bench question file; blank lines are skipped, anything else must parse.

    Raises ConfigError naming the line of the first problem (bad JSON, a missing or ill-typed
    field, a repeated question_id) or saying that the file is missing or holds no questions.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"question file {str(p)!r} does not exist: give --questions FILE.jsonl")
    if not p.is_file():
        raise ConfigError(f"{str(p)!r} is not a file: give --questions FILE.jsonl")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read question file {str(p)!r}: {e}") from e
    out: list[Question] = []
    seen: dict[int | str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        q = parse_question_line(line, lineno, str(p))
        if q.question_id in seen:
            raise ConfigError(
                f"{p}, line {lineno}: question_id {q.question_id!r} repeats line "
                f"{seen[q.question_id]}: ids must be unique"
            )
        seen[q.question_id] = lineno
        out.append(q)
    if not out:
        raise ConfigError(f"question file {str(p)!r} holds no questions")
    return out


def categories_of(questions: Sequence[Question]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(q.category for q in questions))


def parse_list(spec: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (order kept, repeats dropped); None -> []."""
    if not spec:
        return []
    return list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))


def select_questions(
    questions: Sequence[Question],
    categories: Sequence[str] | None = None,
    limit_per_category: int | None = None,
) -> list[Question]:
    """The questions of the given categories (all when empty), the first N of each, file order.

    Unknown categories raise ConfigError listing the valid ones.
    """
    valid = categories_of(questions)
    cats = list(categories or [])
    unknown = [c for c in cats if c not in valid]
    if unknown:
        raise ConfigError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}: "
            f"choose from {', '.join(valid)}"
        )
    if limit_per_category is not None and limit_per_category < 1:
        raise ConfigError("--limit-per-category must be a positive integer")
    wanted = set(cats) if cats else set(valid)
    taken: dict[str, int] = {}
    out = []
    for q in questions:
        if q.category not in wanted:
            continue
        if limit_per_category is not None and taken.get(q.category, 0) >= limit_per_category:
            continue
        taken[q.category] = taken.get(q.category, 0) + 1
        out.append(q)
    return out


def parse_methods(spec: str | None) -> list[str]:
    """The method list, ``ar`` first (added when missing); unknown names raise ConfigError."""
    from ..registry import METHODS

    names = parse_list(spec)
    valid = list(METHODS) + list(HF_METHODS) + list(LLAMACPP_METHODS)
    unknown = [m for m in names if m not in valid]
    if unknown:
        raise ConfigError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
            f": choose from {', '.join(valid)}"
        )
    return ["ar"] + [m for m in names if m != "ar"]


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail early (ConfigError) when ``path`` could not be written; returns it as a Path."""
    p = Path(path).expanduser()
    if p.exists() and p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a directory: give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what} {str(p)!r}: directory {str(parent)!r} does not exist")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise ConfigError(f"cannot write {what} {str(p)!r}: the file is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} {str(p)!r}: directory {str(parent)!r} is not writable")
    return p


def jsonl_path_for(json_path: str | os.PathLike) -> Path:
    """Where per-question records go: ``OUT.json`` -> ``OUT.questions.jsonl``."""
    p = Path(json_path)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ".questions.jsonl")
