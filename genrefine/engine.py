"""The generation-refinement loop.

One step is five named phases::

    propose   the drafter proposes a draft tree from the context
    verify    one target forward over [root] + draft (tree mask for trees), then a verifier
    accept    the accepted path plus the bonus token are emitted
    rollback  the cache keeps the root and the accepted path, nothing else
    observe   the drafter and the draft-length policy learn from what happened

Plain autoregressive decoding (method ``ar``) is the same loop with no drafter; it has its own
lean branch so that the baseline every speedup is measured against does no extra work per token.
A method with a ``decode`` loop of its own (CALM, lossy) bypasses both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .drafters.base import Context, StepFeedback
from .errors import ConfigError
from .sampling import logits_to_probs, next_token
from .types import Draft, SamplingParams, VerifyResult
from .verify import build_tree, verify_greedy_argmax, verify_speculative, verify_typical

PREFILL_CHUNK = 512


@dataclass
class Stats:
    """What one generation did. Times are seconds of wall clock."""

    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target forwards after the prefill (each emits accepted + 1 tokens)
    drafted: int = 0  # draft nodes sent to verification
    accepted: int = 0  # draft tokens accepted
    accepted_hist: list[int] = field(default_factory=list)  # [k] = steps that accepted k tokens
    drafter_steps: dict[str, int] = field(default_factory=dict)  # which drafter served each step
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_total: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        """Accepted + bonus tokens per target forward (block efficiency, tau); 1.0 for ``ar``."""
        return self.decode_tokens / self.steps if self.steps else 1.0

    @property
    def decode_tokens(self) -> int:
        """Tokens emitted by decoding steps (the first token comes from the prefill)."""
        return max(self.new_tokens - 1, 0)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens / drafted tokens; None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        """New tokens / total time (prefill included, as Spec-Bench measures)."""
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def time_other(self) -> float:
        return max(self.time_total - self.time_prefill - self.time_draft - self.time_verify, 0.0)

    def record_step(self, drafted: int, accepted: int, drafter: str | None) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.accepted_hist) <= accepted:
            self.accepted_hist.append(0)
        self.accepted_hist[accepted] += 1
        if drafter:
            self.drafter_steps[drafter] = self.drafter_steps.get(drafter, 0) + 1

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "tokens_per_step": self.tokens_per_step,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_s": self.tokens_per_s,
            "accepted_hist": list(self.accepted_hist),
            "drafter_steps": dict(self.drafter_steps),
            "time_prefill": self.time_prefill,
            "time_draft": self.time_draft,
            "time_verify": self.time_verify,
            "time_other": self.time_other,
            "time_total": self.time_total,
        }


def prefill(model, cache, prompt: Tensor) -> Tensor:
    """Run the prompt ([L] long) through the model in chunks; logits of its last row: [1, V]."""
    logits = None
    for s in range(0, prompt.shape[0], PREFILL_CHUNK):
        chunk = prompt[s : s + PREFILL_CHUNK]
        last = s + PREFILL_CHUNK >= prompt.shape[0]
        rows = torch.tensor([chunk.shape[0] - 1]) if last else torch.zeros(0, dtype=torch.long)
        logits = model.forward(chunk, cache, logits_rows=rows).logits
    return logits


def _truncate(emitted: list[int], remaining: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """Cut emitted tokens at the first EOS (dropped) and at the token budget."""
    for i, t in enumerate(emitted[:remaining]):
        if t in eos:
            return emitted[:i], True
    return emitted[:remaining], False


class Engine:
    """Runs one method (drafter + verifier + policy) on one model.

    ``method`` is a :class:`genrefine.methods.Method` (``drafters`` may be empty: plain decoding).
    """

    def __init__(self, model, method) -> None:
        self.model = model
        self.method = method
        self.finish_reason: str | None = None

    def generate(
        self,
        prompt_ids: list[int] | Tensor,
        max_new_tokens: int,
        params: SamplingParams,
        eos_ids: frozenset[int] = frozenset(),
        stats: Stats | None = None,
    ) -> Iterator[list[int]]:
        """Yield lists of new token ids as they are decided; fills ``stats`` as it goes.

        Sets ``self.finish_reason`` to "stop" (EOS), "length" (max tokens or context) at the end.
        """
        model = self.model
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        L = int(prompt.shape[0])
        if L == 0:
            raise ConfigError("the prompt is empty: give at least one token of text")
        if L >= model.max_context:
            raise ConfigError(
                f"the prompt has {L} tokens but the model's context holds {model.max_context}: "
                "shorten the prompt"
            )
        stats = stats if stats is not None else Stats(self.method.name)
        stats.prompt_tokens = L
        if self.method.decode is not None:  # a decoding loop of its own (not draft-and-verify)
            self.finish_reason = "length"
            self.finish_reason = yield from self.method.decode(
                model, prompt, max_new_tokens, params, eos_ids, stats
            )
            return
        max_draft = self.method.max_budget if self.method.drafters else 0
        capacity = min(model.max_context, L + max_new_tokens + max_draft + 1)
        generator = None if params.greedy else _generator(params, model.device)
        t_start = time.perf_counter()
        cache = model.new_cache(capacity)
        logits = prefill(model, cache, prompt)
        first = int(next_token(logits[0], params, generator))
        stats.time_prefill = time.perf_counter() - t_start
        self.finish_reason = "length"
        try:
            out, stop = _truncate([first], max_new_tokens, eos_ids)
            stats.new_tokens = len(out)
            stats.time_total = time.perf_counter() - t_start
            if out:
                yield out
            if stop:
                self.finish_reason = "stop"
                return
            if stats.new_tokens >= max_new_tokens:
                return
            if self.method.drafters:
                loop = self._speculative(cache, prompt, first, max_new_tokens, params, eos_ids, stats, generator, t_start)
            else:
                loop = self._plain(cache, first, max_new_tokens, params, eos_ids, stats, generator, t_start)
            yield from loop
        finally:
            stats.time_total = time.perf_counter() - t_start

    # -------------------------------------------------------------- plain decoding (ar)
    def _plain(self, cache, root, max_new, params, eos, stats, generator, t_start):
        model = self.model
        tok = torch.tensor([root], dtype=torch.long, device=model.device)
        while stats.new_tokens < max_new:
            if cache.length + 1 > cache.capacity:
                return
            t0 = time.perf_counter()
            logits = model.forward(tok, cache).logits  # [1, V]
            tok = next_token(logits, params, generator)  # [1]
            t = int(tok)
            stats.time_verify += time.perf_counter() - t0
            stats.record_step(0, 0, None)
            if t in eos:
                self.finish_reason = "stop"
                stats.time_total = time.perf_counter() - t_start
                return
            stats.new_tokens += 1
            stats.time_total = time.perf_counter() - t_start
            yield [t]

    # -------------------------------------------------------------- draft and verify
    def _speculative(self, cache, prompt, root, max_new, params, eos, stats, generator, t_start):
        model = self.model
        method = self.method
        for d in method.drafters:
            d.reset()
        method.policy.reset()
        history = torch.empty(prompt.shape[0] + max_new + method.max_budget + 2, dtype=torch.long)
        history[: prompt.shape[0]] = prompt
        n_hist = prompt.shape[0]
        history[n_hist] = root
        n_hist += 1
        L0 = int(prompt.shape[0])
        while stats.new_tokens < max_new:
            remaining = max_new - stats.new_tokens
            room = cache.capacity - cache.length - 1  # draft nodes that still fit
            if room < 0:
                return
            # propose
            t0 = time.perf_counter()
            ctx = Context(history[:n_hist], L0, cache)
            drafter, budget = method.policy.choose(method.drafters)
            budget = max(0, min(budget, remaining - 1, room))
            draft = drafter.propose(ctx, budget) if (drafter is not None and budget > 0) else Draft.empty()
            if len(draft) > budget:
                draft = _prefix_nodes(draft, budget)
            t1 = time.perf_counter()
            stats.time_draft += t1 - t0
            # verify: one target forward over [root] + draft
            n = len(draft)
            inp = torch.cat([history[n_hist - 1 : n_hist], draft.tokens])
            if n == 0 or draft.is_chain:
                out = model.forward(inp, cache)
                tree_info = None
            else:
                tree_info = build_tree(draft.parents)
                positions = cache.length + torch.cat(
                    [torch.zeros(1, dtype=torch.long), 1 + tree_info.depth]
                )
                out = model.forward(inp, cache, positions=positions, tree_mask=tree_info.mask_with_root)
            logits = out.logits  # [n + 1, V]
            target_argmax = logits.argmax(dim=-1)  # [n + 1]
            result = self._verify(draft, logits, target_argmax, params, generator)
            # accept + rollback: keep the root and the accepted path
            a = result.num_accepted
            start = cache.length - (n + 1)
            if tree_info is None:
                cache.rollback(n - a)
            else:
                cache.keep(start, torch.cat([torch.zeros(1, dtype=torch.long), result.path.cpu() + 1]))
            t2 = time.perf_counter()
            stats.time_verify += t2 - t1
            emitted = result.tokens.tolist()
            # observe
            if drafter is not None and n > 0:
                drafter.observe(ctx, StepFeedback(draft, result, target_argmax))
            method.policy.update(drafter, n, a, t1 - t0, tree_info)
            stats.record_step(n, a, drafter.name if (drafter is not None and n > 0) else None)
            stats.time_draft += time.perf_counter() - t2
            kept, stop = _truncate(emitted, remaining, eos)
            history[n_hist : n_hist + len(emitted)] = result.tokens.cpu()
            n_hist += len(emitted)
            stats.new_tokens += len(kept)
            stats.time_total = time.perf_counter() - t_start
            if kept:
                yield kept
            if stop:
                self.finish_reason = "stop"
                return

    def _verify(self, draft: Draft, logits: Tensor, target_argmax: Tensor, params, generator) -> VerifyResult:
        if params.greedy:
            return verify_greedy_argmax(draft, target_argmax)
        probs = logits_to_probs(logits, params)  # [n + 1, V]
        if self.method.acceptance == "typical":
            return verify_typical(draft, probs, generator)
        return verify_speculative(draft, probs, generator)


def _prefix_nodes(draft: Draft, budget: int) -> Draft:
    """The first ``budget`` nodes of a draft (a valid tree: parents precede children)."""
    probs = None if draft.probs is None else draft.probs[:budget]
    return Draft(draft.tokens[:budget], draft.parents[:budget], probs)


def _generator(params: SamplingParams, device) -> torch.Generator:
    from .sampling import make_generator

    return make_generator(params, device)
