"""``genrefine train draft``: a small independent draft model distilled from the target
(DistillSpec, Zhou et al. 2024), for method ``sps``.

The draft starts as the target's first ``K`` layers (``genrefine draft-model shrink``: its
embedding, final norm and tied head included) and its layers are trained to match the target's
next-token distribution (its top-k, over the drafter's reduced vocabulary, see
:func:`genrefine.train.losses.topk_ce`) on the recorded windows; the embedding and head stay frozen.
The output folder is a Hugging Face model directory that ``--draft-model`` loads.

Only the layers are trained, against the reduced vocabulary of ``--draft-vocab`` (default 32768)
most frequent tokens. ``sps`` drafts onto the same most frequent tokens by default for large
vocabularies (:class:`genrefine.methods.sps.DraftModelDrafter`'s reduced head), so a
draft token reads the draft's few layers and an eighth of the head: on a model whose head is most
of its weights (Gemma 3 270M) the full head would cost more than the layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .record import Recording

INIT = "init"  # the shrunk (untrained) copy, kept under the output folder


def shrunk_init(source, layers: int, out: Path) -> Path:
    """The first ``layers`` layers of ``source`` under ``out/init`` (made once, then reused)."""
    from ..models.shrink import shrink_model

    init = out / INIT
    if not (init / "model.safetensors").exists():
        shrink_model(source, layers, init, dtype="float32")
    return init


def load_trainable(init: Path):
    """The draft as a transformers model in float32, embedding (and tied head) frozen."""
    from ..models.loading import _load_hf, resolve_source

    hf = _load_hf(resolve_source(str(init)), torch.float32)
    hf.train()
    for p in hf.get_input_embeddings().parameters():
        p.requires_grad_(False)
    head = hf.get_output_embeddings()
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(False)
    return hf


def draft_loss(target, rows: Tensor, ids: Tensor, rec: Recording, hf):
    """``loss_fn`` for :func:`genrefine.train.loop.train`: the draft's top-k cross-entropy
    against the target's distribution at every position of the windows."""
    from ..methods.parts.heads import output_logits
    from .losses import target_topk, topk_ce

    head = hf.get_output_embeddings() or hf.get_input_embeddings()
    draft_rows = head.weight.detach().index_select(0, ids)  # [v, H] float32

    def loss_fn(idx: Tensor, step: int):
        tok, hid = rec.tokens[idx], rec.hidden[idx].to(target.device)
        b, T, H = hid.shape
        with torch.no_grad():
            p, ix = target_topk(output_logits(target, hid.reshape(-1, H), rows))
        h = hf.model(input_ids=tok).last_hidden_state.reshape(-1, H)  # after the final norm
        logits = output_logits(target, h, draft_rows)
        loss = topk_ce(logits, p, ix)
        return loss, {"acc1": float((logits.detach().argmax(-1) == ix[:, 0]).float().mean())}

    return loss_fn


def save_draft(hf, init: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the trained draft as a model directory (``out``): init's config and tokenizer, the
    trained weights (the tied head left out, as shrink writes them)."""
    import shutil

    from ..diskcache import save_tensors

    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    sd = {
        k: v.detach().to(dtype).contiguous()
        for k, v in hf.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    for f in init.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy2(f, out / f.name)
    save_tensors(out / "model.safetensors", sd, metadata={"format": "pt"})
    return out
