"""What every backend of the bench offers, and genrefine's own: ``run(prompt_ids,
max_new_tokens, temperature, seed) -> TurnResult``. The baselines that are not genrefine's live
in baselines.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace


@dataclass
class TurnResult:
    """One generation: new tokens (EOS excluded) and what it cost."""

    token_ids: list[int]
    seconds: float  # prefill included
    ended_eos: bool
    prompt_tokens: int
    steps: int | None = None  # forwards after the prefill
    drafted: int | None = None
    accepted: int | None = None
    accepted_hist: list[int] | None = None  # [k] = steps that accepted k draft tokens
    # seconds by phase: weights (matmuls), attention, drafting, other; None where not measured
    phases: dict[str, float] | None = None

    @property
    def step_tokens(self) -> int:
        """Tokens the decoding steps emitted (accepted + bonus), the EOS counted."""
        return max(len(self.token_ids) + int(self.ended_eos) - 1, 0)


class GenrefineBackend:
    """One genrefine method on the model of a :class:`~genrefine.api.Generator`.

    Every run starts from the same state: the method is built afresh before it, outside the
    clock, so drafters that learn across generations (rest's store of earlier outputs, auto's
    acceptance estimates) cannot draft from an earlier run of the same prompt or from the
    warm-up. A draft model (sps) is loaded once and shared by these builds: it keeps nothing
    between generations. The clock covers the generation of token ids alone; nothing is decoded
    to text.
    """

    def __init__(self, gen, method: str, options=None) -> None:
        from ..methods.base import MethodOptions
        from ..methods.sps import load_draft_model
        from ..registry import METHODS

        self.gen, self.method, self.options = gen, method, options
        opts = options or MethodOptions()
        if METHODS[method].needs_draft_model and isinstance(opts.draft_model, (str, os.PathLike)):
            draft, draft_tok = load_draft_model(gen.model, opts)
            opts = replace(opts, draft_model=draft, draft_tokenizer=draft_tok)
        self._build_options = opts

    def run(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed) -> TurnResult:
        from ..engine import Engine, Stats
        from ..registry import build_method
        from ..types import SamplingParams

        gen = self.gen
        params = SamplingParams(temperature=temperature, seed=seed)
        method = build_method(self.method, gen.model, self._build_options, tokenizer=gen.tokenizer)
        engine = Engine(gen.model, method)
        stats = Stats(method.name)
        ids: list[int] = []
        timed = hasattr(gen.model, "phase_seconds")
        if timed:
            gen.model.phase_seconds = {}
        t0 = time.perf_counter()
        try:
            for chunk in engine.generate(list(prompt_ids), max_new_tokens, params, gen.eos_ids, stats):
                ids.extend(chunk)
            seconds = time.perf_counter() - t0
            phases = None
            if timed:
                got = gen.model.phase_seconds
                phases = {
                    "weights": got.get("weights", 0.0),
                    "attention": got.get("attention", 0.0),
                    "drafting": stats.time_draft,
                }
                # drafters that run the target (self-speculation) count in weights/attention too
                phases["other"] = max(seconds - sum(phases.values()), 0.0)
        finally:
            if timed:
                gen.model.phase_seconds = None
        return TurnResult(
            token_ids=ids,
            seconds=seconds,
            ended_eos=engine.finish_reason == "stop",
            prompt_tokens=len(prompt_ids),
            steps=stats.steps,
            drafted=stats.drafted,
            accepted=stats.accepted,
            accepted_hist=list(stats.accepted_hist),
            phases=phases,
        )
