"""Planning a bench run: the options checked without a model, and the settings the numbers
depend on.

    plan = plan_bench(BenchConfig(...))      # all checks, no model loaded (errors: ConfigError)

A :class:`Plan` holds the questions to run, where results go and the questions an earlier run
with equal settings already finished (read from ``OUT.questions.jsonl``, see results.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..diskcache import cpu_model
from .questions import (
    DRAFT_MODEL_METHODS,
    LLAMACPP_METHODS,
    Question,
    check_writable,
    default_questions_path,
    jsonl_path_for,
    load_questions,
    parse_list,
    parse_methods,
    select_questions,
)
from .results import git_commit, read_results

QUICK_MAX_NEW_TOKENS = 24


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BenchConfig:
    """What the user asked for (the CLI builds it from its options and nothing else)."""

    json_path: str
    questions: str | None = None  # None: the Spec-Bench file beside the repository
    methods: str = "ar,pld,jacobi,auto"
    model: str | None = None
    draft_model: str | None = None  # sps and hf_assisted: the draft model
    drafter: str | None = None  # trained-drafter methods: a `genrefine train` folder (None: shipped)
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "native"  # genrefine's backend: native, llama.cpp, hf, auto
    categories: str | None = None
    limit_per_category: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    repeats: int = 1
    report_path: str | None = None
    plot_path: str | None = None
    quick: bool = False  # 1 question per category, QUICK_MAX_NEW_TOKENS new tokens
    fresh: bool = False  # discard earlier results in the JSONL instead of resuming
    progress: bool = True
    command: str = ""
    tree_cut: bool = True  # False: verify whole drafts (--no-tree-cut; MethodOptions.tree_cut)
    draft_vocab: int | None = None  # --draft-vocab N (MethodOptions.draft_vocab); None: defaults
    hf_dtype: str | None = None  # --hf-dtype: the transformers baselines' dtype; None: hf_dtype()


@dataclass(frozen=True)
class Settings:
    """What the numbers depend on; a JSONL file is resumed only under equal settings."""

    model: str  # the resolved model path
    dtype: str
    device: str
    methods: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    repeats: int
    questions: str  # the resolved question file
    draft_model: str | None = None  # the resolved draft model path (sps, hf_assisted)
    backend: str | None = None  # genrefine's backend; None: native (files from before --backend)
    drafter: str | None = None  # the trained drafter's folder; None: the shipped one (or unused)
    tree_cut: bool | None = None  # False: --no-tree-cut; None: drafts cut (files from before it)
    draft_vocab: int | None = None  # --draft-vocab N; None: each method's default
    hf_dtype: str | None = None  # the transformers baselines' dtype, where they run
    cpu: str | None = None  # the CPU model (lscpu's model name): timings of one machine only
    version: str | None = None  # genrefine.__version__ of the code that measured
    commit: str | None = None  # its git commit, when it runs from a checkout

    def as_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d


@dataclass
class Plan:
    """A checked configuration: the questions to run and where results go."""

    config: BenchConfig
    settings: Settings
    questions: list[Question]
    json_path: Path
    jsonl_path: Path
    report_path: Path | None
    plot_path: Path | None
    done: dict = field(default_factory=dict)  # question_id -> record already in the JSONL

    @property
    def pending(self) -> list[Question]:
        return [q for q in self.questions if q.question_id not in self.done]


def plan_bench(config: BenchConfig) -> Plan:
    """Check everything that can be checked without a model; ConfigError on the first problem.

    Order: methods, numbers, question file, categories, output paths, model/dtype/device, and
    the settings of an earlier run in the JSONL (resume only with equal settings, the CPU model
    and the code's version included).
    """
    from ..models.loading import resolve_device, resolve_dtype, resolve_source
    from ..types import SamplingParams

    methods = parse_methods(config.methods)
    max_new = QUICK_MAX_NEW_TOKENS if config.quick else config.max_new_tokens
    limit = 1 if config.quick else config.limit_per_category
    if not isinstance(max_new, int) or max_new < 1:
        raise ConfigError("--max-new-tokens must be a positive integer")
    if config.repeats < 1:
        raise ConfigError("--repeats must be a positive integer")
    SamplingParams(temperature=config.temperature)  # validates
    if config.draft_vocab is not None and config.draft_vocab < 1:
        raise ConfigError(f"--draft-vocab must be >= 1 token (or unset), got {config.draft_vocab}")
    needs = [m for m in methods if m in DRAFT_MODEL_METHODS]
    if needs and config.draft_model is None:
        plural = len(needs) > 1
        raise ConfigError(
            f"method{'s' if plural else ''} {', '.join(needs)} need{'' if plural else 's'} a draft "
            "model: add --draft-model PATH (`genrefine draft-model shrink` cuts one from the "
            "target)"
        )

    qpath = config.questions or default_questions_path()
    if qpath is None:
        raise ConfigError(
            "no question file: give --questions FILE.jsonl (Spec-Bench format; the default "
            "../shared/data/spec_bench/question.jsonl was not found)"
        )
    questions = select_questions(
        load_questions(qpath), parse_list(config.categories), limit
    )

    json_path = check_writable(config.json_path, "--json")
    if json_path.suffix != ".json":
        raise ConfigError(f"--json {str(json_path)!r} must end in .json")
    jsonl = check_writable(jsonl_path_for(json_path), "per-question results")
    report = check_writable(config.report_path, "--report") if config.report_path else None
    plot = check_writable(config.plot_path, "--plot") if config.plot_path else None
    if plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix.lower().lstrip(".") not in kinds:
            raise ConfigError(
                f"--plot {str(plot)!r}: unknown image type; end the name in one of "
                f"{', '.join('.' + k for k in sorted(kinds))}"
            )

    dev = resolve_device(config.device)
    dt = resolve_dtype(config.dtype, dev)
    src = resolve_source(config.model)
    backend = _check_backend(config.backend, src, methods)
    draft = resolve_source(config.draft_model) if config.draft_model is not None else None
    settings = Settings(
        model=str(src.path),
        # "auto" stays "auto" (the load measures what runs: quantized or bfloat16, see
        # models/weights_choice.py; the report names the weights that ran)
        dtype="auto" if config.dtype in (None, "auto") else str(dt).replace("torch.", ""),
        device=str(dev),
        methods=tuple(methods),
        max_new_tokens=max_new,
        temperature=float(config.temperature),
        repeats=int(config.repeats),
        questions=str(Path(qpath).resolve()),
        draft_model=str(draft.path) if draft is not None else None,
        backend=None if backend == "native" else backend,
        drafter=str(Path(config.drafter).expanduser().resolve()) if config.drafter else None,
        tree_cut=None if config.tree_cut else False,
        draft_vocab=config.draft_vocab,
        hf_dtype=_hf_dtype(config, methods, dev),
        cpu=cpu_model(),
        version=__version__,
        commit=git_commit(),
    )
    done = {} if config.fresh else read_results(jsonl, settings.as_dict())
    return Plan(config, settings, questions, json_path, jsonl, report, plot, done)


def _hf_dtype(config: BenchConfig, methods: Sequence[str], dev) -> str | None:
    """The transformers baselines' dtype (None when no hf_* method runs)."""
    from .baselines import hf_dtype
    from .questions import HF_METHODS

    if not any(m in HF_METHODS for m in methods):
        return None
    return hf_dtype(config.dtype, str(dev), config.hf_dtype)


def _check_backend(backend: str, src, methods: Sequence[str]) -> str:
    """The backend's name; errors when it, or llamacpp_plain, cannot run this model here."""
    from ..registry import METHODS
    from ..models.loading import check_backend, resolve_backend

    name = resolve_backend(backend)
    check_backend(name, src)
    if name in ("llama.cpp", "hf"):
        bad = [m for m in methods if m in METHODS and METHODS[m].native_only]
        if bad:
            why = "; ".join(f"{m}: {METHODS[m].native_reason}" for m in bad)
            raise ConfigError(
                f"{', '.join(bad)} need{'s' if len(bad) == 1 else ''} the native runtime "
                f"({why}); the {name} backend runs the whole model only: use "
                "--backend native or leave them out"
            )
    if any(m in LLAMACPP_METHODS for m in methods):
        check_backend("llama.cpp", src)
    return name

