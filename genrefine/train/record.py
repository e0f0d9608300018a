"""Teacher-forced passes of the target over a corpus: what drafters learn from.

The corpus is tokenized, packed into windows of ``seq_len`` tokens, and each window goes through
the target once. For every position we keep the token and the target's final hidden state (after
the last norm, in the model's dtype). That is all the drafters here need: the target's
next-token distribution at position ``t`` is its output projection of that state, recomputed
during training over the drafter's vocabulary instead of being stored.

Recordings are cached under ``$GENREFINE_CACHE/train`` keyed by model, corpus and window size,
so that training heads and an EAGLE drafter on the same corpus records it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..diskcache import cache_root, save_tensors
from ..errors import ConfigError
from ..models.protocol import weights_key

FORMAT = "genrefine-record-1"


@dataclass
class Recording:
    """Windows of a teacher-forced pass: ``tokens`` [N, T] long, ``hidden`` [N, T, H]."""

    tokens: Tensor
    hidden: Tensor

    def split(self, held_out: float, seed: int) -> tuple["Recording", "Recording"]:
        """(train, held back): a seeded random split of the windows (at least one held back)."""
        n = self.tokens.shape[0]
        if n < 2:
            raise ConfigError(
                f"the corpus gave {n} window(s) of {self.tokens.shape[1]} tokens: training needs "
                "at least 2; give a larger corpus or a smaller --seq-len"
            )
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        k = max(1, int(round(n * held_out)))
        test, train = perm[:k].sort().values, perm[k:].sort().values
        return (
            Recording(self.tokens[train], self.hidden[train]),
            Recording(self.tokens[test], self.hidden[test]),
        )


def tokenize_corpus(tokenizer, texts: list[str], max_tokens: int) -> Tensor:
    """The texts as one stream of ids (each starts with BOS when the tokenizer has one, once),
    cut at ``max_tokens``. [n] long."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = []
    for text in texts:
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos is not None and (not t or t[0] != bos):
            t = [bos] + t
        ids.extend(t)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _key(model, stream: Tensor, seq_len: int) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{getattr(model, 'name', 'model')}|{weights_key(model)}|{seq_len}|".encode())
    h.update(stream.numpy().tobytes())
    return h.hexdigest()[:16]


def record(
    model,
    tokenizer,
    texts: list[str],
    seq_len: int = 256,
    max_tokens: int = 200_000,
    cache: bool = True,
    progress: bool = True,
    stream: Tensor | None = None,
) -> Recording:
    """Run the target over the corpus (see the module docstring); cached on disk. ``stream``:
    token ids [n] to record instead of the tokenized ``texts`` (a model without text, e.g. speech)."""
    if seq_len < 8:
        raise ConfigError(f"--seq-len must be at least 8 tokens, got {seq_len}")
    if stream is None:
        stream = tokenize_corpus(tokenizer, texts, max_tokens)
    else:
        stream = stream.long()[:max_tokens]
    n = stream.shape[0] // seq_len
    if n < 2:
        raise ConfigError(
            f"the corpus has {stream.shape[0]} tokens: training needs at least {2 * seq_len} "
            f"(2 windows of --seq-len {seq_len})"
        )
    windows = stream[: n * seq_len].view(n, seq_len)
    path = cache_root() / "train" / f"{_key(model, stream, seq_len)}.safetensors"
    if cache and path.exists():
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
            return Recording(data["tokens"].long(), data["hidden"])
        except Exception:  # a partial or corrupt file: record again
            pass
    hidden = torch.empty(n, seq_len, model.hidden_size, dtype=model.dtype)
    L = model.num_layers
    bar = _bar(n, "recording", progress)
    none = torch.zeros(0, dtype=torch.long)
    for i in range(n):
        c = model.new_cache(seq_len)
        out = model.forward(windows[i], c, logits_rows=none, hidden_layers=(L,))
        hidden[i] = out.hidden[L].to("cpu", model.dtype)
        bar.update(1)
    bar.close()
    if cache:
        save_tensors(path, {"tokens": windows.to(torch.int32), "hidden": hidden})
    return Recording(windows, hidden)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="win", disable=not enabled, dynamic_ncols=True)
