"""``bpd+ngram``: the heads' lattice rescored by an n-gram model (Kim et al. 2024).

The trained heads' top-``k`` form a lattice; an n-gram model counted from the training corpus
rescores its paths (global p-best rescoring, :mod:`genrefine.methods.parts.lattice`), and the best
``NUM_PATHS`` paths form a tree.
"""

from __future__ import annotations

from .base import Method, MethodOptions, MethodSpec
from .parts.heads import heads_method, load_heads
from .parts.lattice import NgramLM

NUM_PATHS = 4  # best lattice paths merged into the draft tree


def build(model, opts: MethodOptions, tokenizer=None) -> Method:
    stored, net, _, ids = load_heads(model, opts, tokenizer)
    ngram = NgramLM.load(stored.path.parent / "ngram.safetensors")
    return heads_method(
        "bpd+ngram",
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
