"""``genrefine bench``: Spec-Bench-style measurements of every method against ``ar``.

questions.py  the inputs (question files, categories, methods, output paths), checked early
plan.py       the options checked before any model loads, and the settings numbers depend on
results.py    the resumable per-question JSONL: its settings header, appending, resuming
backends.py   the backend interface (run -> TurnResult) and genrefine's own backend
baselines.py  the baselines that are not genrefine: transformers generate, llama.cpp plain
runner.py     loading, warm-up, the interleaved run, the report files
metrics.py    per-question records -> the report dict (pure)
report.py     the report as Markdown and as a PNG
"""

from .metrics import aggregate, build_report
from .questions import (
    HF_METHODS,
    Question,
    load_questions,
    parse_methods,
    select_questions,
)
from .report import markdown_report, plot_report
from .plan import BenchConfig, plan_bench
from .runner import execute

__all__ = [
    "HF_METHODS",
    "BenchConfig",
    "Question",
    "aggregate",
    "build_report",
    "execute",
    "load_questions",
    "markdown_report",
    "parse_methods",
    "plan_bench",
    "plot_report",
    "select_questions",
]
