"""Lattice rescoring of blockwise-parallel drafts with a small n-gram language model.

After Kim et al. 2024, "Exploring and Improving Drafts in Blockwise Parallel Decoding".

Terms. Blockwise parallel decoding (BPD) has ``K`` prediction heads; head ``i`` proposes a
distribution for the token ``i + 1`` places after the root (the last decided token). Taking each
head's top-``k`` tokens gives a *lattice*: ``K`` *columns* of ``k`` *candidates*
(``cand_ids [K, k]``) with the heads' log-probabilities (``cand_logp [K, k]``). A *path* picks one
candidate per column, ``c_0 .. c_{K-1}``; its *score* is::

    score = sum_i cand_logp[i, c_i] + alpha * sum_i log P_lm(tok(c_i) | context, tok(c_<i))

With ``alpha = 0`` the best path is the per-column argmax, the plain BPD draft. The heads predict
each position independently, so their argmax path is often incoherent (repeated or clashing
words); the LM term favours paths whose neighbouring tokens fit together.

*Global p-best n-gram rescoring* finds the ``p`` best-scoring paths. :func:`rescore_lattice` does a
beam search over the columns; for an n-gram LM the future of a partial path depends only on its
last ``n - 1`` tokens (its *state*), so among partial paths in the same state only the ``p`` best
can still end in the top ``p``: the rest are pruned before the beam is cut, which makes the search
exact whenever the number of distinct states times ``p`` fits in the beam (``k ** (n - 1) * p``).
:func:`paths_to_draft` merges the chosen paths into one token tree for tree verification.

:class:`NgramLM` is a token-id n-gram model with interpolated absolute discounting (``d = 0.75``)
down to an add-one unigram, so every probability is positive and each conditional distribution
sums to one over the vocabulary. Files are safetensors, never pickle: per order ``m`` in ``1..n``
the tensors ``ngrams_{m}`` ([c_m, m] int64, the distinct m-grams) and ``counts_{m}`` ([c_m] int64);
string metadata ``format`` ("genrefine-ngram-lm"), ``version`` ("1"), ``order``, ``vocab_size`` and
``discount``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ...errors import ConfigError, GenrefineError
from ...types import Draft

FORMAT = "genrefine-ngram-lm"


FORMAT_VERSION = "1"


class Scorer(Protocol):
    """What :func:`rescore_lattice` needs from a language model. An ``order`` attribute (int),
    when present, promises that only the last ``order - 1`` context tokens matter."""

    def logprob(self, context: Sequence[int], token_ids: Tensor) -> Tensor: ...


def _ints(x: Sequence[int] | Tensor) -> list[int]:
    if isinstance(x, Tensor):
        assert x.dim() <= 1, x.shape
        return x.reshape(-1).tolist()
    return [int(t) for t in x]


class NgramLM:
    """A token-id n-gram LM with interpolated absolute discounting.

    For a history ``h`` (the last ``m - 1`` tokens) seen ``c(h) > 0`` times as the start of an
    m-gram, with ``t(h)`` distinct continuations::

        P_m(w | h) = (max(c(h w) - d, 0) + d * t(h) * P_{m-1}(w | h[1:])) / c(h)
        P_1(w)     = (c(w) + 1) / (N + vocab_size)

    and ``P_m(w | h) = P_{m-1}(w | h[1:])`` for an unseen ``h``. Counts are kept up to date by
    :meth:`add`; there is nothing to finalize.
    """

    def __init__(self, order: int = 3, vocab_size: int = 0, discount: float = 0.75) -> None:
        if order < 1:
            raise ConfigError(f"the n-gram order must be >= 1, got {order}")
        if vocab_size < 1:
            raise ConfigError(f"vocab_size must be >= 1 (the tokenizer's size), got {vocab_size}")
        if not (0.0 < discount <= 1.0):
            raise ConfigError(f"the discount must be in (0, 1], got {discount}")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.discount = float(discount)
        # [m-1]: m-gram -> count
        self._counts: list[dict[tuple[int, ...], int]] = [{} for _ in range(order)]
        # [m-1]: (m-1)-token history -> [c(h), t(h)]; index 0 (the empty history) is unused
        self._hist: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(order)]
        self._total = 0  # N, the number of tokens counted

    def _count(self, gram: tuple[int, ...], c: int) -> None:
        m = len(gram)
        table = self._counts[m - 1]
        old = table.get(gram, 0)
        table[gram] = old + c
        if m == 1:
            self._total += c
            return
        st = self._hist[m - 1].setdefault(gram[:-1], [0, 0])
        st[0] += c
        st[1] += old == 0

    def add(self, ids: Sequence[int] | Tensor) -> None:
        """Count every m-gram (``m <= order``) of one token sequence ``ids`` [L]."""
        ids = _ints(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ConfigError(
                f"token ids must be in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}: "
                "build the n-gram model with the tokenizer's vocabulary size"
            )
        for i in range(len(ids)):
            for m in range(1, min(self.order, i + 1) + 1):
                self._count(tuple(ids[i - m + 1 : i + 1]), 1)

    @property
    def num_ngrams(self) -> int:
        """Distinct m-grams stored, all orders together."""
        return sum(len(t) for t in self._counts)

    def __len__(self) -> int:
        return self.num_ngrams

    def pruned(self, min_count: int = 2) -> "NgramLM":
        """A model counted from this one's m-grams (``m >= 2``) seen at least ``min_count``
        times, and all unigrams: much smaller files, probabilities still normalised."""
        out = NgramLM(self.order, self.vocab_size, self.discount)
        for m, table in enumerate(self._counts, start=1):
            for gram, c in table.items():
                if m == 1 or c >= min_count:
                    out._count(gram, c)
        return out

    def logprob(self, context: Sequence[int] | Tensor, token_ids: Tensor) -> Tensor:
        """``log P(w | context)`` for each candidate ``w`` in ``token_ids`` [k]: [k] float32.

        Only the last ``order - 1`` tokens of ``context`` are read (fewer when it is shorter).
        """
        n, d = self.order, self.discount
        h = tuple(_ints(context[max(0, len(context) - (n - 1)) :])) if n > 1 else ()
        toks = _ints(token_ids)
        if toks and (min(toks) < 0 or max(toks) >= self.vocab_size):
            raise ConfigError(f"token ids must be in [0, {self.vocab_size}), got {toks}")
        levels = []  # (history, m-gram counts, c(h), d * t(h)), lowest order first
        for m in range(2, min(n, len(h) + 1) + 1):
            hk = h[len(h) - (m - 1) :]
            st = self._hist[m - 1].get(hk)
            if st is not None:
                levels.append((hk, self._counts[m - 1], st[0], d * st[1]))
        uni, denom = self._counts[0], self._total + self.vocab_size
        out = []
        for w in toks:
            p = (uni.get((w,), 0) + 1) / denom
            for hk, table, total, mass in levels:
                p = (max(table.get(hk + (w,), 0) - d, 0.0) + mass * p) / total
            out.append(math.log(p))
        return torch.tensor(out, dtype=torch.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the counts to a safetensors file (see the module docstring); returns the path."""
        from safetensors import SafetensorError

        from ...diskcache import save_tensors

        path = Path(path).expanduser()
        tensors = {}
        for m, table in enumerate(self._counts, start=1):
            tensors[f"ngrams_{m}"] = torch.tensor(list(table), dtype=torch.long).reshape(-1, m)
            tensors[f"counts_{m}"] = torch.tensor(list(table.values()), dtype=torch.long)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "order": str(self.order),
            "vocab_size": str(self.vocab_size),
            "discount": repr(self.discount),
        }
        try:
            return save_tensors(path, tensors, meta, make_parent=False)
        except (OSError, SafetensorError) as e:
            raise GenrefineError(f"cannot write the n-gram model to {str(path)!r}: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NgramLM":
        """Read a file written by :meth:`save`. A missing, foreign or damaged file raises
        :class:`~genrefine.errors.ConfigError`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"n-gram model {str(path)!r} does not exist: check the path")
        bad = f"{str(path)!r} is not a valid genrefine n-gram model: rebuild it with NgramLM.save"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                    raise ConfigError(bad)
                lm = cls(int(meta["order"]), int(meta["vocab_size"]), float(meta["discount"]))
                names = [(f"ngrams_{m}", f"counts_{m}") for m in range(1, lm.order + 1)]
                if set(f.keys()) != {name for pair in names for name in pair}:
                    raise ConfigError(bad)
                tables = [(f.get_tensor(g), f.get_tensor(c)) for g, c in names]
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise ConfigError(bad) from e
        for m, (grams, counts) in enumerate(tables, start=1):
            ok = (
                grams.dtype == counts.dtype == torch.long
                and grams.dim() == 2
                and grams.shape[1] == m
                and counts.shape == grams.shape[:1]
                and (counts.numel() == 0 or int(counts.min()) >= 1)
                and (grams.numel() == 0 or 0 <= int(grams.min()))
                and (grams.numel() == 0 or int(grams.max()) < lm.vocab_size)
            )
            if not ok:
                raise ConfigError(bad)
            for gram, c in zip(map(tuple, grams.tolist()), counts.tolist()):
                lm._count(gram, c)
        return lm


def rescore_lattice(
    context: Sequence[int] | Tensor,
    cand_ids: Tensor,  # [K, k] long
    cand_logp: Tensor,  # [K, k] float, the heads' log-probabilities
    lm: Scorer,
    alpha: float = 1.0,
    num_paths: int = 1,
    beam: int = 16,
) -> list[tuple[list[int], float]]:
    """The ``num_paths`` best distinct full-length paths through the lattice, best first, as
    ``(tokens [K], score)``; the score is defined in the module docstring.

    ``context`` holds the decided tokens, the root last. Beam search keeping ``max(beam,
    num_paths)`` partial paths per column; when ``lm`` has an ``order`` attribute, partial paths
    sharing their last ``order - 1`` tokens are pruned to the ``num_paths`` best first. With
    ``alpha == 0`` the LM is not called and the first path is the per-column argmax (ties go to
    the lower candidate index).
    """
    assert cand_ids.dim() == 2 and cand_logp.shape == cand_ids.shape, (
        cand_ids.shape,
        cand_logp.shape,
    )
    if num_paths < 1 or beam < 1:
        raise ConfigError(f"num_paths and beam must be >= 1, got {num_paths} and {beam}")
    K, k = cand_ids.shape
    ids, head = cand_ids.tolist(), cand_logp.float().tolist()
    order = getattr(lm, "order", None)
    if isinstance(order, int) and order >= 1:  # only the last order - 1 tokens matter
        ctx = _ints(context[max(0, len(context) - (order - 1)) :])
        state_len = order - 1
    else:
        ctx, state_len = _ints(context), None
    keep = max(beam, num_paths)
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for i in range(K):
        row = cand_ids[i]
        scores: dict[tuple[int, ...], float] = {}  # insertion order = beam order, then candidate
        for path, score in beams:
            lm_lp = lm.logprob(ctx + list(path), row).tolist() if alpha else None
            for j in range(k):
                s = score + head[i][j] + (alpha * lm_lp[j] if lm_lp is not None else 0.0)
                p = path + (ids[i][j],)
                if p not in scores or s > scores[p]:
                    scores[p] = s
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])  # stable: ties keep their order
        if state_len is not None:
            per_state: dict[tuple[int, ...], int] = {}
            kept = []
            for p, s in ranked:
                key = (tuple(ctx) + p)[-state_len:] if state_len else ()
                if per_state.get(key, 0) < num_paths:
                    per_state[key] = per_state.get(key, 0) + 1
                    kept.append((p, s))
            ranked = kept
        beams = ranked[:keep]
    return [(list(p), s) for p, s in beams[:num_paths]]


def paths_to_draft(paths: list[list[int]]) -> Draft:
    """Merge ranked token paths into one prefix tree (shared prefixes become one node).

    Nodes are numbered in path-rank order, so the best path is nodes ``0 .. len - 1`` as a chain
    and truncating the draft to its first ``m`` nodes keeps the best path's prefix; parents always
    precede children. ``probs`` is None (a deterministic draft).
    """
    node: dict[tuple[int, ...], int] = {}  # prefix -> node index
    tokens: list[int] = []
    parents: list[int] = []
    for path in paths:
        prefix: tuple[int, ...] = ()
        for t in path:
            parent = node[prefix] if prefix else -1
            prefix += (int(t),)
            if prefix not in node:
                node[prefix] = len(tokens)
                tokens.append(int(t))
                parents.append(parent)
    if not tokens:
        return Draft.empty()
    return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
