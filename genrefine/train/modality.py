"""What the modality trainers (:mod:`genrefine.train.image`, :mod:`genrefine.train.speech`) share:
checking their arguments, the torch threads of a run, per-step random generators, and how their
bundles' JSON records figures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import ConfigError

R = TypeVar("R")


def run_trainer(out, seed, kind: str, threads: int | None, run: Callable[[Path], R]) -> R:
    """Check ``seed`` and ``out`` (a folder for the ``kind`` model, made by the run if missing),
    then ``run(out)`` with ``threads`` torch threads (None: unchanged), restored afterwards."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the {kind} model")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run(out)
    finally:
        torch.set_num_threads(before)


def say_for(progress: bool) -> Callable[[str], None]:
    """A one-line progress message on stderr, or nothing without ``progress``."""
    if not progress:
        return lambda m: None
    return lambda m: print(f"genrefine: {m}", file=sys.stderr, flush=True)


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The random generator of one step of one stage: a function of the seed, the stage and the
    step only, so a resumed run draws what the uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def figure(v) -> float | None:
    """A figure for a bundle's JSON: rounded, None for a missing one (a resumed finished stage)."""
    return None if v is None or v != v else round(float(v), 4)
