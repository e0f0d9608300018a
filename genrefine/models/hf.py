"""The generic adapter: any transformers ``AutoModelForCausalLM`` behind the model interface.

It serves architectures the native runtime does not implement. It verifies chain drafts only
(``supports_trees = False``): a tree mask would need the model's own attention code to accept
custom masks, which transformers does not promise for every architecture.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor

from ..errors import GenrefineError
from ..types import ModelOutput


def check_chain_forward(tree_mask, layers, vocab_subset, who: str = "the transformers adapter") -> None:
    """Refuse what a model run through transformers cannot do: tree drafts, layer subsets and
    reduced vocabularies (all need the native runtime)."""
    if tree_mask is not None:
        raise GenrefineError(f"{who} verifies chain drafts only")
    if layers is not None or vocab_subset is not None:
        raise GenrefineError(
            f"layer subsets and reduced vocabularies need the native runtime; {who} runs "
            "through transformers"
        )


class HFCache:
    """transformers' DynamicCache with the rollback interface of :class:`KVCache`."""

    def __init__(self, capacity: int) -> None:
        from transformers import DynamicCache

        self.inner = DynamicCache()
        self.capacity = capacity
        self.length = 0

    def reserve(self, n: int) -> int:
        if self.length + n > self.capacity:
            raise ValueError(f"cache full: {self.length} + {n} exceed capacity {self.capacity}")
        return self.length

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} entries of a cache holding {self.length}")
        if n:
            self.inner.crop(-n)
            self.length -= n

    def keep(self, start: int, idx: Tensor) -> None:
        a = int(idx.numel())
        if a and int(idx[-1]) != a - 1:
            raise GenrefineError("the transformers adapter verifies chain drafts only")
        self.rollback(self.length - (start + a))

    def reset(self) -> None:
        self.rollback(self.length)


class HFModel:
    """Wraps a loaded transformers causal LM."""

    supports_trees = False

    def __init__(self, hf_model, name: str = "model") -> None:
        self.hf = hf_model.eval()
        cfg = hf_model.config
        self.name = name
        self.vocab_size = int(hf_model.get_output_embeddings().weight.shape[0])
        self.num_layers = int(getattr(cfg, "num_hidden_layers", 0))
        self.hidden_size = int(getattr(cfg, "hidden_size", 0))
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048))
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name
        # warns, and goes in 5.40); pass whichever this version's forward declares.
        params = inspect.signature(type(hf_model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, capacity: int | None = None) -> HFCache:
        return HFCache(min(capacity or self.max_context, self.max_context))

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        cache: HFCache,
        positions: Tensor | None = None,
        tree_mask: Tensor | None = None,
        logits_rows: Tensor | None = None,
        hidden_layers: Sequence[int] = (),
        layers: Sequence[int] | None = None,
        vocab_subset=None,
    ) -> ModelOutput:
        """Same contract as :meth:`NativeModel.forward`, chains only."""
        check_chain_forward(tree_mask, layers, vocab_subset)
        n = int(tokens.shape[0])
        start = cache.reserve(n)
        if positions is None:
            positions = torch.arange(start, start + n)
        out = self.hf(
            input_ids=tokens.to(self.device)[None],
            position_ids=positions.to(self.device)[None],
            use_cache=True,
            **{self._cache_kw: cache.inner},
            output_hidden_states=bool(hidden_layers),
        )
        cache.length = start + n
        logits = out.logits[0]
        if logits_rows is not None:
            logits = logits.index_select(0, logits_rows.to(logits.device))
        hidden = {}
        if hidden_layers:
            for layer in hidden_layers:
                hidden[layer] = out.hidden_states[layer][0]
        return ModelOutput(logits=logits.float() if logits.shape[0] else None, hidden=hidden)
