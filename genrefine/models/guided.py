"""Classifier-free guidance (CFG) as a model: :class:`GuidedModel` over a class-conditional base.

An autoregressive image model (the LlamaGen recipe) reads a condition token first (the class,
``class_offset + c``) and then emits image codes (ids ``0 .. n_codes - 1``). It was trained with
the condition dropped to ``null_token`` now and then, so it also knows the unconditional
distribution. Guidance mixes the two next-code logits of every row::

    guided = u + scale * (c - u)         # c: conditional row, u: unconditional row

with ``u`` computed on the same tokens with every class token replaced by ``null_token`` (or, for
a text-conditioned model, on the ``unconditional`` ids the caller's function makes of the prompt:
Janus pads every prompt token but the first and the image-start token).

:class:`GuidedModel` implements the Model protocol of :mod:`genrefine.models.protocol` with the
guided logits as its logits: its vocabulary is the codes only (class and null ids are never
emitted), its cache is a pair of caches (cond, uncond) moved together, and every argument of
``forward`` (positions, tree masks, logits rows) goes to both rows alike. Drafting, trees,
rollback and verification therefore run unchanged on the guided distribution: a lossless method
stays lossless under CFG, with respect to the guided distribution. On the native runtime both
halves run as one batched forward (:meth:`NativeModel.forward_batch`): each weight is read once
for both and the per-op overhead is paid once, which on the embedded image model makes every
method's steps faster (``ar``'s most: its forwards are the smallest).

``scale == 1`` is the conditional model itself: no unconditional forward runs (and a cache made
then holds no unconditional half). Whether a cache has its unconditional half is fixed when it is
made, so set ``scale`` before a generation starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..types import ModelOutput
from .batched import BatchItem, batches_rows, forward_batch
from .protocol import weights_format
from .quant import QuantWeight


class GuidedCache:
    """The caches of the conditional and the unconditional rows, kept in step.

    ``uncond`` is None when the cache was made for ``scale == 1`` (no unconditional rows)."""

    def __init__(self, cond, uncond) -> None:
        self.cond, self.uncond = cond, uncond

    @property
    def length(self) -> int:
        return self.cond.length

    @property
    def capacity(self) -> int:
        return self.cond.capacity

    def reserve(self, n: int) -> int:
        return self.cond.reserve(n)

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` entries of both halves."""
        self.cond.rollback(n)
        if self.uncond is not None:
            self.uncond.rollback(n)

    def keep(self, start: int, idx: Tensor) -> None:
        """:meth:`KVCache.keep` on both halves (a tree's accepted path)."""
        self.cond.keep(start, idx)
        if self.uncond is not None:
            self.uncond.keep(start, idx)

    def reset(self) -> None:
        for c in (self.cond, self.uncond):
            if c is not None:
                c.reset()


class GuidedModel:
    """A class-conditional model whose logits are classifier-free guided (module docstring).

    base: a model of the Model protocol (the native runtime for the image transformer) over the
    vocabulary ``n_codes + n_classes + 1`` (codes, classes, null). n_codes: code ids ``0 ..
    n_codes - 1`` (the logits' columns). class_offset, n_classes: class ``c`` is id
    ``class_offset + c``. null_token: the unconditional id. scale: the guidance scale (settable;
    1.0 means no guidance). latents: [n_codes, d] float, code ``i``'s VQ latent vector
    (``token_latents``, read by the latent-aware methods), or None. unconditional: a function
    from the conditional ids ([n] long) to the unconditional ids of the same length, in place of
    the class -> null replacement (then class_offset, n_classes and null_token are not needed).
    """

    def __init__(
        self,
        base,
        *,
        n_codes: int,
        class_offset: int | None = None,
        n_classes: int | None = None,
        null_token: int | None = None,
        scale: float = 1.0,
        latents: Tensor | None = None,
        unconditional: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not 0 < n_codes <= base.vocab_size:
            raise ConfigError(f"n_codes must be in 1..{base.vocab_size} (the base vocabulary), got {n_codes}")
        if unconditional is None:
            if class_offset is None or n_classes is None or null_token is None:
                raise ConfigError("give class_offset, n_classes and null_token, or an unconditional function")
            for name, tok in (("class_offset", class_offset), ("null_token", null_token)):
                if not 0 <= tok < base.vocab_size:
                    raise ConfigError(f"{name} {tok} is outside the base vocabulary ({base.vocab_size})")
            if n_classes < 1 or class_offset + n_classes > base.vocab_size:
                raise ConfigError(f"classes {class_offset}..{class_offset + n_classes - 1} do not fit the base vocabulary")
        if latents is not None and (latents.dim() != 2 or latents.shape[0] != n_codes):
            raise ConfigError(
                f"latents must be [n_codes, d] = [{n_codes}, d], got {tuple(latents.shape)}"
            )
        self.base = base
        self.n_codes, self.class_offset, self.n_classes = n_codes, class_offset, n_classes
        self.null_token = null_token
        self._unconditional = unconditional
        self.scale = float(scale)
        self.token_latents = latents  # [n_codes, d] or None
        self.name = f"{getattr(base, 'name', 'model')}+cfg"
        self.vocab_size = n_codes
        for attr in ("num_layers", "hidden_size", "max_context", "device", "dtype"):
            setattr(self, attr, getattr(base, attr))
        # what trained drafters (heads, EAGLE) read: the base's embedding and norm, and its
        # output rows cut to the codes, so drafts and their logits are over the codes too
        for attr in ("embed", "embed_tokens", "final_norm", "config"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        self.native_base = getattr(base, "native_base", base)  # what native-only methods check
        self.weights_format = weights_format(self.native_base)  # for reports
        # quantized bases: cost tables are keyed on their weights and kernels (costs._target_key),
        # not shared with the float model of the same name
        self.quantized = bool(getattr(base, "quantized", False))
        head = getattr(base, "lm_head", None)
        if torch.is_tensor(head) or isinstance(head, QuantWeight):
            self.lm_head = head[:n_codes]  # quantized weights: their rows dequantized, float32
        self.supports_trees = bool(getattr(base, "supports_trees", False))
        self.bitwise_exact = bool(getattr(base, "bitwise_exact", False))
        # how _forward_both batches its halves (models.batched.forward_batch): a bitwise-exact
        # base only within the rows its exactness covers (its rows then equal two separate
        # forwards bit for bit); any other native base always, the two halves being one request
        # whose rows differ from separate forwards only in float rounding
        self._batch_mode = "auto" if self.bitwise_exact else "always"

    def wrap_draft(self, base) -> "GuidedModel":
        """``base`` (a draft model over the same vocabulary as this one's base) seen through the
        same view: the codes' logits, the same guidance and unconditional ids (method ``sps``)."""
        if base.vocab_size < self.n_codes:
            raise ConfigError(f"the draft model's vocabulary ({base.vocab_size}) lacks the target's "
                              f"{self.n_codes} codes")
        return GuidedModel(base, n_codes=self.n_codes, class_offset=self.class_offset,
                           n_classes=self.n_classes, null_token=self.null_token, scale=self.scale,
                           unconditional=self._unconditional)

    @property
    def guided(self) -> bool:
        """Whether unconditional rows run (``scale != 1``)."""
        return self.scale != 1.0

    def new_cache(self, capacity: int | None = None) -> GuidedCache:
        """A cond cache and, when :attr:`guided`, an uncond one, each for ``capacity`` tokens."""
        uncond = self.base.new_cache(capacity) if self.guided else None
        return GuidedCache(self.base.new_cache(capacity), uncond)

    def unconditional(self, tokens: Tensor) -> Tensor:
        """``tokens`` ([n] long) with every class id replaced by the null id (or what the
        ``unconditional`` function of the constructor makes of them)."""
        if self._unconditional is not None:
            out = self._unconditional(tokens)
            if out.shape != tokens.shape:
                raise ConfigError("the unconditional ids must have the conditional ids' shape")
            return out
        is_class = (tokens >= self.class_offset) & (tokens < self.class_offset + self.n_classes)
        return torch.where(is_class, torch.full_like(tokens, self.null_token), tokens)

    def forward(
        self,
        tokens: Tensor,
        cache: GuidedCache,
        positions: Tensor | None = None,
        tree_mask: Tensor | None = None,
        logits_rows: Tensor | None = None,
        hidden_layers: Sequence[int] = (),
        layers: Sequence[int] | None = None,
        vocab_subset: Tensor | None = None,
    ) -> ModelOutput:
        """Guided logits [m, n_codes] (or [m, v] for a ``vocab_subset`` of code ids) float32;
        hidden states are the conditional rows'. Both halves of the cache get the ``n`` tokens."""
        if self.guided and cache.uncond is None:
            raise ConfigError(
                "the guidance scale was changed during a generation: set it before generating"
            )
        if (self.guided and cache.uncond is not None and not hidden_layers and layers is None
                and vocab_subset is None and batches_rows(self.base, self._batch_mode)):
            return self._forward_both(tokens, cache, positions, tree_mask, logits_rows)
        kw = dict(positions=positions, tree_mask=tree_mask, logits_rows=logits_rows,
                  layers=layers, vocab_subset=vocab_subset)
        out = self.base.forward(tokens, cache.cond, hidden_layers=hidden_layers, **kw)
        c = out.logits
        if cache.uncond is not None:
            u = self.base.forward(self.unconditional(tokens), cache.uncond, **kw).logits
            if c is not None and self.guided:
                c = self._guide(c, u)
        if c is not None:
            c = c.float()
            if vocab_subset is None:
                c = c[:, : self.n_codes].contiguous()
        return ModelOutput(logits=c, hidden=out.hidden)

    def _guide(self, c: Tensor, u: Tensor) -> Tensor:
        """``u + scale * (c - u)`` in float32 for conditional rows ``c`` and unconditional ``u``."""
        u = u.float()
        return u + self.scale * (c.float() - u)

    def _forward_both(self, tokens: Tensor, cache: GuidedCache, positions: Tensor | None,
                      tree_mask: Tensor | None, logits_rows: Tensor | None) -> ModelOutput:
        """The conditional and unconditional rows in one batched forward of the base (each
        weight read once for both, one pass of the per-op overhead instead of two), guided."""
        items = [BatchItem(tokens, cache.cond, positions, tree_mask),
                 BatchItem(self.unconditional(tokens), cache.uncond, positions, tree_mask)]
        c, u = forward_batch(self.base, items, self._batch_mode)
        if logits_rows is not None:
            if logits_rows.numel() == 0:
                return ModelOutput(logits=None, hidden={})
            rows = logits_rows.to(c.device)
            c, u = c.index_select(0, rows), u.index_select(0, rows)
        return ModelOutput(logits=self._guide(c, u)[:, : self.n_codes].contiguous(), hidden={})
