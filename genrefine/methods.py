"""Methods: named presets of (drafter, verifier, draft-length policy).

``genrefine methods`` prints this registry. A method is lossless when its greedy output equals
plain greedy decoding token for token and its sampled output has exactly the target's
distribution; the tests check every method that claims it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError
from .policy import CostModelPolicy, HeuristicLength


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by the methods; None means the method's default."""

    draft_len: int | None = None  # largest draft (nodes) per step
    max_ngram: int = 3  # prompt lookup: longest n-gram matched
    jacobi_block: int = 8
    acceptance: str = "exact"  # "exact" (lossless speculative sampling) | "typical" (lossy)

    def __post_init__(self) -> None:
        if self.draft_len is not None and not 1 <= self.draft_len <= 64:
            raise ConfigError(f"--draft-len must be between 1 and 64, got {self.draft_len}")
        if self.acceptance not in ("exact", "typical"):
            raise ConfigError("acceptance must be 'exact' (lossless) or 'typical' (lossy)")


# ---------------------------------------------------------------------------- policies
class FixedPolicy:
    """Always the one drafter with the same budget."""

    def __init__(self, drafter, budget: int) -> None:
        self.drafter, self.budget = drafter, budget

    def reset(self) -> None:
        pass

    def choose(self, drafters):
        return self.drafter, self.budget

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        pass


class HeuristicPolicy:
    """Grow the draft after a full acceptance, shrink it after a miss (transformers' schedule)."""

    def __init__(self, drafter, initial: int, max_len: int) -> None:
        self.drafter = drafter
        self.initial, self.max_len = initial, max_len
        self.length = HeuristicLength(initial=initial, min_len=1, max_len=max_len)

    def reset(self) -> None:
        self.length.reset()

    def choose(self, drafters):
        return self.drafter, self.length.next_budget()

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        depth = tree_info.num_levels if tree_info is not None else drafted
        self.length.update(depth, accepted)


class CostPolicy:
    """Pick drafter and draft size maximising expected tokens per second (see policy.py)."""

    def __init__(self, cost_table, max_len: int) -> None:
        self.cost_table, self.max_len = cost_table, max_len
        self.policy = CostModelPolicy(cost_table, max_len=max_len)

    def reset(self) -> None:
        pass  # acceptance estimates carry over between generations on purpose

    def choose(self, drafters):
        by_name = {d.name: d for d in drafters}
        name, budget = self.policy.choose(list(by_name))
        return (by_name[name], budget) if name is not None else (None, 0)

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        if drafter is None or drafted == 0:
            return
        depth = tree_info.num_levels if tree_info is not None else drafted
        self.policy.update(drafter.name, depth, accepted)
        self.policy.update_draft_cost(drafter.name, draft_seconds, drafted)


@dataclass
class Method:
    """A ready-to-run preset: drafters, policy, acceptance rule."""

    name: str
    drafters: list = field(default_factory=list)
    policy: object = None
    max_budget: int = 0
    acceptance: str = "exact"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    lossless: bool
    summary: str
    build: Callable  # (model, options) -> Method


def _pld(model, opts: MethodOptions, **kw):
    from .drafters.prompt_lookup import PromptLookupDrafter

    return PromptLookupDrafter(max_ngram=opts.max_ngram, tree=model.supports_trees, **kw)


def _build_ar(model, opts: MethodOptions) -> Method:
    return Method("ar")


def _build_pld(model, opts: MethodOptions) -> Method:
    budget = opts.draft_len or 10
    d = _pld(model, opts)
    return Method("pld", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def _build_jacobi(model, opts: MethodOptions) -> Method:
    from .drafters.jacobi import JacobiDrafter

    block = opts.draft_len or opts.jacobi_block
    d = JacobiDrafter(block=block)
    return Method("jacobi", [d], FixedPolicy(d, block), block, opts.acceptance)


def _build_auto(model, opts: MethodOptions) -> Method:
    from .drafters.jacobi import JacobiDrafter
    from .policy import load_or_measure, machine_key

    max_len = opts.draft_len or 16
    key = f"{getattr(model, 'name', 'model')}|{model.dtype}|{machine_key(model.device)}"
    table = load_or_measure(model, key)
    drafters = [_pld(model, opts), JacobiDrafter(block=max_len)]
    return Method("auto", drafters, CostPolicy(table, max_len), max_len, opts.acceptance)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("ar", True, "plain autoregressive decoding, the baseline", _build_ar),
        MethodInfo(
            "pld", True, "prompt lookup: continue the last n-gram's earlier matches (tree)", _build_pld
        ),
        MethodInfo(
            "jacobi", True, "Jacobi fixed-point iteration over a block of guesses", _build_jacobi
        ),
        MethodInfo(
            "auto",
            True,
            "per step, the drafter and draft size with the best expected tokens/s (cost model)",
            _build_auto,
        ),
    ]
}


def method_names() -> list[str]:
    return list(METHODS)


def build_method(name: str, model, options: MethodOptions | None = None) -> Method:
    """Instantiate a method for a model; unknown names raise with the list of valid ones."""
    opts = options or MethodOptions()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    m = METHODS[name].build(model, opts)
    if opts.acceptance == "typical":
        m.name += "+typical"
    return m


def is_lossless(name: str, options: MethodOptions | None = None) -> bool:
    opts = options or MethodOptions()
    return METHODS[name].lossless and opts.acceptance == "exact"
