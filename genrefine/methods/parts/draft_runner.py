"""A draft model run beside the target: its own KV cache kept in step with the context.

:class:`DraftRunner` remembers which token ids its cache holds; each draft keeps the longest
common prefix with the context, rolls back the rest and feeds only what is new, then drafts token
by token (greedy or sampled from ``q``), onto a reduced head when given one. Used by ``sps``
(:mod:`genrefine.methods.sps`) and the text bridge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ConfigError
from ...sampling import logits_to_probs, sample
from ...types import SamplingParams

DEFAULT_CONFIDENCE = 0.4


PREFILL_CHUNK = 512  # context tokens fed to the draft model per forward


GREEDY_PARAMS = SamplingParams()


# --------------------------------------------------------------------------- the draft model
def common_prefix_len(a: Tensor, b: Tensor) -> int:
    """Length of the longest common prefix of two [n] long tensors (on the CPU)."""
    n = min(int(a.shape[0]), int(b.shape[0]))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


class DraftRunner:
    """The draft model with its own KV cache, kept in step with a sequence of its token ids.

    The cache is allocated on first use and grown (refilled from scratch) when a context no
    longer fits; ``ids[:cache.length]`` are the tokens it holds.
    """

    def __init__(self, model, head=None) -> None:
        self.model = model
        self.head = head  # a ReducedHead: logits over head.ids only (column j is token head.ids[j])
        self.cache = None
        self.ids = torch.zeros(0, dtype=torch.long)  # [capacity] long, CPU

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def max_draft(self, context_len: int, budget: int) -> int:
        """How many of ``budget`` tokens fit after a context of ``context_len`` tokens (drafting
        ``k`` tokens feeds ``context_len + k - 1``)."""
        return max(0, min(budget, self.model.max_context - context_len + 1))

    def _reserve(self, need: int) -> None:
        if self.cache is not None and need <= self.cache.capacity:
            return
        cap = min(self.model.max_context, max(2 * need, 256))
        self.cache = self.model.new_cache(cap)
        self.ids = torch.zeros(cap, dtype=torch.long)

    def sync(self, ids: Tensor, extra: int) -> Tensor:
        """Make the cache hold ``ids`` ([L] long, L >= 1) with room for ``extra`` more; returns
        the logits after ``ids[-1]`` ([1, V_draft] float32). Feeds only what the cache lacks."""
        ids = ids.cpu()
        L = int(ids.shape[0])
        assert L >= 1, "the draft model needs at least one context token"
        self._reserve(L + extra)
        cache = self.cache
        keep = min(common_prefix_len(self.ids[: cache.length], ids), L - 1)
        cache.rollback(cache.length - keep)  # the last token is always fed: its logits are needed
        logits = None
        for s in range(keep, L, PREFILL_CHUNK):
            chunk = ids[s : s + PREFILL_CHUNK]
            last = s + PREFILL_CHUNK >= L
            rows = torch.tensor([chunk.shape[0] - 1]) if last else torch.zeros(0, dtype=torch.long)
            logits = self._forward(chunk, cache, rows)
        self.ids[keep:L] = ids[keep:]
        return logits

    def _forward(self, tokens: Tensor, cache, rows: Tensor | None = None) -> Tensor | None:
        """The draft model's logits for ``tokens``' rows ``rows`` (None: all), over the reduced
        head's columns when there is one."""
        tokens = tokens.to(self.model.device)
        if self.head is None:
            return self.model.forward(tokens, cache, logits_rows=rows).logits
        return self.model.forward(tokens, cache, logits_rows=rows, vocab_subset=self.head).logits

    def token_ids(self, cols: Tensor) -> Tensor:
        """Token ids of logit columns ``cols`` (the same without a reduced head)."""
        return cols if self.head is None else self.head.ids[cols.to(self.head.ids.device)]

    def expand(self, q: Tensor, vocab: int) -> Tensor:
        """``q`` [n, columns] as a distribution over token ids ``0 .. vocab - 1`` ([n, vocab],
        zero for ids the draft cannot propose)."""
        if self.head is None:
            return q if q.shape[1] == vocab else torch.nn.functional.pad(q, (0, vocab - q.shape[1]))
        full = q.new_zeros(q.shape[0], vocab)
        return full.index_copy_(1, self.head.ids.to(q.device), q)

    def draft(
        self,
        logits: Tensor,
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        confidence: float,
        vocab: int,
        stop=None,
    ) -> tuple[Tensor, Tensor | None]:
        """A chain of at most ``k`` tokens after :meth:`sync` returned ``logits`` ([1, V]).

        Only the first ``vocab`` columns are drafted (ids below ``vocab``, or with a reduced head
        its columns, all of them). Greedy ``params``: the argmax, returns ``(tokens [n], None)``.
        Sampling: each token drawn from ``q`` = :func:`logits_to_probs` of the draft logits with
        ``params``, returns ``(tokens [n], q [n, vocab])`` over the columns (:meth:`expand` maps
        it onto token ids). Tokens are token ids on the CPU; the cache ends up holding the context
        and the first ``n - 1`` draft tokens. ``stop``, a :class:`~genrefine.methods.parts.draft_size.DraftStop`,
        replaces the ``confidence`` threshold: it is told each token's top draft probability and
        says whether to draft another.
        """
        assert logits.shape[0] == 1 and k >= 1, (tuple(logits.shape), k)
        if stop is not None:
            stop.begin()
        want_top = stop is not None or confidence > 0.0  # top draft probabilities are read
        cache = self.cache
        start = cache.length
        toks: list[Tensor] = []
        qs: list[Tensor] = []
        for i in range(k):
            row = logits[:, :vocab]  # [1, vocab]
            if params.greedy:
                if want_top:
                    top, tok = row.softmax(dim=-1).max(dim=-1)  # [1], [1]
                else:
                    top, tok = None, row.argmax(dim=-1)
            else:
                q = logits_to_probs(row, params)  # [1, vocab]
                qs.append(q)
                dev = generator.device if generator is not None else q.device
                tok = sample(q.to(dev), generator).to(q.device)  # [1]
                top = q.max(dim=-1).values if want_top else None
            tok = self.token_ids(tok)
            toks.append(tok)
            if stop is not None:  # told every token, the last one too (it may be cut)
                if not stop.more(float(top)) or i + 1 == k:
                    break
            elif i + 1 == k or (top is not None and float(top) < confidence):  # one host sync
                break
            logits = self._forward(tok, cache)  # [1, V]
        out = torch.cat(toks).cpu()  # [n]
        self.ids[start : start + out.shape[0] - 1] = out[:-1]
        return out, (torch.cat(qs) if qs else None)


def check_confidence(confidence: float) -> None:
    if not 0.0 <= confidence <= 1.0:
        raise ConfigError(f"the draft confidence threshold must be in [0, 1], got {confidence}")
