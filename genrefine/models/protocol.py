"""The model and cache interface every backend implements, and what drafters may read beyond it.

Three backends implement :class:`Model` and :class:`Cache`: the native runtime
(:class:`~genrefine.models.runtime.NativeModel` with :class:`~genrefine.models.cache.KVCache`),
llama.cpp (:class:`~genrefine.models.llamacpp.LlamaCppModel`) and the generic transformers adapter
(:class:`~genrefine.models.hf.HFModel`). The engine, the verifiers and every chain or tree drafter
use only this interface; ``tests/test_runtime.py`` checks that each backend's ``forward`` accepts
it.

``forward`` always appends its ``n`` new entries to the cache (``cache.length += n``); the caller
undoes what it does not keep with ``rollback`` (drop the last ``k``) or ``keep`` (of the entries
from slot ``start`` on, keep those at offsets ``idx``, e.g. a tree's accepted path). The committed
prefix is contiguous, so slot ``i`` holds position ``i``; only the new tokens of a tree share
positions (``cache.length + depth``).

What a backend cannot do it refuses with a :class:`~genrefine.errors.GenrefineError`: llama.cpp
and the adapter refuse ``layers=`` and ``vocab_subset=``; the adapter verifies chains only
(``supports_trees`` False), as does llama.cpp unless asked for trees.

:class:`NativeCapabilities` is what only the native runtime offers, and what the methods marked
``native_only`` in their :class:`~genrefine.methods.base.MethodSpec` read: its weights
(``lm_head``, ``embed_tokens``), reduced output heads, layer-by-layer stepping (CALM) and batched
forwards (the server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..types import ModelOutput


@runtime_checkable
class Cache(Protocol):
    """A model's key/value cache: ``length`` committed slots, rolled back in O(1)."""

    length: int  # slots in use; the next forward appends after them

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` entries."""

    def keep(self, start: int, idx: Tensor) -> None:
        """Of the entries from slot ``start`` on, keep those at offsets ``idx`` ([a] long,
        ascending), moved to slots ``start .. start + a - 1``; drop the rest."""


@runtime_checkable
class Model(Protocol):
    """A causal decoder that verifies drafts: one forward over new tokens at given positions."""

    name: str  # for cache keys and messages
    vocab_size: int
    num_layers: int
    hidden_size: int
    max_context: int  # longest prompt + generation the cache can hold
    supports_trees: bool  # False: drafts are verified as chains only
    bitwise_exact: bool  # every verification row equals one-token decoding bit for bit
    device: torch.device
    dtype: torch.dtype

    def new_cache(self, capacity: int | None = None) -> Cache:
        """A cache for ``capacity`` tokens (default and cap: ``max_context``)."""
        ...

    def forward(
        self,
        tokens: Tensor,  # [n] long: new tokens, appended after cache.length
        cache: Cache,
        positions: Tensor | None = None,  # [n] long; default cache.length + arange(n)
        tree_mask: Tensor | None = None,  # [n, n] bool, i may see j (ancestor-or-self); causal
        logits_rows: Tensor | None = None,  # [m] long rows that need logits; None: all
        hidden_layers: Sequence[int] = (),  # residual stream after these many layers
        layers: Sequence[int] | None = None,  # run only these layers (native only)
        vocab_subset: Tensor | None = None,  # [v] long: project onto these ids (native only)
    ) -> ModelOutput:
        """``logits`` [m, vocab or v] float32 for ``logits_rows`` and ``hidden`` {layer: [n, H]};
        ``hidden_layers=(num_layers,)`` is the final normed hidden state (what heads and EAGLE
        read)."""
        ...


@runtime_checkable
class NativeCapabilities(Protocol):
    """What the native runtime offers beyond :class:`Model` (methods marked ``native_only``)."""

    lm_head: Tensor  # [vocab, hidden] output projection (may share storage with the embedding)

    def embed_tokens(self, tokens: Tensor, scaled: bool = True) -> Tensor:
        """[n] long -> [n, hidden], scaled as the model does (``scaled=False``: the stored
        rows)."""
        ...

    def reduced_head(self, ids: Tensor):
        """The output projection restricted to token ids ``ids`` ([v] long), built once; pass it
        as ``vocab_subset``."""

    def project(self, hidden: Tensor, head=None) -> Tensor:
        """Final norm and output projection of residual states [m, hidden] -> [m, v] float32."""
        ...

    def run_layers(self, x: Tensor, cache: Cache, start: int, layers: Sequence[int]) -> Tensor:
        """Run ``layers`` on the residual stream ``x`` [n, hidden] of the tokens at slots
        ``start ..``, writing their cache slots without moving ``cache.length`` (CALM)."""
        ...

    def write_kv(self, x: Tensor, cache: Cache, start: int, layers: Sequence[int]) -> None:
        """Fill only the key/value slots of ``layers`` from a stand-in hidden state."""

    def forward_batch(self, items: Sequence) -> list:
        """One forward for the new tokens of several sequences (``tokens``, ``cache``,
        ``positions``, ``tree_mask`` each), each on its own cache: every weight is read once for
        all their rows; their logits in order (:mod:`genrefine.models.batched` decides when)."""
        ...


def weights_format(model) -> str:
    """What a model's matmuls run on, for display and cache keys: "bfloat16", "float32", or
    "quantized:Q4_K+Q8_0..." for quantized weights (the native runtime's ``weights_format``)."""
    fmt = getattr(model, "weights_format", None)
    if isinstance(fmt, str):
        return fmt
    dtype = getattr(model, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else "unknown"


def weights_key(model) -> str:
    """:func:`weights_format` for cache keys; float models keep the ``torch.<dtype>`` spelling
    that earlier caches used."""
    if getattr(model, "quantized", False):
        return weights_format(model)
    return str(getattr(model, "dtype", "unknown"))
