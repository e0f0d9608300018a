"""``bpd+ngram``: the heads' lattice rescored by an n-gram model (Kim et al. 2024).

The trained heads' top-``k`` form a lattice; an n-gram model counted from the training corpus
rescores its paths (global p-best rescoring, :mod:`genrefine.methods.parts.lattice`), and the best
``NUM_PATHS`` paths form a tree.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from ..types import Draft
from .base import Context, Method, MethodOptions, MethodSpec
from .parts.heads import HeadsDrafter, heads_method, load_heads
from .parts.lattice import NgramLM, paths_to_draft, rescore_lattice

NUM_PATHS = 4  # best lattice paths merged into the draft tree


class NgramRescoredDrafter(HeadsDrafter):
    """The heads' top-``k`` lattice rescored by an n-gram model (``alpha`` weighs it against the
    heads); the best ``num_paths`` paths merged into a tree."""

    name = "bpd+ngram"

    def __init__(self, model, net, vocab_ids, ngram, alpha=1.0, num_paths=NUM_PATHS, **kw) -> None:
        if ngram is None:
            raise ConfigError("bpd+ngram needs the drafter's n-gram model (ngram.safetensors)")
        super().__init__(model, net, vocab_ids, **kw)
        self.ngram, self.alpha, self.num_paths = ngram, alpha, num_paths

    def _draft(self, ctx: Context, h: Tensor, budget: int) -> tuple[Draft, Tensor, Tensor]:
        ids, logp = self.candidates(h, self.topk)
        best = rescore_lattice(
            ctx.tokens[-8:].tolist(), ids, logp, self.ngram, alpha=self.alpha, num_paths=self.num_paths
        )
        return paths_to_draft([p for p, _ in best]), ids, logp


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, _, ids = load_heads(model, opts, tokenizer)
    ngram = NgramLM.load(stored.path.parent / "ngram.safetensors")
    return heads_method(
        NgramRescoredDrafter,
        model,
        opts,
        net,
        ids,
        budget=net.num_heads * NUM_PATHS,
        topk=int(stored.config["topk"]),
        ngram=ngram,
        num_paths=NUM_PATHS,
    )


SPEC = MethodSpec(
    name="bpd+ngram", lossless=True, build=build, order=10, native_only=True, drafter_kind="heads",
    summary="BPD heads' top-k lattice rescored by an n-gram model, best paths as a tree",
)
