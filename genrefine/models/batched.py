"""One target forward for the decoding steps of many sequences (the server's continuous batching).

Each sequence brings its own new tokens (``[root] + draft``, a chain or a tree), its own cache and
its own positions. :func:`forward_batch` runs them all through the model at once: the rows of every
sequence are concatenated for everything that works row by row (embeddings, norms, the q/k/v and
output projections, the MLP, the output head), so each weight matrix is read once per step for the
whole batch; attention alone runs per sequence, against that sequence's cache, with the mask (or,
for bitwise-exact decoding, the block plan of ``attention.py``) that ``NativeModel.forward`` would
use for it.

Exactness. A batched row equals the row the sequence would get from its own forward only when the
matmuls are batch-invariant, which is what ``NativeModel.bitwise_exact`` says (bfloat16 on the
development CPU, after :mod:`genrefine.models.invariance`'s probe, which checks up to
``EXACT_ROWS_MAX`` rows). So by default the rows are batched only when the model is bitwise exact,
in groups of at most ``EXACT_ROWS_MAX`` rows; otherwise (float32 here, where one-row and many-row
kernels round differently, or the transformers adapter) every sequence runs its own forward, and
greedy output stays exactly what each request gets alone. ``mode="always"`` batches regardless
(faster, equal only up to rounding).

The concatenated forward itself is :meth:`NativeModel.forward_batch` (its layer body is
``NativeModel._layer``'s, made of the same pieces; with quantized weights and the C++ kernels,
every layer of every sequence in one call); this module decides when rows are batched and in
which groups. The tests check bit for bit that a batched forward gives every sequence what
``model.forward`` gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .runtime import EXACT_ROWS_MAX, NativeModel

MODES = ("auto", "always", "never")


def max_rows() -> int:
    """Rows per batched forward when exactness matters (what the invariance probe covers)."""
    return EXACT_ROWS_MAX


@dataclass
class BatchItem:
    """One sequence's part of a batched forward (the arguments of ``model.forward``)."""

    tokens: Tensor  # [n] long: new tokens, appended after cache.length
    cache: object  # the sequence's KVCache
    positions: Tensor | None = None  # [n] long; None: cache.length + arange(n)
    tree_mask: Tensor | None = None  # [n, n] bool; None: causal among the new tokens


def batches_rows(model, mode: str = "auto") -> bool:
    """Whether :func:`forward_batch` concatenates sequences for ``model`` under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"batching mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(model, NativeModel) or mode == "never":
        return False
    return mode == "always" or bool(model.bitwise_exact)


def plan_groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Split item indices (in order) into groups of at most ``limit`` rows; an item larger than
    ``limit`` is a group of its own."""
    groups: list[list[int]] = []
    rows = 0
    for i, n in enumerate(sizes):
        if groups and rows + n <= limit:
            groups[-1].append(i)
            rows += n
        else:
            groups.append([i])
            rows = n
    return groups


def forward_batch(model, items: list[BatchItem], mode: str = "auto") -> list[Tensor]:
    """Run every item's new tokens and append them to its cache; logits per item ([n_i, V]).

    With ``mode="auto"`` the result is bitwise what ``model.forward(item.tokens, item.cache,
    positions=..., tree_mask=...)`` returns for each item on its own (see the module docstring).
    """
    if not items:
        return []
    if not batches_rows(model, mode) or len(items) == 1:
        return [_single(model, it) for it in items]
    sizes = [int(it.tokens.shape[0]) for it in items]
    limit = max_rows() if mode == "auto" else max(sum(sizes), 1)
    out: list[Tensor | None] = [None] * len(items)
    for group in plan_groups(sizes, limit):
        if len(group) == 1:
            out[group[0]] = _single(model, items[group[0]])
            continue
        for i, logits in zip(group, model.forward_batch([items[i] for i in group])):
            out[i] = logits
    return out  # type: ignore[return-value]


def _single(model, it: BatchItem) -> Tensor:
    return model.forward(it.tokens, it.cache, positions=it.positions, tree_mask=it.tree_mask).logits
