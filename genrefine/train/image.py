"""``genrefine train image``: the embedded image model, from rendered glyphs to a bundle.

One run (:func:`train_image`), in stages that each train with :func:`genrefine.train.loop.train`
(progress bar, checkpoints in ``OUT/checkpoints/<stage>/``, resumed when the same command is
rerun after an interruption; the folder is removed once the bundle is complete):

1. render the training images and the held-out real images (another seed), :mod:`..data`;
2. the VQ tokenizer (codebook initialized by k-means on encoder outputs, unused codes restarted
   from encoder outputs every ``vq_restart`` steps during the first 80% of training);
3. the classifier, on the training images; its held-out accuracy, its accuracy on the VQ's
   reconstructions of held-out images, the feature statistics of held-out images;
4. the transformer (a ``transformers`` ``LlamaForCausalLM``) on ``[class] + codes`` with the
   next-token loss over the codes, the class replaced by the null token with probability
   ``p_uncond`` (for classifier-free guidance);
5. the sampling defaults: plain sampling of ``eval_per_class`` images per class for each top-k
   and CFG scale of a small grid, scored by the classifier; the chosen defaults are the smallest
   CFG scale (then the largest top-k) whose accuracy is within ``DEFAULTS_SLACK`` of the best;
6. the bundle (:func:`genrefine.modalities.image.bundle.save_bundle`).

Every random choice is drawn from generators seeded by ``seed`` and the step, so a resumed run
computes what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diskcache import cpu_model
from ..errors import ConfigError
from ..modalities.image.bundle import image_meta, save_bundle
from ..modalities.image.classifier import Classifier
from ..modalities.image.data import CLASSES, IMAGE_SIZE, MAX_ROTATION, font_paths, render_glyphs
from ..modalities.image.quality import feature_stats, frechet_distance
from ..modalities.image.vq import DOWNSAMPLE, VQTokenizer, kmeans
from .loop import TrainConfig, train
from .modality import figure, run_trainer, say_for, step_generator

CHECKPOINTS = "checkpoints"
DEFAULTS_SLACK = 0.02  # accuracy within this of the best counts as as good (see step 5)


@dataclass(frozen=True)
class ImageTrainSpec:
    """Sizes of one run (:data:`REAL` is the shipped bundle's, :data:`TINY` the tests')."""

    n_per_class: int = 3000  # training images per class
    heldout_per_class: int = 300  # held-out real images per class (metrics, real_stats)
    codebook_size: int = 256
    vq_dim: int = 16
    vq_channels: int = 64
    vq_steps: int = 1000
    vq_batch: int = 128
    vq_lr: float = 2e-3
    vq_restart: int = 100  # steps between restarts of unused codes
    clf_features: int = 64
    clf_channels: int = 32
    clf_steps: int = 800
    clf_batch: int = 128
    clf_lr: float = 2e-3
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    tf_steps: int = 1200
    tf_batch: int = 64
    tf_lr: float = 1e-3
    p_uncond: float = 0.1
    eval_per_class: int = 10  # samples per class and grid point when choosing the defaults
    top_k_grid: tuple = (32, 128)
    cfg_grid: tuple = (1.0, 2.0, 3.0, 4.0)
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        for name in ("n_per_class", "heldout_per_class", "codebook_size", "vq_dim", "vq_steps",
                     "vq_batch", "vq_restart", "clf_steps", "clf_batch", "hidden", "layers",
                     "heads", "tf_steps", "tf_batch", "eval_per_class", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_per_class < 2 and self.heldout_per_class * len(CLASSES) < 2:
            raise ConfigError("heldout_per_class must give at least 2 images")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if not self.top_k_grid or not self.cfg_grid:
            raise ConfigError("top_k_grid and cfg_grid must not be empty")


REAL = ImageTrainSpec()
TINY = ImageTrainSpec(
    n_per_class=6, heldout_per_class=3, codebook_size=32, vq_dim=8, vq_channels=16, vq_steps=4,
    vq_batch=16, vq_restart=2, clf_features=16, clf_channels=8, clf_steps=4, clf_batch=16,
    hidden=32, layers=2, heads=4, intermediate=64, tf_steps=4, tf_batch=8, eval_per_class=1,
    top_k_grid=(16,), cfg_grid=(1.0, 2.0), checkpoint_every=2,
)


@dataclass
class ImageTrainResult:
    out: Path
    meta: dict  # image.json
    seconds: float
    complete: bool = True  # False when stopped early by ``stop_after`` (no bundle written)
    logs: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ pieces
def as_input(images: Tensor) -> Tensor:
    """uint8 [N, H, W] -> float [N, 1, H, W] in [0, 1]."""
    return images.float()[:, None] / 255.0


def vq_loss_fn(vq: VQTokenizer, images: Tensor, spec: ImageTrainSpec, seed: int):
    """``loss_fn(idx, step)`` of the VQ stage; restarts unused codes first on restart steps."""
    last_restart = int(spec.vq_steps * 0.8)

    def loss_fn(idx: Tensor, step: int):
        x = as_input(images[idx])
        if step % spec.vq_restart == 0 and 0 < step < last_restart:
            with torch.no_grad():
                z = vq.latents(x).reshape(-1, vq.dim)  # [b*T, d]
                used = torch.bincount(vq.nearest(z), minlength=vq.codebook_size) > 0
                dead = (~used).nonzero().flatten()
                if dead.numel():
                    g = step_generator(seed, 1, step)
                    pick = torch.randint(z.shape[0], (dead.numel(),), generator=g)
                    vq.codebook.data[dead] = z[pick]
        return vq.loss(x)

    return loss_fn


def classifier_loss_fn(clf: Classifier, images: Tensor, labels: Tensor):
    def loss_fn(idx: Tensor, step: int):
        return clf.loss(as_input(images[idx]), labels[idx])

    return loss_fn


def transformer_config(spec: ImageTrainSpec, n_classes: int):
    """The transformer's ``LlamaConfig``: vocab = codes + classes + null, no BOS/EOS."""
    from transformers import LlamaConfig

    grid = IMAGE_SIZE // DOWNSAMPLE
    return LlamaConfig(
        vocab_size=spec.codebook_size + n_classes + 1, hidden_size=spec.hidden,
        intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=max(128, 2 * (grid * grid + 1)), rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def sequences(codes: Tensor, labels: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """codes [N, T], labels [N] -> (inputs [N, T] = class token then codes[:-1], targets [N, T])."""
    cls = (codebook_size + labels.long())[:, None]
    return torch.cat([cls, codes[:, :-1]], 1), codes


def transformer_loss_fn(model, codes: Tensor, labels: Tensor, spec: ImageTrainSpec, seed: int):
    """``loss_fn(idx, step)`` of the transformer stage: next-code cross-entropy, the class token
    replaced by the null token with probability ``p_uncond``."""
    C = spec.codebook_size
    null = C + len(CLASSES)

    def loss_fn(idx: Tensor, step: int):
        inp, tgt = sequences(codes[idx], labels[idx], C)
        drop = torch.rand(len(idx), generator=step_generator(seed, 3, step)) < spec.p_uncond
        inp[:, 0] = torch.where(drop, torch.full_like(inp[:, 0], null), inp[:, 0])
        logits = model(input_ids=inp).logits  # [b, T, V]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)), {}

    return loss_fn


@torch.inference_mode()
def code_nll(model, codes: Tensor, labels: Tensor, codebook_size: int, chunk: int = 256) -> float:
    """Mean next-code cross-entropy (nats) of ``codes`` [N, T] given their classes."""
    total, n = 0.0, 0
    for c, y in zip(codes.split(chunk), labels.split(chunk)):
        inp, tgt = sequences(c, y, codebook_size)
        lg = model(input_ids=inp).logits
        total += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="sum"))
        n += tgt.numel()
    return total / max(n, 1)


@torch.inference_mode()
def sample_codes(model, classes: Tensor, *, codebook_size: int, null_token: int, n_codes: int,
                 temperature: float = 1.0, top_k: int = 0, cfg: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Plain autoregressive sampling with a transformers model: classes long [B] -> codes [B,
    n_codes]. Logits are the codes' only; guided ``u + cfg * (c - u)`` (u: the null class's),
    divided by ``temperature``, cut to the ``top_k`` largest (0: all), sampled."""
    B = classes.shape[0]
    guided = cfg != 1.0
    first = codebook_size + classes.long()
    if guided:
        first = torch.cat([first, torch.full_like(first, null_token)])
    out = torch.empty(B, n_codes, dtype=torch.long)
    tok, past = first[:, None], None
    for t in range(n_codes):
        res = model(input_ids=tok, cache=past, use_cache=True)
        past = res.cache
        lg = res.logits[:, -1, :codebook_size].float()  # [B or 2B, C]
        if guided:
            c, u = lg[:B], lg[B:]
            lg = u + cfg * (c - u)
        if temperature <= 0:
            nxt = lg.argmax(-1)
        else:
            lg = lg / temperature
            if 0 < top_k < codebook_size:
                kth = lg.topk(top_k, -1).values[:, -1:]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            nxt = torch.multinomial(lg.softmax(-1), 1, generator=generator)[:, 0]
        out[:, t] = nxt
        tok = (torch.cat([nxt, nxt]) if guided else nxt)[:, None]
    return out


def choose_defaults(results: list[dict]) -> dict:
    """The smallest CFG scale, then the largest top-k, whose accuracy is within
    :data:`DEFAULTS_SLACK` of the best in ``results`` (dicts with top_k, cfg, accuracy)."""
    best = max(r["accuracy"] for r in results)
    ok = [r for r in results if r["accuracy"] >= best - DEFAULTS_SLACK]
    pick = min(ok, key=lambda r: (r["cfg"], -r["top_k"]))
    return {"temperature": 1.0, "top_k": int(pick["top_k"]), "cfg": float(pick["cfg"])}


# ------------------------------------------------------------------------------ run
def _stage(net, loss_fn, n: int, steps: int, batch: int, lr: float, spec: ImageTrainSpec, seed: int,
           ckdir: Path, name: str, resume: bool, progress: bool, stop_after, tokens: int):
    """One stage through :func:`train`. Its checkpoint records the settings the stage depends on
    (its own sizes and those of the stages before it), so changing a later stage's sizes keeps
    the earlier stages' checkpoints."""
    cfg = TrainConfig(steps=steps, lr=lr, warmup=max(1, min(50, steps // 10)), batch=batch, seed=seed,
                      checkpoint_every=spec.checkpoint_every)
    data = ("n_per_class",)
    deps = {"vq": data + ("codebook_size", "vq_dim", "vq_channels", "vq_restart"),
            "classifier": data + ("clf_features", "clf_channels"),
            "transformer": data + ("codebook_size", "vq_dim", "vq_channels", "vq_restart", "vq_steps",
                                   "vq_batch", "vq_lr", "hidden", "layers", "heads", "intermediate",
                                   "p_uncond")}[name]
    meta = {"stage": name, "spec": {k: getattr(spec, k) for k in deps}, "seed": seed}
    return train(net, loss_fn, n, cfg, ckdir / name, meta, resume=resume,
                 progress=progress, tokens_per_window=tokens, stop_after=stop_after, desc=name)


def train_image(
    out: str | Path,
    *,
    tiny: bool = False,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    spec: ImageTrainSpec | None = None,
    stop_after: int | None = None,
    threads: int | None = 2,
) -> ImageTrainResult:
    """Train the image model and write its bundle into ``out`` (see the module docstring).

    ``tiny``: :data:`TINY` sizes (a valid bundle in seconds, for tests); ``spec`` overrides
    both. ``resume``: continue from ``out/checkpoints`` when present (else start over).
    ``stop_after``: stop the transformer stage after that many steps (as an interruption would;
    no bundle is written). ``threads``: torch threads during the run (None: unchanged)."""
    spec = spec or (TINY if tiny else REAL)
    t0 = time.perf_counter()
    return run_trainer(out, seed, "image", threads,
                       lambda out: _run(out, spec, seed, resume, progress, stop_after, t0))


def _run(out: Path, spec: ImageTrainSpec, seed: int, resume: bool, progress: bool, stop_after, t0) -> ImageTrainResult:
    from transformers import LlamaForCausalLM

    ckdir = out / CHECKPOINTS
    if not resume:
        shutil.rmtree(ckdir, ignore_errors=True)
    say = say_for(progress)
    n_cls = len(CLASSES)
    train_seed, heldout_seed = seed * 1000 + 1, seed * 1000 + 2
    say(f"rendering {spec.n_per_class * n_cls} training and {spec.heldout_per_class * n_cls} held-out images")
    x, y = render_glyphs(spec.n_per_class, train_seed)
    hx, hy = render_glyphs(spec.heldout_per_class, heldout_seed)
    times = {}

    # ---- VQ
    t = time.perf_counter()
    torch.manual_seed(seed)
    vq = VQTokenizer(spec.codebook_size, spec.vq_dim, spec.vq_channels)
    with torch.no_grad():
        z = vq.latents(as_input(x[:2048])).reshape(-1, spec.vq_dim)
        vq.codebook.data.copy_(kmeans(z, spec.codebook_size, 10, step_generator(seed, 0, 0)))
    vq_logs = _stage(vq, vq_loss_fn(vq, x, spec, seed), len(x), spec.vq_steps, spec.vq_batch, spec.vq_lr,
                     spec, seed, ckdir, "vq", resume, progress, None, 1)
    vq.eval()
    times["vq_s"] = time.perf_counter() - t

    # ---- classifier
    t = time.perf_counter()
    torch.manual_seed(seed + 1)
    clf = Classifier(n_cls, spec.clf_features, spec.clf_channels)
    clf_logs = _stage(clf, classifier_loss_fn(clf, x, y), len(x), spec.clf_steps, spec.clf_batch, spec.clf_lr,
                      spec, seed, ckdir, "classifier", resume, progress, None, 1)
    clf.eval()
    times["classifier_s"] = time.perf_counter() - t

    # ---- measures of the VQ and the classifier on held-out images
    hcodes = vq.encode(hx)  # [M, T]
    recon = vq.decode(hcodes)
    counts = torch.bincount(hcodes.flatten(), minlength=spec.codebook_size).double()
    prob = counts / counts.sum()
    perplexity = float(torch.exp(-(prob[prob > 0] * prob[prob > 0].log()).sum()))
    clf_acc = float((clf.predict(hx) == hy).float().mean())
    recon_acc = float((clf.predict(recon) == hy).float().mean())
    recon_mse = float(((recon.float() - hx.float()) / 255).pow(2).mean())
    feats = clf.features(hx)
    real_mu, real_sigma = feature_stats(feats)
    say(f"VQ: {int((counts > 0).sum())}/{spec.codebook_size} codes used, classifier accuracy "
        f"{clf_acc:.3f} on held-out images, {recon_acc:.3f} on their reconstructions")

    # ---- transformer
    t = time.perf_counter()
    codes = vq.encode(x)
    torch.manual_seed(seed + 2)
    config = transformer_config(spec, n_cls)
    model = LlamaForCausalLM(config)
    tf_logs = _stage(model, transformer_loss_fn(model, codes, y, spec, seed), len(x), spec.tf_steps,
                     spec.tf_batch, spec.tf_lr, spec, seed, ckdir, "transformer", resume, progress,
                     stop_after, codes.shape[1] + 1)
    if stop_after is not None and stop_after < spec.tf_steps:
        return ImageTrainResult(out, {}, time.perf_counter() - t0, complete=False, logs=tf_logs)
    model.eval()
    times["transformer_s"] = time.perf_counter() - t
    held_nll = code_nll(model, hcodes, hy, spec.codebook_size)

    # ---- sampling defaults
    t = time.perf_counter()
    grid = IMAGE_SIZE // DOWNSAMPLE
    classes = torch.arange(n_cls).repeat_interleave(spec.eval_per_class)
    with torch.inference_mode():
        search = _defaults_search(model, vq, clf, spec, seed, classes, real_mu, real_sigma, say)
    defaults = choose_defaults(search)
    times["defaults_s"] = time.perf_counter() - t
    chosen = next(r for r in search if r["top_k"] == defaults["top_k"] and r["cfg"] == defaults["cfg"])

    # ---- the bundle
    fonts = [Path(p).name for p in font_paths()]
    meta = image_meta(
        codebook_size=spec.codebook_size, grid=grid, image_size=IMAGE_SIZE, classes=CLASSES,
        defaults=defaults,
        vq={**vq.config(), "steps": spec.vq_steps, "batch": spec.vq_batch, "lr": spec.vq_lr,
            "codebook_usage": round(float((counts > 0).float().mean()), 4),
            "code_perplexity": round(perplexity, 2), "heldout_recon_mse": round(recon_mse, 5),
            "heldout_recon_classifier_accuracy": round(recon_acc, 4),
            "last_logs": {k: figure(v) for k, v in vq_logs.items()}},
        classifier={**clf.config(), "steps": spec.clf_steps, "batch": spec.clf_batch, "lr": spec.clf_lr,
                    "heldout_accuracy": round(clf_acc, 4), "feature_layer": "penultimate (after ReLU)"},
        data={"source": "digits 0-9 rendered with Pillow from matplotlib's bundled TrueType fonts",
              "fonts": fonts, "train_per_class": spec.n_per_class, "train_seed": train_seed,
              "heldout_per_class": spec.heldout_per_class, "heldout_seed": heldout_seed,
              "augmentation": f"random font, size, stroke 0-3 px (3x canvas), rotation +-{MAX_ROTATION:g} "
                              "degrees, shear +-0.2, shift +-2.7 px, Gaussian blur on 30%",
              "function": "genrefine.modalities.image.data.render_glyphs(n_per_class, seed)"},
        training={"seed": seed, "transformer": {"hidden": spec.hidden, "layers": spec.layers, "heads": spec.heads,
                                                "intermediate": spec.intermediate, "steps": spec.tf_steps,
                                                "batch": spec.tf_batch, "lr": spec.tf_lr, "p_uncond": spec.p_uncond,
                                                "heldout_code_nll": round(held_nll, 4),
                                                "last_loss": figure(tf_logs.get("loss"))},
                  "defaults_search": {"samples_per_point": len(classes), "sampler": "plain sampling "
                                      "(genrefine.train.image.sample_codes), guided logits u + cfg*(c-u) "
                                      "over the codes, then temperature, then top-k",
                                      "rule": f"smallest cfg, then largest top_k, within {DEFAULTS_SLACK} "
                                              "of the best accuracy", "results": search},
                  "sample_accuracy_at_defaults": chosen["accuracy"],
                  "sample_frechet_distance_at_defaults": chosen["frechet_distance"],
                  "wall_seconds": {k: round(v, 1) for k, v in times.items()},
                  "cpu": cpu_model(), "torch": torch.__version__, "tiny": spec == TINY},
    )
    save_bundle(out, meta, vq, clf, real_mu, real_sigma, len(hx), model)
    seconds = time.perf_counter() - t0
    meta["training"]["wall_seconds"]["total"] = round(seconds, 1)
    (out / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(ckdir, ignore_errors=True)
    return ImageTrainResult(out, meta, seconds, True, {"vq": vq_logs, "classifier": clf_logs, "transformer": tf_logs})


def _defaults_search(model, vq, clf, spec, seed, classes, real_mu, real_sigma, say) -> list[dict]:
    """Classifier accuracy and Frechet distance of plain samples at each grid point."""
    n_cls = len(CLASSES)
    grid = IMAGE_SIZE // DOWNSAMPLE
    search = []
    for top_k in spec.top_k_grid:
        for cfg in spec.cfg_grid:
            g = torch.Generator().manual_seed(seed * 7 + 5)
            c = sample_codes(model, classes, codebook_size=spec.codebook_size, null_token=spec.codebook_size + n_cls,
                             n_codes=grid * grid, top_k=int(top_k), cfg=float(cfg), generator=g)
            imgs = vq.decode(c)
            feats_g = clf.features(imgs)
            acc = float((clf.head(feats_g).argmax(1) == classes).float().mean())
            fd = frechet_distance(*feature_stats(feats_g), real_mu, real_sigma) if len(imgs) >= 2 else float("nan")
            search.append({"top_k": int(top_k), "cfg": float(cfg), "accuracy": round(acc, 4),
                           "frechet_distance": round(fd, 3)})
            say(f"sampling top_k={top_k} cfg={cfg}: classifier accuracy {acc:.3f}, Frechet distance {fd:.2f}")
    return search


__all__ = ["ImageTrainSpec", "REAL", "TINY", "train_image", "sample_codes"]
