"""Methods: named presets of (drafter, verifier, draft-length policy).

``genrefine methods`` prints this registry. A method is lossless when its greedy output equals
plain greedy decoding token for token and its sampled output has exactly the target's
distribution; the tests check every method that claims it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from .engine import MAX_DRAFT_NODES
from .errors import ConfigError, GenrefineError
from .policy import CostModelPolicy, HeuristicLength


@dataclass(frozen=True)
class MethodOptions:
    """Knobs shared by the methods; None means the method's default."""

    draft_len: int | None = None  # largest draft (nodes) per step
    max_ngram: int = 3  # prompt lookup: longest n-gram matched
    jacobi_block: int = 8
    lookahead: tuple[int, int, int] = (6, 4, 3)  # window W, n-gram size N, pool guesses G
    acceptance: str = "exact"  # "exact" (lossless speculative sampling) | "typical" (lossy)
    datastore: str | None = None  # rest: saved datastore path; None = earlier outputs only
    exit_layer: int | None = None  # early-exit-draft: layers the draft runs (None: L - L // 6)
    # self-drafting heads and sps's draft model: the N most frequent tokens (N >= vocabulary
    # size: all); None = the default (early-exit-draft, swift and sps with a native draft model
    # sharing the tokenizer: 32768 for vocabularies over 65536 tokens; calm: all)
    draft_vocab: int | None = None
    # self-drafting and sps: stop a draft after a token whose top draft probability is below this
    # (None: an adaptive length from calibrated draft probabilities and measured costs,
    # policy.DraftStop, for early-exit-draft, swift and sps with the target's tokenizer; 0.4 for
    # sps bridged through text)
    draft_confidence: float | None = None
    calm_threshold: float = 0.9  # calm (lossy): exit when the top probability exceeds this
    # sps: the draft model, a path (loaded like the target, same dtype and device) or a loaded
    # model (genrefine.models.loading.load_model); draft_tokenizer: a loaded model's tokenizer
    # (None: taken to be the target's, which needs equal vocabulary sizes)
    draft_model: object = None
    draft_tokenizer: object = None
    # bpd, medusa, bpd+ngram, bpd+lm, eagle: a trained drafter's folder (`genrefine train`);
    # None: the one shipped for this model, if any
    drafter: str | None = None
    # the same: cut each draft to the nodes that pay on this machine (policy.TreeCut); False
    # verifies whole drafts (the block-efficiency comparison of the papers)
    tree_cut: bool = True

    def __post_init__(self) -> None:
        if self.draft_len is not None and not 1 <= self.draft_len <= MAX_DRAFT_NODES:
            raise ConfigError(
                f"--draft-len must be between 1 and {MAX_DRAFT_NODES}, got {self.draft_len}"
            )
        if self.acceptance not in ("exact", "typical"):
            raise ConfigError("acceptance must be 'exact' (lossless) or 'typical' (lossy)")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ConfigError(f"--exit-layer must be >= 1, got {self.exit_layer}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ConfigError(f"--draft-vocab must be >= 1 token (or unset: all), got {self.draft_vocab}")
        if self.draft_confidence is not None and not 0.0 <= self.draft_confidence <= 1.0:
            raise ConfigError(f"the draft confidence must be in [0, 1], got {self.draft_confidence}")
        if isinstance(self.draft_model, (str, os.PathLike)) and not str(self.draft_model):
            raise ConfigError("--draft-model is empty: give a model directory or .gguf file")
        if not self.calm_threshold > 0.0:
            raise ConfigError(
                f"--calm-threshold must be > 0 (1.0 never exits early), got {self.calm_threshold}"
            )


# ---------------------------------------------------------------------------- policies
class FixedPolicy:
    """Always the one drafter with the same budget."""

    def __init__(self, drafter, budget: int) -> None:
        self.drafter, self.budget = drafter, budget

    def reset(self, params=None) -> None:
        pass

    def choose(self, drafters):
        return self.drafter, self.budget

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        pass


class HeuristicPolicy:
    """Grow the draft after a full acceptance, shrink it after a miss (transformers' schedule)."""

    def __init__(self, drafter, initial: int, max_len: int) -> None:
        self.drafter = drafter
        self.initial, self.max_len = initial, max_len
        self.length = HeuristicLength(initial=initial, min_len=1, max_len=max_len)

    def reset(self, params=None) -> None:
        self.length.reset()

    def choose(self, drafters):
        return self.drafter, self.length.next_budget()

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        depth = tree_info.num_levels if tree_info is not None else drafted
        self.length.update(depth, accepted)


class CostPolicy:
    """Pick drafter and draft size maximising expected tokens per second (see policy.py)."""

    def __init__(self, cost_table, max_len: int) -> None:
        self.cost_table, self.max_len = cost_table, max_len
        self.policy = CostModelPolicy(cost_table, max_len=max_len)

    def reset(self, params=None) -> None:
        """Greedy generations share what earlier ones learnt (the output cannot depend on it).
        Sampled ones start afresh and ignore wall-clock drafting costs, so that a seed gives the
        same tokens every time: the drafter and draft size choices steer how the random stream
        is consumed."""
        self._timed = params is None or params.greedy
        if not self._timed:
            self.policy = CostModelPolicy(self.cost_table, max_len=self.max_len)

    def choose(self, drafters):
        by_name = {d.name: d for d in drafters}
        name, budget = self.policy.choose(list(by_name))
        return (by_name[name], budget) if name is not None else (None, 0)

    def update(self, drafter, drafted, accepted, draft_seconds, tree_info) -> None:
        if drafter is None or drafted == 0:
            return
        depth = tree_info.num_levels if tree_info is not None else drafted
        self.policy.update(drafter.name, depth, accepted)
        if getattr(self, "_timed", True):
            self.policy.update_draft_cost(drafter.name, draft_seconds, drafted)


@dataclass
class Method:
    """A ready-to-run preset: drafters, policy, acceptance rule."""

    name: str
    drafters: list = field(default_factory=list)
    policy: object = None
    max_budget: int = 0
    acceptance: str = "exact"
    # A decoding loop of its own instead of draft-and-verify (calm): called as
    # decode(model, prompt [L] long, max_new_tokens, params, eos_ids, stats), it yields lists of
    # new token ids and returns the finish reason ("stop" | "length").
    decode: Callable | None = None


@dataclass(frozen=True)
class MethodInfo:
    name: str
    lossless: bool
    summary: str
    build: Callable  # (model, options) -> Method; (model, options, tokenizer) if takes_tokenizer
    takes_tokenizer: bool = False  # the builder needs the tokenizer (reduced draft vocabulary)
    native_only: bool = False  # runs layer subsets / reduced heads: not on the transformers adapter
    needs_draft_model: bool = False  # MethodOptions.draft_model must be given (sps)
    # a trained drafter of this kind is needed: MethodOptions.drafter, or one shipped for the model
    drafter_kind: str | None = None

    @property
    def native_reason(self) -> str:
        """Why a ``native_only`` method cannot run on a backend that runs the whole model only."""
        if self.drafter_kind is not None:
            return "its trained drafter reads the target's own weights and hidden states"
        return "it runs a subset of the target's layers"


def _pld(model, opts: MethodOptions, **kw):
    from .drafters.prompt_lookup import PromptLookupDrafter

    return PromptLookupDrafter(max_ngram=opts.max_ngram, tree=model.supports_trees, **kw)


def _build_ar(model, opts: MethodOptions) -> Method:
    return Method("ar")


def _chain_cut(model, opts: MethodOptions):
    """A :class:`~genrefine.policy.ChainCut` for copying drafters on a backend that verifies
    chains only (llama.cpp), where each verified row costs a large share of a step; None with
    ``tree_cut=False`` or on backends that verify trees (their drafts are trees, not cut)."""
    if not opts.tree_cut or model.supports_trees:
        return None
    from .policy import ChainCut

    return ChainCut(_cost_table(model))


def _build_pld(model, opts: MethodOptions) -> Method:
    budget = opts.draft_len or 10
    d = _pld(model, opts, cut=_chain_cut(model, opts))
    return Method("pld", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def _build_jacobi(model, opts: MethodOptions) -> Method:
    from .drafters.jacobi import JacobiDrafter

    block = opts.draft_len or opts.jacobi_block
    d = JacobiDrafter(block=block)
    return Method("jacobi", [d], FixedPolicy(d, block), block, opts.acceptance)


def _build_lookahead(model, opts: MethodOptions) -> Method:
    from .drafters.lookahead import LookaheadDrafter

    w, n, g = opts.lookahead
    if not model.supports_trees:
        g = 0  # chains only: the lookahead branch alone (Jacobi with an n-gram pool unused)
    d = LookaheadDrafter(window=w, ngram=n, guesses=g)
    budget = min(d.max_nodes, opts.draft_len or d.max_nodes)
    return Method("lookahead", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def _build_rest(model, opts: MethodOptions) -> Method:
    from .drafters.retrieval import Datastore, RetrievalDrafter

    store = None
    if opts.datastore is not None:
        store = Datastore.load(opts.datastore, getattr(model, "name", None), model.vocab_size)
    budget = opts.draft_len or 16
    d = RetrievalDrafter(store, grow=True, tree=model.supports_trees, cut=_chain_cut(model, opts))
    return Method("rest", [d], FixedPolicy(d, budget), budget, opts.acceptance)


# Self-drafting default for large vocabularies: on the embedded model (262,144 tokens) the full
# output layer is about half a forward, and drafting onto the 32,768 most frequent tokens took
# swift from 0.82x to 1.12x of ar (benchmarks/bench_draft_vocab.py, bf16; README).
DEFAULT_DRAFT_VOCAB = 32768
LARGE_VOCAB = 65536


def _draft_vocab(model, opts: MethodOptions, tokenizer, default: bool = False):
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
    from .vocab import frequent_ids

    return frequent_ids(getattr(model, "name", "model"), tokenizer, n, model.vocab_size)


def _self_draft_kw(opts: MethodOptions) -> dict:
    return {} if opts.draft_confidence is None else {"confidence": opts.draft_confidence}


def _build_early_exit(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .drafters.layer_skip import EarlyExitDrafter, default_exit_layer

    exit_layer = opts.exit_layer or default_exit_layer(model.num_layers)
    ids = _draft_vocab(model, opts, tokenizer, default=True)
    d = EarlyExitDrafter(model, exit_layer, ids, **_self_draft_kw(opts))
    if opts.draft_confidence is None:
        d.with_adaptive_stop(_cost_table(model))
    budget = opts.draft_len or 8
    return Method("early-exit-draft", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def _build_swift(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .drafters.layer_skip import SkipLayerDrafter

    ids = _draft_vocab(model, opts, tokenizer, default=True)
    d = SkipLayerDrafter(model, vocab_ids=ids, **_self_draft_kw(opts))
    if opts.draft_confidence is None:
        d.with_adaptive_stop(_cost_table(model))
    budget = opts.draft_len or 8
    return Method("swift", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def _build_calm(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .early_exit import calm_generate

    ids = _draft_vocab(model, opts, tokenizer)
    threshold = opts.calm_threshold

    def decode(model, prompt, max_new_tokens, params, eos_ids, stats):
        return calm_generate(
            model, prompt, max_new_tokens, threshold, eos_ids, stats, params=params, vocab_ids=ids
        )

    return Method("calm", decode=decode)


def _build_sps(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .drafters.draft_model import (
        DEFAULT_CONFIDENCE,
        DraftModelDrafter,
        make_draft_model_drafter,
        same_tokenizer,
    )

    draft, draft_tok = load_draft_model(model, opts)
    conf = DEFAULT_CONFIDENCE if opts.draft_confidence is None else opts.draft_confidence
    ids = None  # a reduced head, as for self-drafting: a small draft model's head is most of it
    if hasattr(draft, "reduced_head") and same_tokenizer(model, draft, tokenizer, draft_tok):
        ids = _draft_vocab(model, opts, tokenizer, default=True)
    d = make_draft_model_drafter(model, draft, tokenizer, draft_tok, confidence=conf, vocab_ids=ids)
    if opts.draft_confidence is None and isinstance(d, DraftModelDrafter):
        d.with_adaptive_stop(_cost_table(model))  # draft lengths from costs, not a threshold
    budget = opts.draft_len or 8
    return Method("sps", [d], FixedPolicy(d, budget), budget, opts.acceptance)


def load_draft_model(model, opts: MethodOptions):
    """``(draft model, its tokenizer or None)`` from ``opts.draft_model``: a path is loaded with
    the target's dtype and device; a loaded model comes with ``opts.draft_tokenizer``."""
    spec = opts.draft_model
    if spec is None:
        raise ConfigError(
            "method sps needs a draft model: pass --draft-model PATH (a smaller model, best with "
            "the target's tokenizer; `genrefine draft-model shrink` makes one from the target)"
        )
    if isinstance(spec, (str, os.PathLike)):
        from .models.loading import load_model

        backend = getattr(model, "backend", "native")  # llama.cpp targets draft on llama.cpp too
        return load_model(spec, dtype=model.dtype, device=model.device, backend=backend)
    return spec, opts.draft_tokenizer


# Trained drafters project onto the rows they were trained with (32768 by default); at inference
# they draft onto the most frequent of those only: each draft pass multiplies features by these
# rows, and on the embedded model cutting them to 8192 kept the held-back tokens per step of every
# trained method (benchmarks/bench_trained.py --draft-vocab) while the drafting got cheaper.
TRAINED_DRAFT_VOCAB = 8192


def _trained_vocab(model, opts: MethodOptions, tokenizer, ids):
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

    from .vocab import token_ranking

    ranking = token_ranking(getattr(model, "name", "model"), tokenizer, model.vocab_size)
    order = torch.empty_like(ranking)
    order[ranking] = torch.arange(ranking.shape[0])  # token id -> its rank
    keep = ids[order[ids].argsort()[:n]]
    return keep.sort().values


def _load_heads(model, opts: MethodOptions):
    """(stored drafter, heads, rescoring LM, vocabulary ids) of a trained heads drafter."""
    from .drafters.heads import HeadsNet, WindowLM
    from .drafters.store import find_drafter

    d = find_drafter(model, "heads", opts.drafter)
    t, cfg = d.tensors, d.config
    net = HeadsNet(model.hidden_size, int(cfg["num_heads"]))
    net.load_state_dict({"weight": t["heads.weight"].float(), "bias": t["heads.bias"].float()})
    lm = WindowLM(model.hidden_size, int(cfg["lm_window"]))
    lm.load_state_dict({k[3:]: v.float() for k, v in t.items() if k.startswith("lm.")})
    return d, net, lm, t["vocab_ids"].long()


def _build_heads(mode: str):
    def build(model, opts: MethodOptions, tokenizer=None) -> Method:
        from .drafters.heads import HeadsDrafter

        d, net, lm, ids = _load_heads(model, opts)
        ids = _trained_vocab(model, opts, tokenizer, ids)
        cfg = d.config
        K, k = int(cfg["num_heads"]), int(cfg["topk"])
        # drafts are cut to what pays on this machine (TreeCut)
        kw: dict = {"topk": k, "cost": _cost_table(model) if opts.tree_cut else None}
        if mode == "medusa":
            kw["tree"] = [tuple(p) for p in cfg["tree"]]
            budget = len(kw["tree"])
        elif mode == "bpd+ngram":
            from .drafters.lattice import NgramLM

            kw["ngram"] = NgramLM.load(d.path.parent / "ngram.safetensors")
            budget = K * kw.get("num_paths", 4)
        else:  # bpd, bpd+lm: chains
            budget = K
        if mode == "bpd+lm":
            kw["lm"] = lm
        budget = min(budget, opts.draft_len or budget)
        drafter = HeadsDrafter(model, net, ids, mode=mode, **kw)
        return Method(mode, [drafter], FixedPolicy(drafter, budget), budget, opts.acceptance)

    return build


def _build_eagle(model, opts: MethodOptions, tokenizer=None) -> Method:
    from .drafters.eagle import EagleDrafter, EagleNet
    from .drafters.store import find_drafter

    d = find_drafter(model, "eagle", opts.drafter)
    cfg = dict(d.config)
    topk = int(cfg.pop("topk", 4))
    net = EagleNet(**cfg)
    net.load_state_dict({k[4:]: v.float() for k, v in d.tensors.items() if k.startswith("net.")})
    budget = opts.draft_len or 16
    ids = _trained_vocab(model, opts, tokenizer, d.tensors["vocab_ids"].long())
    # the tree is cut to the size that maximises expected tokens per second on this machine
    cost = _cost_table(model) if opts.tree_cut else None
    drafter = EagleDrafter(model, net, ids, topk=topk, cost=cost)
    return Method("eagle", [drafter], FixedPolicy(drafter, budget), budget, opts.acceptance)


def _cost_table(model):
    """The target's forward times on this machine (measured on first use, cached on disk)."""
    from .policy import load_or_measure, machine_key

    key = f"{getattr(model, 'name', 'model')}|{model.dtype}|{machine_key(model.device)}"
    return load_or_measure(model, key)


def _build_auto(model, opts: MethodOptions) -> Method:
    from .drafters.jacobi import JacobiDrafter

    max_len = opts.draft_len or 16
    table = _cost_table(model)
    drafters = [_pld(model, opts), JacobiDrafter(block=max_len)]
    return Method("auto", drafters, CostPolicy(table, max_len), max_len, opts.acceptance)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("ar", True, "plain autoregressive decoding, the baseline", _build_ar),
        MethodInfo(
            "pld", True, "prompt lookup: continue the last n-gram's earlier matches (tree)", _build_pld
        ),
        MethodInfo(
            "jacobi", True, "Jacobi fixed-point iteration over a block of guesses", _build_jacobi
        ),
        MethodInfo(
            "lookahead",
            True,
            "lookahead decoding: a Jacobi branch feeds an n-gram pool verified in the same forward",
            _build_lookahead,
        ),
        MethodInfo(
            "rest",
            True,
            "retrieval: continuations of the longest context suffix found in a datastore (REST) "
            "or in earlier outputs (suffix decoding)",
            _build_rest,
        ),
        MethodInfo(
            "sps",
            True,
            "speculative sampling with an independent draft model (--draft-model; a different "
            "tokenizer is bridged through text)",
            _build_sps,
            takes_tokenizer=True,
            needs_draft_model=True,
        ),
        MethodInfo(
            "auto",
            True,
            "per step, the drafter and draft size with the best expected tokens/s (cost model)",
            _build_auto,
        ),
        MethodInfo(
            "early-exit-draft",
            True,
            "self-speculation: the first layers (+ final norm, head) draft, all layers verify",
            _build_early_exit,
            takes_tokenizer=True,
            native_only=True,
        ),
        MethodInfo(
            "swift",
            True,
            "self-speculation skipping layers; the skip set is tuned while generating (SWIFT)",
            _build_swift,
            takes_tokenizer=True,
            native_only=True,
        ),
        MethodInfo(
            "bpd",
            True,
            "blockwise parallel decoding: trained heads' argmax chain (--drafter or shipped)",
            _build_heads("bpd"),
            takes_tokenizer=True,
            native_only=True,
            drafter_kind="heads",
        ),
        MethodInfo(
            "bpd+ngram",
            True,
            "BPD heads' top-k lattice rescored by an n-gram model, best paths as a tree",
            _build_heads("bpd+ngram"),
            takes_tokenizer=True,
            native_only=True,
            drafter_kind="heads",
        ),
        MethodInfo(
            "bpd+lm",
            True,
            "BPD heads' top-k rescored position by position by a small neural LM (a chain)",
            _build_heads("bpd+lm"),
            takes_tokenizer=True,
            native_only=True,
            drafter_kind="heads",
        ),
        MethodInfo(
            "medusa",
            True,
            "Medusa: trained heads' top-k in a static tree chosen from their accuracies",
            _build_heads("medusa"),
            takes_tokenizer=True,
            native_only=True,
            drafter_kind="heads",
        ),
        MethodInfo(
            "eagle",
            True,
            "EAGLE-2: a one-layer feature drafter grows a dynamic tree by draft confidence",
            _build_eagle,
            takes_tokenizer=True,
            native_only=True,
            drafter_kind="eagle",
        ),
        MethodInfo(
            "calm",
            False,
            "LOSSY early exit per token when the top probability passes --calm-threshold (CALM)",
            _build_calm,
            takes_tokenizer=True,
            native_only=True,
        ),
    ]
}


def method_names() -> list[str]:
    return list(METHODS)


def build_method(
    name: str, model, options: MethodOptions | None = None, tokenizer=None
) -> Method:
    """Instantiate a method for a model; unknown names raise with the list of valid ones.

    ``tokenizer`` is needed for a reduced draft vocabulary (``MethodOptions.draft_vocab``) and
    by ``sps`` (to tell whether the draft model shares it, and to bridge the two if not).
    """
    opts = options or MethodOptions()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    info = METHODS[name]
    if info.native_only:
        from .models.runtime import NativeModel

        if not isinstance(model, NativeModel):
            raise GenrefineError(f"method {name} needs the native runtime; {_where(model)}")
    m = info.build(model, opts, tokenizer) if info.takes_tokenizer else info.build(model, opts)
    if opts.acceptance == "typical":
        m.name += "+typical"
    return m


def _where(model) -> str:
    """Why a model is not on the native runtime, for one-line refusals."""
    if getattr(model, "backend", None) == "llama.cpp":
        return (
            "this model runs on the llama.cpp backend, which gives no intermediate layers "
            "(use --backend native)"
        )
    return "this architecture runs through the transformers adapter"


def is_lossless(name: str, options: MethodOptions | None = None) -> bool:
    opts = options or MethodOptions()
    return METHODS[name].lossless and opts.acceptance == "exact"
