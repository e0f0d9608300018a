"""The resumable results file ``OUT.questions.jsonl``: a settings header, then one JSON line per
finished question. A later run with the same settings skips the questions found there; one with
other settings, or by another version of genrefine, is refused.

The header line: ``{"genrefine_bench": 1, "settings": {...}, "bitwise_exact": bool}`` (the
settings of plan.py; ``bitwise_exact``: whether the model that first wrote the file ran bitwise
exact, see genrefine/models/invariance.py; each question's line records its own as well).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..errors import ConfigError


HEADER_KEY = "genrefine_bench"
HEADER_VERSION = 1


def read_results(path: Path, settings: dict) -> dict:
    """Records already in ``path`` (question_id -> record); {} when there is no file.

    Raises ConfigError when the file was written under other settings or is damaged; a last
    line cut short by an interrupted run is dropped (the file is truncated before it).
    """
    if not path.exists() or path.stat().st_size == 0:
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good_end = len(raw)
    if lines and lines[-1] != b"":  # the last line was cut short
        good_end = len(raw) - len(lines[-1])
        lines = lines[:-1]
    else:
        lines = lines[:-1]
    records: dict = {}
    header = None
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError:
            raise ConfigError(
                f"{path}, line {i}: not valid JSON: the results file is damaged; pass --fresh to "
                "start over or use another --json path"
            )
        if header is None:
            if not isinstance(obj, dict) or obj.get(HEADER_KEY) != HEADER_VERSION:
                raise ConfigError(
                    f"{path} is not a genrefine bench results file (no settings header): pass "
                    "--fresh to overwrite it or use another --json path"
                )
            header = obj.get("settings", {})
            continue
        records[obj["question_id"]] = obj
    if header is not None:
        want = settings
        code = [k for k in ("version", "commit") if header.get(k) != want[k]]
        if code:
            there, now = (_code_text(d.get("version"), d.get("commit")) for d in (header, want))
            raise ConfigError(
                f"{path} was written by another version of genrefine ({there} there, {now} "
                "now): pass --fresh to start over, or use another --json path"
            )
        diff = [k for k in want if header.get(k) != want[k]]
        if diff:
            shown = "; ".join(f"{k}: {header.get(k)!r} there, {want[k]!r} now" for k in diff)
            raise ConfigError(
                f"{path} holds results run with other settings ({shown}): pass --fresh to start "
                "over, or use another --json path"
            )
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def append_line(path: Path, obj: dict) -> None:
    """Append ``obj`` as one JSON line and make it durable (fsync) before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def start_results(path: Path, settings: dict, fresh: bool, bitwise_exact: bool | None) -> None:
    """Write the settings header unless the file already holds one (and ``fresh`` is off).

    ``bitwise_exact``: the loaded model's (None: no model was loaded)."""
    if fresh or not path.exists() or path.stat().st_size == 0:
        path.write_text("")
        header = {HEADER_KEY: HEADER_VERSION, "settings": settings}
        append_line(path, {**header, "bitwise_exact": bitwise_exact})


def git_commit() -> str | None:
    """The commit of the genrefine checkout this code runs from; None when it is not one (an
    installed package) or git is not at hand."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _code_text(version, commit) -> str:
    return f"{version or 'an unknown version'}" + (f" at commit {commit[:12]}" if commit else "")

