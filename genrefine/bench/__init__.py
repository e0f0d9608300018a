"""``genrefine bench``: Spec-Bench-style measurements of every method against ``ar``.

questions.py  the inputs (question files, categories, methods, output paths), checked early
runner.py     loading, warm-up, the interleaved run, the resumable per-question JSONL
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
from .runner import BenchConfig, execute, plan_bench

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
