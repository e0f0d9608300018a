"""Reduced draft vocabularies: drafting onto the most frequent tokens only (FR-Spec style).

A draft pass through a 262k-row output layer costs most of a small drafter's time; drafting onto
the ``N`` most frequent tokens (:mod:`genrefine.vocab`) keeps almost every accepted token.
:func:`reduced_vocab` is the self-drafting and draft-model default, :func:`trained_vocab` the
trained drafters'. Verification always uses the whole vocabulary.
"""

from __future__ import annotations

from ...errors import ConfigError
from ..base import MethodOptions

# Self-drafting default for large vocabularies: with a 262,144-token vocabulary the full output
# layer is a large share of a forward (the README gives the measured effect,
# benchmarks/bench_draft_vocab.py the command).
DEFAULT_DRAFT_VOCAB = 32768


LARGE_VOCAB = 65536


def reduced_vocab(model, opts: MethodOptions, tokenizer, default: bool = False):
    """[N] ids of the N most frequent tokens for ``--draft-vocab N``, or None (full vocabulary).

    With ``default`` (self-drafting methods) an unset size means :data:`DEFAULT_DRAFT_VOCAB` for
    vocabularies over :data:`LARGE_VOCAB` tokens when the tokenizer is at hand, else all."""
    n = opts.draft_vocab
    if n is None and default and model.vocab_size > LARGE_VOCAB and tokenizer is not None:
        n = DEFAULT_DRAFT_VOCAB
    if n is None or n >= model.vocab_size:
        return None
    if tokenizer is None:
        raise ConfigError(
            "--draft-vocab needs the model's tokenizer: pass tokenizer= to build_method "
            "(genrefine.load() does)"
        )
    from ...vocab import frequent_ids

    return frequent_ids(getattr(model, "name", "model"), tokenizer, n, model.vocab_size)


# Trained drafters project onto the rows they were trained with (32768 by default); at inference
# they draft onto the most frequent of those only: each draft pass multiplies features by these
# rows, and on the embedded model cutting them to 8192 kept the held-back tokens per step of every
# trained method (benchmarks/bench_trained.py --draft-vocab) while the drafting got cheaper.
TRAINED_DRAFT_VOCAB = 8192


def trained_vocab(model, opts: MethodOptions, tokenizer, ids):
    """The stored draft ids ``ids`` restricted to the ``--draft-vocab`` most frequent tokens
    (unset: :data:`TRAINED_DRAFT_VOCAB` when the tokenizer is at hand, else all of them)."""
    n = opts.draft_vocab
    if n is None:
        if tokenizer is None:
            return ids
        n = TRAINED_DRAFT_VOCAB
    if n >= ids.shape[0]:
        return ids
    if tokenizer is None:
        raise ConfigError(
            "--draft-vocab needs the model's tokenizer: pass tokenizer= to build_method "
            "(genrefine.load() does)"
        )
    import torch

    from ...vocab import token_ranking

    ranking = token_ranking(getattr(model, "name", "model"), tokenizer, model.vocab_size)
    order = torch.empty_like(ranking)
    order[ranking] = torch.arange(ranking.shape[0])  # token id -> its rank
    keep = ids[order[ids].argsort()[:n]]
    return keep.sort().values
