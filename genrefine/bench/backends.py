"""What every backend of the bench offers, and genrefine's own: ``run(prompt_ids,
max_new_tokens, temperature, seed) -> TurnResult``. The baselines that are not genrefine's live
in baselines.py.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def step_tokens(self) -> int:
        """Tokens the decoding steps emitted (accepted + bonus), the EOS counted."""
        return max(len(self.token_ids) + int(self.ended_eos) - 1, 0)


class GenrefineBackend:
    """One genrefine method on a :class:`~genrefine.api.Generator`."""

    def __init__(self, gen, method: str, options=None) -> None:
        self.gen, self.method, self.options = gen, method, options

    def run(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed) -> TurnResult:
        r = self.gen.generate(
            prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            method=self.method, options=self.options,
        )
        s = r.stats
        return TurnResult(
            token_ids=list(r.token_ids),
            seconds=s.time_total,
            ended_eos=r.finish_reason == "stop",
            prompt_tokens=len(prompt_ids),
            steps=s.steps,
            drafted=s.drafted,
            accepted=s.accepted,
            accepted_hist=list(s.accepted_hist),
        )

