"""``genrefine train heads|eagle``: record, train, save, measure.

One run: the corpus (``--corpus DIR`` or the default, :mod:`genrefine.train.corpus`) is
recorded through the target (:mod:`genrefine.train.record`), split into training and held-back
windows, the drafter is trained (:mod:`genrefine.train.loop`, checkpoints in ``--out``), saved as
``--out/drafter.safetensors`` and measured: tokens per step of its greedy method on prompts cut
from held-back windows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..methods.parts.heads import HeadsNet, WindowLM, output_logits, static_tree
from .loop import TrainConfig, train
from .losses import target_topk, topk_ce
from .record import Recording

HELD_OUT = 0.05
NGRAM_MIN_COUNT = 2  # the rescoring n-gram keeps m-grams (m >= 2) seen at least this often


@dataclass(frozen=True)
class DrafterSpec:
    """What to train besides the loop's settings."""

    kind: str = "heads"  # "heads" | "eagle" | "draft"
    num_heads: int = 4  # heads: K
    topk: int = 4  # heads: candidates per head in trees and lattices; eagle: children per node
    tree_nodes: int = 16  # heads: nodes of Medusa's static tree
    lm_window: int = 4  # heads: the rescoring LM's window
    ngram_order: int = 3  # heads: the rescoring n-gram's order
    draft_vocab: int = 32768  # tokens the drafter projects onto (all when >= vocabulary)
    unroll: int = 2  # eagle: passes per step, later ones fed the drafter's own features
    p_weight: float = 0.5  # eagle: weight of the distribution loss beside feature regression
    eagle_style: str = "genrefine"  # eagle: "genrefine" or "engine" (vLLM/SGLang's EAGLE-1 layer)
    layers: int = 2  # draft: the target's first layers the draft model starts from
    seq_len: int = 256
    max_tokens: int = 300_000

    def __post_init__(self) -> None:
        if self.kind not in ("heads", "eagle", "draft"):
            raise ConfigError(f"unknown drafter kind {self.kind!r}: heads, eagle or draft")
        if self.layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {self.layers}")
        if self.num_heads < 1 or self.topk < 1 or self.tree_nodes < 1:
            raise ConfigError("--heads, --topk and --tree-nodes must be >= 1")
        if self.draft_vocab < 1:
            raise ConfigError(f"--draft-vocab must be >= 1, got {self.draft_vocab}")
        if self.unroll < 1:
            raise ConfigError(f"--unroll must be >= 1, got {self.unroll}")
        from ..methods.eagle import STYLES

        if self.eagle_style not in STYLES:
            raise ConfigError(f"--eagle-style must be one of {', '.join(STYLES)}, got {self.eagle_style!r}")


def draft_vocab_ids(model, tokenizer, n: int) -> Tensor:
    """[v] long: the ``n`` most frequent token ids (all ids when ``n`` covers the vocabulary)."""
    if n >= model.vocab_size or tokenizer is None:
        return torch.arange(model.vocab_size)
    from ..vocab import frequent_ids

    return frequent_ids(getattr(model, "name", "model"), tokenizer, n, model.vocab_size)


# ------------------------------------------------------------------------------ heads
class HeadsBundle(nn.Module):
    """The heads and the rescoring LM, trained together."""

    def __init__(self, hidden: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.heads = HeadsNet(hidden, num_heads)
        self.lm = WindowLM(hidden, window)


def heads_loss(model, rows: Tensor, rec: Recording, bundle: HeadsBundle):
    """``loss_fn(window_indices, step)`` for :func:`train`: cross-entropy of every head against
    the target's top-k distribution ``j`` places later, plus the LM's against the target's next
    one (:func:`topk_ce`)."""
    K, w = bundle.heads.num_heads, bundle.lm.window

    def loss_fn(idx: Tensor, step: int):
        tok, hid = rec.tokens[idx].to(model.device), rec.hidden[idx].to(model.device)  # [b, T, H]
        b, T, H = hid.shape
        with torch.no_grad():
            p, ix = target_topk(output_logits(model, hid.reshape(-1, H), rows))
            p, ix = p.view(b, T, -1), ix.view(b, T, -1)  # [b, T, k]
        x = bundle.heads(hid.float())  # [b, T, K, H]
        total, logs = 0.0, {}
        for j in range(1, K + 1):
            lj = output_logits(model, x[:, : T - j, j - 1].reshape(-1, H), rows)
            pj, ij = p[:, j:].reshape(lj.shape[0], -1), ix[:, j:].reshape(lj.shape[0], -1)
            total = total + topk_ce(lj, pj, ij)
            if j == 1:
                logs["acc1"] = float((lj.detach().argmax(-1) == ij[:, 0]).float().mean())
        emb = model.embed_tokens(tok).float()  # [b, T, H]
        win = emb.unfold(1, w, 1).permute(0, 1, 3, 2)  # [b, T - w + 1, w, H]
        state = bundle.lm(win).reshape(-1, H)
        m = state.shape[0]
        lm_loss = topk_ce(output_logits(model, state, rows), p[:, w - 1 :].reshape(m, -1),
                          ix[:, w - 1 :].reshape(m, -1))
        logs["lm"] = float(lm_loss.detach())
        return total / K + lm_loss, logs

    return loss_fn


@torch.inference_mode()
def head_accuracy(model, rows: Tensor, rec: Recording, heads: HeadsNet, k: int) -> Tensor:
    """[K, k]: the rate at which head ``j + 1``'s ``i``-th candidate is the target's argmax
    ``j + 1`` places later, over the windows of ``rec``."""
    K = heads.num_heads
    hits = torch.zeros(K, k)
    count = torch.zeros(K)
    for n in range(rec.tokens.shape[0]):
        hid = rec.hidden[n].to(model.device)  # [T, H]
        T = hid.shape[0]
        arg = output_logits(model, hid, rows).argmax(-1)  # [T]
        x = heads(hid.to(next(heads.parameters()).dtype))  # [T, K, H]
        for j in range(1, K + 1):
            cand = output_logits(model, x[: T - j, j - 1], rows).topk(k, -1).indices  # [T-j, k]
            hits[j - 1] += (cand == arg[j:, None]).float().sum(0).cpu()
            count[j - 1] += T - j
    return hits / count.clamp(min=1)[:, None]


# ------------------------------------------------------------------------------ eagle
def eagle_loss(model, rows: Tensor, rec: Recording, net, spec: DrafterSpec):
    """Feature regression (smooth L1) plus the cross-entropy of the drafted distribution against
    the target's top-k one (:func:`topk_ce`),
    over ``spec.unroll`` passes: pass ``u`` is fed the features pass ``u - 1`` predicted."""

    def loss_fn(idx: Tensor, step: int):
        tok, hid = rec.tokens[idx].to(model.device), rec.hidden[idx].to(model.device)
        b, T, H = hid.shape
        f = hid.float()
        target = f[:, 1:]  # [b, T-1, H]
        with torch.no_grad():
            tp, ti = target_topk(output_logits(model, hid[:, 1:].reshape(-1, H), rows))
        e = net.embed(model, tok[:, 1:]).float()  # [b, T-1, H]
        pos = torch.arange(T - 1, device=model.device)
        inp = f[:, :-1]
        total, logs = 0.0, {}
        for u in range(spec.unroll):
            pred, _, _ = net(inp, e, pos)
            v_loss = F.smooth_l1_loss(pred, target)
            logits = output_logits(model, pred.reshape(-1, H), rows)
            p_loss = topk_ce(logits, tp, ti)
            weight = 1.0 if u == 0 else 0.5
            total = total + weight * (v_loss + spec.p_weight * p_loss)
            if u == 0:
                logs["acc1"] = float((logits.detach().argmax(-1) == ti[:, 0]).float().mean())
                logs["p"] = float(p_loss.detach())
            inp = torch.cat([f[:, :1], pred[:, :-1]], 1)
        return total, logs

    return loss_fn


# ------------------------------------------------------------------------------ run
@dataclass
class TrainResult:
    out: Path
    logs: dict
    tokens_per_step: float
    ar_steps_equal: bool
    seconds: float
    extra: dict = field(default_factory=dict)


def measure_tokens_per_step(
    model, method, rec: Recording, prompts: int = 4, prompt_len: int = 64, new: int = 48
) -> tuple[float, bool]:
    """Greedy tokens per step of ``method`` on prompts cut from held-back windows, and whether
    its output equalled plain greedy decoding's on all of them."""
    from ..engine import Engine, Stats
    from ..methods.base import Method
    from ..types import SamplingParams

    steps = toks = 0
    same = True
    n = min(prompts, rec.tokens.shape[0])
    for i in range(n):
        prompt = rec.tokens[i, :prompt_len]
        st = Stats(method.name)
        got = [t for piece in Engine(model, method).generate(prompt, new, SamplingParams(), stats=st) for t in piece]
        ref = [t for piece in Engine(model, Method("ar")).generate(prompt, new, SamplingParams()) for t in piece]
        same &= got == ref
        steps += st.steps
        toks += st.decode_tokens
    return (toks / steps if steps else 1.0), same


def run_training(
    model,
    tokenizer,
    texts: list[str],
    spec: DrafterSpec,
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    eval_prompts: int = 4,
    source=None,
    stream: Tensor | None = None,
) -> TrainResult:
    """The whole run (see the module docstring). ``stop_after``: interrupt after that many steps
    (for tests), leaving a checkpoint and no drafter. ``source``: the target's path (None: the
    embedded model), which ``draft`` cuts its initial layers from. ``stream``: token ids to
    record instead of the tokenized ``texts`` (:func:`~genrefine.train.record.record`)."""
    from ..methods.parts.store import save_drafter
    from .record import record

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    rec = record(model, tokenizer, texts, spec.seq_len, spec.max_tokens, progress=progress, stream=stream)
    train_rec, test_rec = rec.split(HELD_OUT, cfg.seed)
    ids = draft_vocab_ids(model, tokenizer, spec.draft_vocab)
    rows = model.lm_head.index_select(0, ids.to(model.device)).contiguous()
    meta = {"kind": spec.kind, "spec": spec.__dict__, "model": getattr(model, "name", "model"),
            "windows": int(rec.tokens.shape[0])}
    torch.manual_seed(cfg.seed)
    if spec.kind == "heads":
        net: nn.Module = HeadsBundle(model.hidden_size, spec.num_heads, spec.lm_window)
        loss_fn = heads_loss(model, rows, train_rec, net)
    elif spec.kind == "draft":
        from .distill import draft_loss, load_trainable, shrunk_init

        out.mkdir(parents=True, exist_ok=True)
        init = shrunk_init(source, spec.layers, out)
        net = load_trainable(init)
        loss_fn = draft_loss(model, rows, ids.to(model.device), train_rec, net)
    else:
        from ..methods.eagle import EagleNet

        net = EagleNet(model.hidden_size, out_norm=model.final_norm, style=spec.eagle_style)
        loss_fn = eagle_loss(model, rows, train_rec, net, spec)
    logs = train(net, loss_fn, train_rec.tokens.shape[0], cfg, out, meta, resume=resume,
                 progress=progress, tokens_per_window=spec.seq_len, stop_after=stop_after)
    if stop_after is not None and stop_after < cfg.steps:
        return TrainResult(out, logs, float("nan"), True, time.perf_counter() - t0)
    net.eval()
    extra: dict = {}
    if spec.kind == "draft":
        from ..methods.base import MethodOptions
        from ..registry import build_method
        from .distill import save_draft

        save_draft(net, out / "init", out)
        opts = MethodOptions(draft_model=str(out), draft_vocab=spec.draft_vocab)  # as trained
        method = build_method("sps", model, opts, tokenizer)
        tps, same = measure_tokens_per_step(model, method, test_rec, prompts=eval_prompts)
        return TrainResult(out, logs, tps, same, time.perf_counter() - t0, extra)
    if spec.kind == "heads":
        acc = head_accuracy(model, rows, test_rec, net.heads, spec.topk)
        tree = static_tree(acc, spec.tree_nodes)
        extra["head_top1"] = [round(float(a), 4) for a in acc[:, 0]]
        config = {"num_heads": spec.num_heads, "topk": spec.topk, "tree": [list(p) for p in tree],
                  "lm_window": spec.lm_window, "ngram_order": spec.ngram_order,
                  "accuracy": [[round(float(a), 4) for a in row] for row in acc]}
        tensors = {"heads.weight": net.heads.weight.data, "heads.bias": net.heads.bias.data}
        tensors.update({f"lm.{k}": v for k, v in net.lm.state_dict().items()})
        from ..methods.parts.lattice import NgramLM

        ngram = NgramLM(order=spec.ngram_order, vocab_size=model.vocab_size)
        for row in train_rec.tokens:
            # ids past the model's vocabulary (a speech model's text prompt) split a row: the
            # n-gram counts only runs of tokens the model emits
            cut = (row >= model.vocab_size).nonzero().flatten().tolist()
            for a, b in zip([-1] + cut, cut + [len(row)]):
                if b - a > 1:
                    ngram.add(row[a + 1:b])
        ngram = ngram.pruned(NGRAM_MIN_COUNT)
        ngram.save(out / "ngram.safetensors")
        extra["ngrams"] = ngram.num_ngrams
    else:
        config = {**net.config(), "topk": spec.topk}
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors["vocab_ids"] = ids.to(torch.int32)
    save_drafter(out, spec.kind, model, config, tensors)
    from ..methods.base import MethodOptions
    from ..registry import build_method

    name = "medusa" if spec.kind == "heads" else "eagle"
    method = build_method(name, model, MethodOptions(drafter=str(out)), tokenizer)
    tps, same = measure_tokens_per_step(model, method, test_rec, prompts=eval_prompts)
    return TrainResult(out, logs, tps, same, time.perf_counter() - t0, extra)
