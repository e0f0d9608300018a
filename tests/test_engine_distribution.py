"""The engine's sampling path is exact: the first tokens :class:`~genrefine.engine.Engine`
generates with a sampling drafter are distributed as the target's *processed* distribution
(temperature, top-k, top-p, as :func:`genrefine.sampling.logits_to_probs` applies them).

Unlike ``test_verify.py``, which hands the verifier rows it computed itself, this runs the whole
engine: prefill, the drafter's context and ``q``, the logits of the verification forward and the
rows they come from, their processing, acceptance, rollback and the next step. The model is a
fake whose logits are a fixed pseudo-random function of the tokens before each row, over a
vocabulary of 6 tokens.

How the distribution is made exact (enumerated, not sampled). A generation's randomness goes
through two primitives: :func:`genrefine.sampling.sample` (one draw from a row; the prefill token,
the drafter's tokens, the verifier's bonus) and the verifier's uniforms (node ``i`` passes when
``u_i < accept_prob[i]``). Here the first draws the row's outcomes one by one, each weighted by
its probability, and the second draws "passes" with weight ``accept_prob[i]`` and "fails" with
``1 - accept_prob[i]`` (read from the plan the verifier just made). :func:`enumerate_runs` replays
the generation once per combination of outcomes, so the weights of the runs that produce a token
sequence add up to its exact probability.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import pytest
import torch

import genrefine.engine as engine_mod
import genrefine.sampling as sampling_mod
import genrefine.verify.sampling as vs
from genrefine.engine import Engine
from genrefine.methods.base import FixedPolicy, Method
from genrefine.sampling import logits_to_probs
from genrefine.types import Draft, ModelOutput, SamplingParams

V = 6  # toy vocabulary
PROMPT = [1, 4]
LENGTH = 4  # tokens compared: the prefill's, then what one to three verification steps emit


def _code(prefix: tuple[int, ...]) -> int:
    c = 0
    for t in prefix:
        c = c * (V + 1) + t + 1
    return c


@functools.lru_cache(maxsize=None)
def target_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    """The fake target's logits after ``prefix``: [V]."""
    g = torch.Generator().manual_seed(1_000_003 + _code(prefix))
    return torch.randn(V, generator=g) * 1.5


@functools.lru_cache(maxsize=None)
def draft_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    """The fake drafter's logits: correlated with the target's, not equal. [V]"""
    g = torch.Generator().manual_seed(2_000_003 + _code(prefix))
    return 0.6 * (target_logits(prefix) + torch.randn(V, generator=g))


class TokenCache:
    """The fake model's cache: the tokens themselves."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.length
        del self.tokens[self.length - n :]


class ContextModel:
    """A fake target: the logits of a row are :func:`target_logits` of everything up to it."""

    vocab_size = V
    max_context = 64
    num_layers = 1
    hidden_size = 4
    device = torch.device("cpu")
    dtype = torch.float32

    def new_cache(self, capacity: int | None = None) -> TokenCache:
        return TokenCache(capacity or self.max_context)

    def forward(self, tokens, cache, positions=None, tree_mask=None, logits_rows=None,
                hidden_layers=()):
        assert tree_mask is None, "the drafter here drafts chains"
        start = cache.length
        cache.tokens += tokens.tolist()
        assert cache.length <= cache.capacity
        rows = range(tokens.shape[0]) if logits_rows is None else logits_rows.tolist()
        logits = [target_logits(tuple(cache.tokens[: start + r + 1])) for r in rows]
        return ModelOutput(logits=torch.stack(logits) if logits else None, hidden={})


class SampledChainDrafter:
    """Draws a chain of ``budget`` tokens from its own processed ``q``, one token at a time."""

    name = "sampled-chain"

    def reset(self) -> None:
        pass

    def propose(self, ctx, budget: int) -> Draft:
        prefix = tuple(ctx.tokens.tolist())
        tokens, rows = [], []
        for _ in range(budget):
            q = logits_to_probs(draft_logits(prefix), ctx.params)  # [V]
            x = int(sampling_mod.sample(q, ctx.generator))
            tokens.append(x)
            rows.append(q)
            prefix += (x,)
        return Draft.chain(tokens, torch.stack(rows))

    def observe(self, ctx, feedback) -> None:
        pass


# --------------------------------------------------------------------------- enumeration


class Choices:
    """The random outcomes of one replayed generation: ``script`` fixes the first choices; each
    new choice point takes its first possible outcome and leaves the others in ``todo``."""

    def __init__(self, script: list[int], todo: list[list[int]]) -> None:
        self.script, self.todo = script, todo
        self.taken: list[int] = []
        self.weight = 1.0

    def choose(self, weights: list[float]) -> int:
        i = len(self.taken)
        possible = [k for k, w in enumerate(weights) if w > 0]
        if i < len(self.script):
            k = self.script[i]
        else:
            k = possible[0]
            self.todo.extend(self.taken + [other] for other in possible[1:])
        self.taken.append(k)
        self.weight *= weights[k]
        return k


def enumerate_runs(monkeypatch, generate) -> dict[tuple[int, ...], float]:
    """The exact distribution of ``generate()``'s output, over every outcome of its randomness."""
    state: dict = {}

    def sample(probs, generator):
        row = probs.double().reshape(-1)
        row = row / row.sum()  # (torch.multinomial normalises too)
        return torch.tensor(state["choices"].choose(row.tolist()))

    def plan(*args, **kwargs):
        state["plan"] = real_plan(*args, **kwargs)
        return state["plan"]

    class TorchWithScriptedUniforms:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def rand(n, generator=None, device=None):
            accept = state["plan"].accept_prob.double().tolist()
            assert len(accept) == n
            fail = [state["choices"].choose([a, 1.0 - a]) for a in accept]
            return torch.tensor(fail, dtype=torch.float32)  # 0.0 < a passes; 1.0 never does

    real_plan = vs._plan
    monkeypatch.setattr(sampling_mod, "sample", sample)
    monkeypatch.setattr(vs, "sample", sample)
    monkeypatch.setattr(vs, "_plan", plan)
    monkeypatch.setattr(vs, "torch", TorchWithScriptedUniforms())
    out: dict[tuple[int, ...], float] = defaultdict(float)
    todo: list[list[int]] = [[]]
    while todo:
        state["choices"] = choices = Choices(todo.pop(), todo)
        tokens = generate()
        out[tuple(tokens)] += choices.weight
    return dict(out)


def generate_with(drafter_budget: int, params: SamplingParams, length: int = LENGTH):
    drafter = SampledChainDrafter()
    method = Method("sampled-chain", [drafter], FixedPolicy(drafter, drafter_budget),
                    drafter_budget)
    engine = Engine(ContextModel(), method)

    def generate() -> list[int]:
        return [t for chunk in engine.generate(PROMPT, length, params) for t in chunk]

    return generate


def target_joint(params: SamplingParams, length: int) -> dict[tuple[int, ...], float]:
    """The processed target's joint distribution of the first ``length`` tokens after PROMPT."""
    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, w in out.items():
            p = logits_to_probs(target_logits(tuple(PROMPT) + seq), params).double()
            for x in range(V):
                if p[x] > 0:
                    nxt[seq + (x,)] = w * float(p[x])
        out = nxt
    return out


def tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


# (top-k or top-p in each: they keep the enumeration small, and they are what the engine must
# process alike for p and q)
PARAMS = {
    "t0.8_k3": SamplingParams(temperature=0.8, top_k=3, seed=0),
    "t1.2_p0.8": SamplingParams(temperature=1.2, top_p=0.8, seed=0),
    "t0.9_k4_p0.85": SamplingParams(temperature=0.9, top_k=4, top_p=0.85, seed=0),
}


@pytest.mark.parametrize("budget", [1, 2])
@pytest.mark.parametrize("pname", list(PARAMS))
def test_engine_sampling_is_the_processed_target(monkeypatch, pname: str, budget: int) -> None:
    params = PARAMS[pname]
    got = enumerate_runs(monkeypatch, generate_with(budget, params))
    want = target_joint(params, LENGTH)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    assert set(got) <= set(want)  # nothing top-k / top-p rules out is ever emitted
    assert tv(got, want) < 1e-5


# --------------------------------------------------------------------------- planted bugs
def _processing_ignored(logits, params):
    """Bug: the target's rows processed with the temperature only (top-k and top-p dropped)."""
    return logits_to_probs(logits, SamplingParams(temperature=params.temperature))


@pytest.mark.parametrize(
    "bug",
    [
        ("engine", "logits_to_probs", _processing_ignored),
        ("vs", "_residual", lambda p, q: p),  # the bonus drawn from p, not from the residual
        ("vs", "_accept_prob", lambda px, qx: px),  # accepted with p(x), not min(1, p(x) / q(x))
    ],
    ids=["unprocessed-target", "bonus-from-p", "accept-with-p"],
)
def test_the_engine_check_detects_a_broken_acceptance(monkeypatch, bug) -> None:
    where, name, broken = bug
    monkeypatch.setattr(engine_mod if where == "engine" else vs, name, broken)
    params = PARAMS["t0.9_k4_p0.85"]
    got = enumerate_runs(monkeypatch, generate_with(2, params, 3))
    assert tv(got, target_joint(params, 3)) > 0.01
    # the same harness without the bug passes
    monkeypatch.undo()
    assert tv(enumerate_runs(monkeypatch, generate_with(2, params, 3)), target_joint(params, 3)) < 1e-5
