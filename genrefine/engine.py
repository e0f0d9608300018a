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

:class:`Decoder` holds one generation's state and is cut open at the target forward
(``propose`` -> forward -> ``accept``): :class:`Engine` runs the forward itself, one sequence at a
time; the server's scheduler (``genrefine/server/scheduler.py``) runs one forward for the steps of
many sequences (``genrefine/models/batched.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ConfigError
from .kernels import argmax
from .methods.base import MAX_DRAFT_NODES, Context, StepFeedback
from .sampling import logits_to_probs, make_generator, next_token
from .types import Draft, SamplingParams, VerifyResult
from .verify import (
    build_tree,
    verify_greedy_argmax,
    verify_relaxed,
    verify_speculative,
    verify_typical,
)

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


def prefill(model, cache, prompt: Tensor, hidden_out: Tensor | None = None) -> Tensor:
    """Run the prompt ([L] long) through the model in chunks; logits of its last row: [1, V].

    hidden_out: a [>= L, hidden] buffer that receives the final hidden states of the prompt."""
    logits = None
    layers = (model.num_layers,) if hidden_out is not None else ()
    for s in range(0, prompt.shape[0], PREFILL_CHUNK):
        chunk = prompt[s : s + PREFILL_CHUNK]
        last = s + PREFILL_CHUNK >= prompt.shape[0]
        rows = torch.tensor([chunk.shape[0] - 1]) if last else torch.zeros(0, dtype=torch.long)
        out = model.forward(chunk, cache, logits_rows=rows, hidden_layers=layers)
        logits = out.logits
        if hidden_out is not None:
            hidden_out[s : s + chunk.shape[0]] = out.hidden[model.num_layers]
    return logits


_EMPTY = Draft.empty()  # the draft of a step that drafts nothing (empty tensors: nothing to mutate)


def _truncate(emitted: list[int], remaining: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """Cut emitted tokens at the first EOS (dropped) and at the token budget."""
    for i, t in enumerate(emitted[:remaining]):
        if t in eos:
            return emitted[:i], True
    return emitted[:remaining], False


@dataclass
class StepInput:
    """The target forward one decoding step needs: ``[root] + draft`` on the sequence's cache."""

    tokens: Tensor  # [n + 1] long: the root, then the draft nodes
    cache: object  # the sequence's KVCache (the forward appends n + 1 entries)
    positions: Tensor | None = None  # [n + 1] long; None: cache.length + arange(n + 1)
    tree_mask: Tensor | None = None  # [n + 1, n + 1] bool; None: causal (a chain)
    # the drafter wants the forward's final hidden states: pass them to Decoder.accept
    # (forward(..., hidden_layers=(model.num_layers,)).hidden[model.num_layers])
    hidden: bool = False


class Decoder:
    """One generation between target forwards: the engine's loop, cut open at the forward.

    ``start()`` prefills the prompt and returns the first token(s). Then, until ``done``, each
    step is ``propose()`` (the forward to run, or None when the budget or the cache is spent),
    the caller's forward (alone, as :class:`Engine` does, or batched with other sequences' steps
    by a scheduler), and ``accept(logits)``: verify, accept, roll back, observe, and return the
    new tokens. The result is the same whoever runs the forward, as long as the logits are.
    """

    def __init__(
        self,
        model,
        method,
        prompt: Tensor,
        max_new_tokens: int,
        params: SamplingParams,
        eos_ids: frozenset[int],
        stats: Stats,
    ) -> None:
        self.model, self.method = model, method
        self.prompt = prompt  # [L] long
        self.max_new, self.params, self.eos, self.stats = max_new_tokens, params, eos_ids, stats
        self.done = False
        self.finish_reason = "length"
        self.cache = None
        self._t_start = 0.0

    # -------------------------------------------------------------- prefill
    def start(self) -> list[int]:
        """Prefill the prompt; the first new token (empty if it is EOS or the budget is 0)."""
        model, method, stats = self.model, self.method, self.stats
        L = int(self.prompt.shape[0])
        max_draft = method.max_budget if method.drafters else 0
        capacity = min(model.max_context, L + self.max_new + max_draft + 1)
        self.generator = None if self.params.greedy else make_generator(self.params, model.device)
        self._t_start = t_start = time.perf_counter()
        self.cache = model.new_cache(capacity)
        self._want_hidden = any(getattr(d, "wants_hidden", False) for d in method.drafters)
        self._hidden = None
        if self._want_hidden:
            self._hidden = torch.empty(
                capacity, model.hidden_size, dtype=model.dtype, device=model.device
            )
        logits = prefill(model, self.cache, self.prompt, self._hidden)
        first = int(next_token(logits[0], self.params, self.generator))
        stats.time_prefill = time.perf_counter() - t_start
        out, stop = _truncate([first], self.max_new, self.eos)
        stats.new_tokens = len(out)
        stats.time_total = time.perf_counter() - t_start
        if stop:
            self.finish_reason = "stop"
        self.done = stop or stats.new_tokens >= self.max_new
        self._root = torch.tensor([first], dtype=torch.long, device=model.device)  # [1]
        if method.drafters and not self.done:
            for d in method.drafters:
                d.reset()
            method.policy.reset(self.params)
            # the prompt and every decided token; the last one is the root of the next draft. All
            # but the root are in the cache, so the cache's capacity (sized by the context, not by
            # max_new, which may be huge) bounds it
            self._history = torch.empty(capacity + 1, dtype=torch.long)
            self._history[:L] = self.prompt
            self._history[L] = first
            self._n_hist = L + 1
        return out

    # -------------------------------------------------------------- propose
    def propose(self, max_nodes: int | None = None) -> StepInput | None:
        """Draft the next step; None (and ``done``) when no token fits in budget and cache.

        max_nodes: at most this many draft nodes (a scheduler sharing one forward among several
        sequences keeps the forward's rows within what stays bitwise exact)."""
        if self.done or self.stats.new_tokens >= self.max_new:
            self.done = True
            return None
        cache = self.cache
        room = cache.capacity - cache.length - 1  # draft nodes that still fit
        if room < 0:
            self.done = True
            return None
        self._t0 = time.perf_counter()
        if not self.method.drafters:  # plain decoding (ar): the root alone, nothing else
            self._t1 = self._t0
            return StepInput(self._root, cache)
        method = self.method
        remaining = self.max_new - self.stats.new_tokens
        history, n_hist = self._history, self._n_hist
        drafter, budget = method.policy.choose(method.drafters)
        budget = max(0, min(budget, remaining - 1, room, MAX_DRAFT_NODES))
        if max_nodes is not None:
            budget = max(0, min(budget, max_nodes))
        if drafter is not None and budget > 0:
            hidden = None if self._hidden is None else self._hidden[: cache.length]
            ctx = Context(
                history[:n_hist], int(self.prompt.shape[0]), cache, self.params, self.generator,
                hidden,
            )
            draft = drafter.propose(ctx, budget)
            if len(draft) > budget:
                draft = draft.prefix(budget)
        else:  # nothing to draft this step (auto under load, mostly): no context to build
            ctx, draft = None, _EMPTY
        self._ctx, self._drafter, self._draft = ctx, drafter, draft
        self._t1 = time.perf_counter()
        self.stats.time_draft += self._t1 - self._t0
        n = len(draft)
        root = history[n_hist - 1 : n_hist]
        inp = root.clone() if n == 0 else torch.cat([root, draft.tokens])  # [n + 1]
        want = self._want_hidden
        if n == 0 or draft.is_chain:
            self._tree = None
            return StepInput(inp, cache, hidden=want)
        self._tree = build_tree(draft.parents)
        positions = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + self._tree.depth])
        return StepInput(
            inp, cache, positions=positions, tree_mask=self._tree.mask_with_root, hidden=want
        )

    # -------------------------------------------------------------- verify, accept, rollback, observe
    def accept(self, logits: Tensor, hidden: Tensor | None = None) -> list[int]:
        """Finish the step from the forward's logits ([n + 1, V]); the tokens it emits.

        hidden: the forward's final hidden states ([n + 1, hidden]) when the step asked for them
        (``StepInput.hidden``)."""
        stats, params = self.stats, self.params
        if not self.method.drafters:
            tok = next_token(logits, params, self.generator)  # [1]
            t = int(tok)
            stats.time_verify += time.perf_counter() - self._t1
            stats.record_step(0, 0, None)
            if t in self.eos:
                return self._stop([])
            self._root = tok
            stats.new_tokens += 1
            stats.time_total = time.perf_counter() - self._t_start
            self.done = stats.new_tokens >= self.max_new
            return [t]
        draft, drafter, tree_info, cache = self._draft, self._drafter, self._tree, self.cache
        n = len(draft)
        if n == 0 and params.greedy and self._hidden is None:
            # nothing drafted (auto under load, mostly): greedy verification of the root alone is
            # its argmax, so skip building an empty tree and path (about 0.2 ms per sequence-step)
            tok = argmax(logits[:1])  # [1]
            t2 = time.perf_counter()
            stats.time_verify += t2 - self._t1
            self.method.policy.update(drafter, 0, 0, self._t1 - self._t0, None)
            stats.record_step(0, 0, None)
            stats.time_draft += time.perf_counter() - t2
            return self._commit([int(tok)], tok)
        target_argmax = argmax(logits)  # [n + 1]
        result = self._verify(draft, logits, target_argmax)
        # accept + rollback: keep the root and the accepted path
        a = result.num_accepted
        start = cache.length - (n + 1)
        kept_rows = None
        if tree_info is None:
            cache.rollback(n - a)
        else:
            kept_rows = torch.cat([torch.zeros(1, dtype=torch.long), result.path.cpu() + 1])
            cache.keep(start, kept_rows)
        if self._hidden is not None:
            if hidden is None:
                raise ConfigError(
                    "this method's drafter needs the forward's hidden states (StepInput.hidden): "
                    "pass forward(..., hidden_layers=(num_layers,)).hidden[num_layers] to accept()"
                )
            rows = hidden[: a + 1] if kept_rows is None else hidden[kept_rows.to(hidden.device)]
            self._hidden[start : start + a + 1] = rows
        t2 = time.perf_counter()
        stats.time_verify += t2 - self._t1
        emitted = result.tokens.tolist()
        # observe
        if drafter is not None and n > 0:
            drafter.observe(self._ctx, StepFeedback(draft, result, target_argmax, logits))
        self.method.policy.update(drafter, n, a, self._t1 - self._t0, tree_info)
        stats.record_step(n, a, drafter.name if (drafter is not None and n > 0) else None)
        stats.time_draft += time.perf_counter() - t2
        return self._commit(emitted, result.tokens)

    def _commit(self, emitted: list[int], tokens: Tensor) -> list[int]:
        """Append the step's ``emitted`` tokens (``tokens``, the same as a tensor) to the history
        and count them; the ones the caller gets (cut at the budget or an end token)."""
        stats = self.stats
        kept, stop = _truncate(emitted, self.max_new - stats.new_tokens, self.eos)
        self._history[self._n_hist : self._n_hist + len(emitted)] = tokens.cpu()
        self._n_hist += len(emitted)
        stats.new_tokens += len(kept)
        stats.time_total = time.perf_counter() - self._t_start
        if stop:
            return self._stop(kept)
        self.done = stats.new_tokens >= self.max_new
        return kept

    def _stop(self, kept: list[int]) -> list[int]:
        self.finish_reason = "stop"
        self.done = True
        self.stats.time_total = time.perf_counter() - self._t_start
        return kept

    def _verify(self, draft: Draft, logits: Tensor, target_argmax: Tensor) -> VerifyResult:
        if self.params.greedy:
            return verify_greedy_argmax(draft, target_argmax)
        probs = logits_to_probs(logits, self.params)  # [n + 1, V]
        if self.method.verify_sampled is not None:  # the method's own rule (pcg, vadusa; lossy)
            return self.method.verify_sampled(draft, probs, self.generator)
        if self.method.relax is not None:  # lossy, within a total-variation budget per token
            return verify_relaxed(draft, probs, self.generator, self.method.relax)
        if self.method.acceptance == "typical":
            return verify_typical(draft, probs, self.generator)
        return verify_speculative(draft, probs, self.generator)


def check_prompt(model, prompt_ids: list[int] | Tensor) -> Tensor:
    """The prompt as [L] long, or a :class:`ConfigError` when it is empty or fills the context."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    L = int(prompt.shape[0])
    if L == 0:
        raise ConfigError("the prompt is empty: give at least one token of text")
    if L >= model.max_context:
        raise ConfigError(
            f"the prompt has {L} tokens but the model's context holds {model.max_context}: "
            "shorten the prompt"
        )
    return prompt


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
        prompt = check_prompt(model, prompt_ids)
        stats = stats if stats is not None else Stats(self.method.name)
        stats.prompt_tokens = int(prompt.shape[0])
        if self.method.decode is not None:  # a decoding loop of its own (not draft-and-verify)
            self.finish_reason = "length"
            self.finish_reason = yield from self.method.decode(
                model, prompt, max_new_tokens, params, eos_ids, stats
            )
            return
        dec = Decoder(model, self.method, prompt, max_new_tokens, params, eos_ids, stats)
        try:
            out = dec.start()
            self.finish_reason = dec.finish_reason
            if out:
                yield out
            while True:
                step = dec.propose()
                if step is None:
                    return
                layers = (model.num_layers,) if step.hidden else ()
                res = model.forward(
                    step.tokens,
                    step.cache,
                    positions=step.positions,
                    tree_mask=step.tree_mask,
                    hidden_layers=layers,
                )
                out = dec.accept(res.logits, res.hidden.get(model.num_layers))  # [n + 1, V]
                self.finish_reason = dec.finish_reason
                if out:
                    yield out
        finally:
            self.finish_reason = dec.finish_reason
            if dec._t_start:
                stats.time_total = time.perf_counter() - dec._t_start
