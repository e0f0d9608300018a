"""A reduced draft vocabulary: the ``n`` most frequent tokens (FR-Spec).

A drafter that runs the target's own layers still pays for the output projection, which for a
large vocabulary costs more than many layers (Gemma 3 270M: 262144 x 640 head weights against
about 100M in all 18 layers). Projecting drafts onto the most frequent tokens only cuts that cost;
a draft token outside the subset simply cannot be proposed. Verification always uses the full
vocabulary, so the output does not change.

Frequencies come from a corpus that exists on every machine with Python and has nothing to do
with any benchmark: the string constants (docstrings, the reference manual's topics in
``pydoc_data``) and the source of a fixed list of standard library modules, read in a fixed order.
Tokens the corpus never produces rank by ascending id, since BPE/SentencePiece vocabularies
give lower ids to earlier (more frequent) merges; never-seen added tokens (reserved, unused) come
last. Special tokens (EOS and the like) and the chat template's turn markers are always in.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .diskcache import cache_root, save_tensors
from .errors import ConfigError

# Standard library files of the default corpus, relative to the stdlib directory. Changing the
# list changes the ranking: bump CORPUS_VERSION so that cached rankings are recomputed.
CORPUS_FILES = (
    "pydoc_data/topics.py",  # the language reference as English prose
    "argparse.py",
    "textwrap.py",
    "difflib.py",
    "statistics.py",
    "calendar.py",
    "fractions.py",
    "string.py",
    "json/__init__.py",
    "email/message.py",
    "collections/__init__.py",
)
CORPUS_VERSION = 1
_SOURCE_CHUNK = 20_000  # characters per text handed to the tokenizer


def default_corpus() -> list[str]:
    """The texts of the default corpus: for each file of :data:`CORPUS_FILES` that exists, its
    string constants (prose), then its source (code), in pieces of at most 20k characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for rel in CORPUS_FILES:
        path = root / rel
        try:
            source = path.read_text(encoding="utf-8")
        except OSError:
            continue
        try:
            tree = ast.parse(source)
            strings = [
                node.value
                for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip()
            ]
        except SyntaxError:
            strings = []
        prose = "\n\n".join(strings)
        # pydoc_data's source is its prose again with escaped newlines; keep only the prose there
        parts = [prose] if rel.startswith("pydoc_data/") else [prose, source]
        for part in parts:
            texts.extend(part[i : i + _SOURCE_CHUNK] for i in range(0, len(part), _SOURCE_CHUNK))
    if not texts:
        raise ConfigError(
            f"no corpus for the draft vocabulary: none of {', '.join(CORPUS_FILES)} "
            f"could be read under {root}; pass texts= explicitly"
        )
    return texts


def token_frequencies(
    tokenizer, texts: Iterable[str] | None = None, vocab_size: int | None = None
) -> Tensor:
    """How often each token id occurs when ``texts`` (default: :func:`default_corpus`) are
    tokenized without special tokens. Returns [vocab_size] long (default ``len(tokenizer)``);
    ids at or past ``vocab_size`` are dropped."""
    texts = default_corpus() if texts is None else list(texts)
    vocab = int(vocab_size if vocab_size is not None else len(tokenizer))
    counts = torch.zeros(vocab, dtype=torch.long)
    if not texts:
        return counts
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for ids in encoded:
        t = torch.as_tensor(ids, dtype=torch.long)
        t = t[(t >= 0) & (t < vocab)]
        counts += torch.bincount(t, minlength=vocab)
    return counts


def special_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids that a draft vocabulary always keeps, below ``vocab_size``: the tokenizer's named
    special tokens (EOS, BOS, pad, unk) and every token its chat template produces for a tiny
    conversation (turn markers such as Gemma's ``<end_of_turn>``, which end chat replies)."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.update([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            ids.update(int(i) for i in _flat_ids(tokenizer.apply_chat_template(chat, tokenize=True)))
        except Exception:  # a template that wants other roles or fields: keep the named ones
            pass
    return sorted(i for i in ids if 0 <= i < vocab_size)


def _flat_ids(encoded) -> list[int]:
    if hasattr(encoded, "keys") and "input_ids" in encoded:  # a BatchEncoding
        encoded = encoded["input_ids"]
    if isinstance(encoded, Tensor):
        return encoded.reshape(-1).tolist()
    flat: list[int] = []
    for x in encoded:
        flat.extend(_flat_ids(x) if isinstance(x, (list, tuple)) else [int(x)])
    return flat


def rank_tokens(counts: Tensor, always: Sequence[int] = (), last: Sequence[int] = ()) -> Tensor:
    """Token ids by priority: ``always`` first (in order), then by descending count, ties (and
    never-seen tokens) by ascending id, except that never-seen ids in ``last`` (reserved and
    unused added tokens) come at the very end. counts: [vocab] long -> [vocab] long, a permutation.
    """
    vocab = int(counts.shape[0])
    key = -counts  # a stable sort on -count keeps ascending ids among equal counts
    if last:
        late = torch.tensor(sorted(set(int(i) for i in last if 0 <= int(i) < vocab)), dtype=torch.long)
        key = key.clone()
        key[late[counts[late] == 0]] = 1
    order = torch.sort(key, stable=True).indices
    if not always:
        return order
    first = torch.tensor(list(dict.fromkeys(int(i) for i in always)), dtype=torch.long)
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[first] = False
    return torch.cat([first, order[rest[order]]])


def _added_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens added on top of the base vocabulary (special, reserved, unused)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [int(i) for i in added]


def _cache_path(key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:60].strip("_") or "vocab"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "vocab" / f"{slug}-{digest}.safetensors"


def _ranking_key(model_name: str, tokenizer, vocab: int) -> str:
    tok_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return (
        f"{model_name}|{type(tokenizer).__name__}|{tok_name}|tokens={len(tokenizer)}|vocab={vocab}"
        f"|corpus=v{CORPUS_VERSION}-py{py}"
    )


def token_ranking(model_name: str, tokenizer, vocab_size: int | None = None) -> Tensor:
    """Every token id below ``vocab_size`` by draft priority (specials first, then frequency),
    computed once and cached under ``$GENREFINE_CACHE/vocab/`` as safetensors, keyed by the
    model and tokenizer names, the tokenizer's size, ``vocab_size`` and the corpus. [vocab] long.
    """
    from safetensors.torch import load_file

    vocab = int(vocab_size if vocab_size is not None else len(tokenizer))
    key = _ranking_key(model_name, tokenizer, vocab)
    path = _cache_path(key)
    try:
        ranking = load_file(str(path))["ranking"]
        if ranking.shape == (vocab,):
            return ranking
    except Exception:  # missing or unreadable: recompute
        pass
    counts = token_frequencies(tokenizer, None, vocab)
    always = special_token_ids(tokenizer, vocab)
    ranking = rank_tokens(counts, always, _added_token_ids(tokenizer)).contiguous()
    save_tensors(path, {"ranking": ranking, "counts": counts}, metadata={"key": key})
    return ranking


def frequent_ids(model_name: str, tokenizer, n: int, vocab_size: int | None = None) -> Tensor:
    """The ``n`` highest-priority token ids (special tokens always included), ascending.

    [min(n, vocab_size)] long. ``vocab_size`` is the model's output size (default
    ``len(tokenizer)``); the ranking is cached on disk (see :func:`token_ranking`).
    """
    if n < 1:
        raise ConfigError(f"the draft vocabulary needs at least 1 token, got {n}")
    ranking = token_ranking(model_name, tokenizer, vocab_size)
    return torch.sort(ranking[:n]).values
