"""``genrefine train speech``: the embedded speech model, from synthesized sentences to a bundle.

One run (:func:`train_speech`), in stages; each trains with :func:`genrefine.train.loop.train`
(progress bar, checkpoints in ``OUT/checkpoints/<stage>/``, resumed when the same command is rerun
after an interruption; the folder is removed once the bundle is complete):

1. the data: ``n_utterances`` training sentences (:mod:`genrefine.modalities.speech.data`) spoken
   by flite in drawn voices and rates, kept as log-mel frames (``OUT/checkpoints/data``, reused on
   a rerun);
2. the codec (:mod:`genrefine.modalities.speech.codec`): k-means centroids of training frames,
   then the code decoder trained to predict the frames from their codes;
3. the transformer (a ``transformers`` ``LlamaForCausalLM``) on
   ``[voice, rate] + characters + [start] + codes + [end]``, the loss on the codes and the end;
4. the drafters the lossless and VADUSA methods use, distilled from the transformer on the training
   sequences (:func:`genrefine.train.run.run_training`): Medusa heads (``heads/``; medusa, vadusa),
   an EAGLE drafter (``eagle/``) and a draft model of its first ``draft_layers`` layers
   (``draft/``; sps);
5. the sampling temperature: the one of ``temperature_grid`` whose plain samples of held-out
   sentences the recognizer reads with the lowest WER;
6. the bundle (:mod:`genrefine.modalities.speech.bundle`), written before the drafters are trained
   on the model it holds; ``speech.json`` is rewritten at the end with what they measured.

Every random choice is drawn from generators seeded by ``seed`` and the step, so a resumed run
computes what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..diskcache import cpu_model
from ..errors import ConfigError
from ..modalities.speech import codec as codec_mod
from ..modalities.speech.data import RATES, VOICES, split_sentences, synthesize_corpus
from ..modalities.speech.tokens import TokenLayout, layout_for
from .loop import TrainConfig, train
from .modality import figure, run_trainer, say_for, step_generator

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class SpeechTrainSpec:
    """Sizes and schedules of one run."""

    n_utterances: int = 12_000
    heldout: int = 64  # held-out sentences synthesized for the measures (not trained on)
    codebook_size: int = 512
    kmeans_frames: int = 200_000
    kmeans_iters: int = 20
    dec_width: int = 256
    dec_layers: int = 3
    dec_steps: int = 1500
    dec_batch: int = 16
    dec_lr: float = 2e-3
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 768
    tf_steps: int = 3500
    tf_batch: int = 16
    tf_lr: float = 1.5e-3
    num_heads: int = 4  # Medusa heads
    heads_steps: int = 600
    heads_batch: int = 16
    heads_lr: float = 2e-3
    drafter_seq_len: int = 256
    drafter_tokens: int = 400_000
    draft_layers: int = 1  # sps: the draft model is the transformer's first layers, distilled
    temperature: float = 0.8  # the bundle's sampling defaults, unless the search below runs
    top_k: int = 40
    temperature_grid: tuple = (0.4, 0.6, 0.8, 1.0)  # searched by the recognizer's WER (step 5)
    defaults_texts: int = 48
    checkpoint_every: int = 100


REAL = SpeechTrainSpec()
TINY = SpeechTrainSpec(n_utterances=24, heldout=4, codebook_size=16, kmeans_frames=4000, kmeans_iters=3,
                       dec_width=16, dec_layers=1, dec_steps=3, dec_batch=4, hidden=32, layers=2, heads=2,
                       intermediate=64, tf_steps=3, tf_batch=4, num_heads=2, heads_steps=3, heads_batch=4,
                       drafter_seq_len=32, drafter_tokens=4000, temperature_grid=(1.0,), defaults_texts=2,
                       checkpoint_every=2)


# ------------------------------------------------------------------------------ data
def load_or_make_data(ckdir: Path, spec: SpeechTrainSpec, seed: int, progress: bool, say) -> dict:
    """The training and held-out utterances as log-mel frames: ``{"feats": float16 [F, 80],
    "offsets": long [N + 1], "voice", "rate": long [N], "texts": [...], "n_train": int}`` (the
    first ``n_train`` are training ones), made once and kept in ``ckdir/data``."""
    d = ckdir / "data"
    meta_path, t_path = d / "data.json", d / "data.safetensors"
    want = {"n_utterances": spec.n_utterances, "heldout": spec.heldout, "seed": seed,
            "voices": list(VOICES), "rates": list(RATES)}
    if meta_path.exists() and t_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("want") == want:
            t = load_file(t_path)
            return {**t, "texts": meta["texts"], "n_train": meta["n_train"]}
    train_s, held_s = split_sentences()
    rng = np.random.default_rng(seed)
    if spec.n_utterances > len(train_s):
        raise ConfigError(f"only {len(train_s)} training sentences exist; ask for fewer utterances")
    pick = sorted(rng.choice(len(train_s), spec.n_utterances, replace=False).tolist())
    hpick = sorted(rng.choice(len(held_s), min(spec.heldout, len(held_s)), replace=False).tolist())
    sentences = [train_s[i] for i in pick] + [held_s[i] for i in hpick]
    say(f"synthesizing {len(sentences)} utterances with flite ({len(pick)} training, {len(hpick)} held out)")
    from tqdm.auto import tqdm

    with tqdm(total=len(sentences), desc="flite", disable=not progress) as bar:
        utts = synthesize_corpus(sentences, seed, progress=bar.update)
    feats = [codec_mod.log_mel(u.audio) for u in utts]
    lens = torch.tensor([len(f) for f in feats])
    t = {"feats": torch.cat(feats).half(), "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
         "voice": torch.tensor([u.voice for u in utts]), "rate": torch.tensor([u.rate for u in utts])}
    d.mkdir(parents=True, exist_ok=True)
    save_file(t, str(t_path))
    meta_path.write_text(json.dumps({"want": want, "texts": sentences, "n_train": len(pick)}))
    return {**t, "texts": sentences, "n_train": len(pick)}


# ------------------------------------------------------------------------------ sequences
def speech_sequences(layout: TokenLayout, texts, voices, rates, codes: list[Tensor]) -> list[Tensor]:
    """One long tensor per utterance: prompt + codes + end."""
    out = []
    for text, v, r, c in zip(texts, voices, rates, codes):
        p = torch.tensor(layout.prompt(text, int(v), int(r)), dtype=torch.long)
        out.append(torch.cat([p, c.long(), torch.tensor([layout.end])]))
    return out


def pad_batch(seqs: list[Tensor], layout: TokenLayout) -> tuple[Tensor, Tensor]:
    """(inputs [b, T], targets [b, T]): next-token pairs, targets -100 outside codes and end."""
    T = max(len(s) for s in seqs) - 1
    inp = torch.full((len(seqs), T), layout.end, dtype=torch.long)
    tgt = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        inp[i, :n] = s[:-1]
        t = s[1:].clone()
        t[t > layout.end] = -100  # prompt tokens are given, not predicted
        tgt[i, :n] = t
    return inp, tgt


def transformer_config(spec: SpeechTrainSpec, layout: TokenLayout, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=layout.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def transformer_loss_fn(model, seqs: list[Tensor], layout: TokenLayout):
    def loss_fn(idx: Tensor, step: int):
        inp, tgt = pad_batch([seqs[int(i)] for i in idx], layout)
        logits = model(input_ids=inp).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
        return loss, {}

    return loss_fn


@torch.inference_mode()
def sequence_nll(model, seqs: list[Tensor], layout: TokenLayout, chunk: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the codes and ends of ``seqs``."""
    total, n = 0.0, 0
    for i in range(0, len(seqs), chunk):
        inp, tgt = pad_batch(seqs[i:i + chunk], layout)
        lg = model(input_ids=inp).logits
        total += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tgt.reshape(-1),
                                       reduction="sum", ignore_index=-100))
        n += int((tgt != -100).sum())
    return total / max(n, 1)


def codec_loss_fn(codec: codec_mod.Codec, feats: Tensor, offsets: Tensor, n_train: int, seg: int, seed: int):
    """Random ``seg``-frame segments of training utterances: MSE of the decoded log-mel."""
    lens = (offsets[1:] - offsets[:-1])[:n_train]

    def loss_fn(idx: Tensor, step: int):
        g = step_generator(seed, 1, step)
        rows = []
        for i in idx.tolist():
            L = int(lens[i])
            s = int(torch.randint(0, max(1, L - seg) + 1, (1,), generator=g))
            f = feats[offsets[i] + s: offsets[i] + min(L, s + seg)].float()
            if len(f) < seg:
                f = torch.cat([f, f[-1:].expand(seg - len(f), -1)])
            rows.append(f)
        x = torch.stack(rows)  # [b, seg, 80]
        with torch.no_grad():
            codes = torch.cdist(x, codec.codebook).argmin(-1)
        return F.mse_loss(codec.decoder(codes), x), {}

    return loss_fn


# ------------------------------------------------------------------------------ run
@dataclass
class SpeechTrainResult:
    out: Path
    meta: dict
    seconds: float
    complete: bool = True
    logs: dict | None = None


def _stage(net, loss_fn, n: int, steps: int, batch: int, lr: float, spec: SpeechTrainSpec, seed: int,
           ckdir: Path, name: str, resume: bool, progress: bool, stop_after, tokens: int) -> dict:
    cfg = TrainConfig(steps=steps, lr=lr, warmup=max(1, min(100, steps // 10)), batch=batch, seed=seed,
                      checkpoint_every=spec.checkpoint_every)
    meta = {"stage": name, "spec": asdict(spec), "seed": seed}
    return train(net, loss_fn, n, cfg, ckdir / name, meta, resume=resume, progress=progress,
                 tokens_per_window=tokens, stop_after=stop_after, desc=name)


def fit_codec(data: dict, spec: SpeechTrainSpec, seed: int, ckdir: Path, resume: bool, progress: bool,
              say) -> tuple[codec_mod.Codec, dict]:
    """Stage 2: k-means centroids (kept in ``ckdir/codec_kmeans.safetensors``), then the decoder."""
    feats, offsets, n_train = data["feats"], data["offsets"], data["n_train"]
    km_path = ckdir / "codec_kmeans.safetensors"
    want = f"{spec.codebook_size}|{spec.kmeans_frames}|{spec.kmeans_iters}|{seed}|{len(feats)}"
    centroids = None
    if resume and km_path.exists():
        t = load_file(km_path)
        if bytes(t["key"].tolist()).decode() == want:
            centroids = t["centroids"]
    if centroids is None:
        train_frames = feats[: int(offsets[n_train])].float()
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_frames), generator=g)[: spec.kmeans_frames]
        from tqdm.auto import tqdm

        with tqdm(total=spec.kmeans_iters, desc="k-means", disable=not progress) as bar:
            centroids = codec_mod.kmeans(train_frames[pick], spec.codebook_size, spec.kmeans_iters, seed, bar.update)
        ckdir.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": centroids, "key": torch.tensor(list(want.encode()), dtype=torch.uint8)}, str(km_path))
    torch.manual_seed(seed + 1)
    codec = codec_mod.Codec(centroids, spec.dec_width, spec.dec_layers)
    logs = _stage(codec.decoder, codec_loss_fn(codec, feats, offsets, n_train, 128, seed), n_train, spec.dec_steps,
                  spec.dec_batch, spec.dec_lr, spec, seed, ckdir, "codec", resume, progress, None, 128)
    codec.eval()
    return codec, logs


def encode_all(codec: codec_mod.Codec, data: dict) -> list[Tensor]:
    feats, offsets = data["feats"], data["offsets"]
    with torch.no_grad():
        return [codec.encode_features(feats[offsets[i]:offsets[i + 1]].float())
                for i in range(len(offsets) - 1)]


def train_speech(
    out: str | Path,
    *,
    tiny: bool = False,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    spec: SpeechTrainSpec | None = None,
    stop_after: int | None = None,
    threads: int | None = 2,
) -> SpeechTrainResult:
    """Train the speech model and write its bundle into ``out`` (see the module docstring).

    ``tiny``: :data:`TINY` sizes (a valid bundle in seconds, for tests); ``spec`` overrides both.
    ``resume``: continue from ``out/checkpoints`` when present (else start over). ``stop_after``:
    stop the transformer stage after that many steps (as an interruption would; no bundle is
    written). ``threads``: torch threads during the run (None: unchanged)."""
    spec = spec or (TINY if tiny else REAL)
    t0 = time.perf_counter()
    return run_trainer(out, seed, "speech", threads,
                       lambda out: _run(out, spec, seed, resume, progress, stop_after, t0))


def _run(out: Path, spec: SpeechTrainSpec, seed: int, resume: bool, progress: bool, stop_after, t0) -> SpeechTrainResult:
    from transformers import LlamaForCausalLM

    ckdir = out / CHECKPOINTS
    if not resume:
        shutil.rmtree(ckdir, ignore_errors=True)
    say = say_for(progress)
    times = {}
    t = time.perf_counter()
    data = load_or_make_data(ckdir, spec, seed, progress, say)
    times["data_s"] = time.perf_counter() - t
    n_train = data["n_train"]

    t = time.perf_counter()
    codec, codec_logs = fit_codec(data, spec, seed, ckdir, resume, progress, say)
    times["codec_s"] = time.perf_counter() - t
    codes = encode_all(codec, data)
    counts = torch.bincount(torch.cat(codes[:n_train]), minlength=spec.codebook_size).double()
    prob = counts / counts.sum()
    perplexity = float(torch.exp(-(prob[prob > 0] * prob[prob > 0].log()).sum()))
    held = slice(n_train, len(codes))
    with torch.no_grad():
        fo = data["offsets"]
        recon_mse = float(torch.stack([
            F.mse_loss(codec.decode_features(codes[i]), data["feats"][fo[i]:fo[i + 1]].float())
            for i in range(n_train, len(codes))]).mean()) if len(codes) > n_train else float("nan")
    say(f"codec: {int((counts > 0).sum())}/{spec.codebook_size} codes used, perplexity {perplexity:.0f}, "
        f"held-out log-mel MSE {recon_mse:.3f}")

    layout = layout_for(spec.codebook_size)
    seqs = speech_sequences(layout, data["texts"], data["voice"].tolist(), data["rate"].tolist(), codes)
    max_len = max(1024, 2 * max(len(s) for s in seqs))
    t = time.perf_counter()
    torch.manual_seed(seed + 2)
    model = LlamaForCausalLM(transformer_config(spec, layout, max_len))
    avg = int(sum(len(s) for s in seqs[:n_train]) / max(n_train, 1))
    tf_logs = _stage(model, transformer_loss_fn(model, seqs[:n_train], layout), n_train, spec.tf_steps,
                     spec.tf_batch, spec.tf_lr, spec, seed, ckdir, "transformer", resume, progress, stop_after, avg)
    if stop_after is not None and stop_after < spec.tf_steps:
        return SpeechTrainResult(out, {}, time.perf_counter() - t0, complete=False, logs=tf_logs)
    model.eval()
    times["transformer_s"] = time.perf_counter() - t
    held_nll = sequence_nll(model, seqs[held], layout) if len(seqs) > n_train else float("nan")
    say(f"transformer: held-out code NLL {held_nll:.3f} nats")

    # ---- the bundle without drafters first: the drafters are trained on the native model it loads
    codec_cfg = {"kind": "k-means over log-mel frames + convolutional decoder + Griffin-Lim",
                 "width": spec.dec_width, "layers": spec.dec_layers, "kmeans_frames": spec.kmeans_frames,
                 "kmeans_iters": spec.kmeans_iters, "decoder_steps": spec.dec_steps,
                 "codebook_usage": round(float((counts > 0).float().mean()), 4),
                 "code_perplexity": round(perplexity, 2), "heldout_logmel_mse": figure(recon_mse),
                 "griffin_lim_iters": codec_mod.GL_ITERS, "last_logs": {k: figure(v) for k, v in codec_logs.items()}}
    data_meta = {"source": "sentences of 3-9 plain words from the Python standard library's docstrings "
                           "and language reference (genrefine.modalities.speech.data)",
                 "synthesizer": "Debian flite", "voices": list(VOICES), "rates": list(RATES),
                 "utterances": n_train, "heldout": len(seqs) - n_train, "seed": seed,
                 "audio_seconds": round(float(data["offsets"][n_train]) / (codec_mod.SAMPLE_RATE / codec_mod.HOP), 1)}
    training = {"seed": seed, "transformer": {"hidden": spec.hidden, "layers": spec.layers, "heads": spec.heads,
                                              "intermediate": spec.intermediate, "steps": spec.tf_steps,
                                              "batch": spec.tf_batch, "lr": spec.tf_lr,
                                              "heldout_code_nll": figure(held_nll),
                                              "last_loss": figure(tf_logs.get("loss"))},
                "cpu": cpu_model(), "torch": torch.__version__, "tiny": spec == TINY}
    from ..modalities.speech.bundle import save_bundle, speech_meta

    defaults = {"temperature": spec.temperature, "top_k": spec.top_k, "voice": VOICES[0], "rate": 1.0}
    meta = speech_meta(codebook_size=spec.codebook_size, defaults=defaults, codec=codec_cfg, data=data_meta,
                       training=training)
    save_bundle(out, meta, codec, model, layout)

    # ---- drafters: Medusa heads and EAGLE on the bundle's native model
    t = time.perf_counter()
    drafters = train_drafters(out, seqs[:n_train], spec, seed, ckdir, resume, progress, say)
    times["drafters_s"] = time.perf_counter() - t
    meta["training"]["drafters"] = drafters
    t = time.perf_counter()
    search = defaults_search(out, data["texts"][n_train:], spec, seed, say)
    if search:
        best = min(search, key=lambda r: (r["wer"], -r["temperature"]))
        meta["defaults"]["temperature"] = best["temperature"]
        meta["training"]["defaults_search"] = {
            "rule": "the temperature (top-k fixed) with the lowest WER of plain sampling on held-out "
                    "sentences, ties to the higher temperature", "results": search}
    times["defaults_s"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    meta["training"]["wall_seconds"] = {**{k: round(v, 1) for k, v in times.items()}, "total": round(seconds, 1)}
    (out / "speech.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(ckdir, ignore_errors=True)
    return SpeechTrainResult(out, meta, seconds, True, {"codec": codec_logs, "transformer": tf_logs})


def train_drafters(out: Path, seqs: list[Tensor], spec: SpeechTrainSpec, seed: int, ckdir: Path,
                   resume: bool, progress: bool, say) -> dict:
    """Medusa heads (``out/heads``), an EAGLE drafter (``out/eagle``) and a draft model
    (``out/draft``) for the bundle in ``out``, trained on the training sequences through the
    native model (:func:`genrefine.train.run.run_training`)."""
    from ..modalities.speech.api import load_speech
    from .run import DrafterSpec, run_training

    gen = load_speech(str(out))
    stream = torch.cat(seqs)
    info = {}
    for kind, steps in (("heads", spec.heads_steps), ("eagle", spec.heads_steps), ("draft", spec.heads_steps)):
        dspec = DrafterSpec(kind=kind, num_heads=spec.num_heads, topk=4, tree_nodes=16,
                            draft_vocab=gen.model.vocab_size, seq_len=spec.drafter_seq_len,
                            max_tokens=spec.drafter_tokens, layers=spec.draft_layers)
        cfg = TrainConfig(steps=steps, lr=spec.heads_lr, warmup=max(1, min(50, steps // 10)),
                          batch=spec.heads_batch, seed=seed, checkpoint_every=spec.checkpoint_every)
        d = out / kind
        res = run_training(gen.model, None, [], dspec, cfg, d, resume=resume, progress=progress, stream=stream,
                           source=str(out / "transformer"))
        for f in d.glob("checkpoint*"):
            f.unlink()
        shutil.rmtree(d / "init", ignore_errors=True)
        info[kind] = {"steps": steps, "tokens": int(min(len(stream), spec.drafter_tokens)),
                      "greedy_tokens_per_step": round(res.tokens_per_step, 3),
                      "greedy_same_as_ar": bool(res.ar_steps_equal), **res.extra}
        say(f"{kind}: {res.tokens_per_step:.2f} greedy tokens per step on held-back windows")
    return info


def defaults_search(out: Path, texts: list[str], spec: SpeechTrainSpec, seed: int, say) -> list[dict]:
    """WER of plain sampling (``ar``) on held-out ``texts`` at each temperature of
    ``spec.temperature_grid`` (the recognizer: :mod:`genrefine.modalities.speech.asr`); empty when
    the recognizer is not installed."""
    try:
        from ..modalities.speech.asr import Recognizer

        rec = Recognizer()
    except ConfigError as e:
        say(f"sampling defaults not searched ({e}); keeping temperature {spec.temperature}")
        return []
    from ..modalities.speech.api import load_speech
    from ..modalities.speech.quality import error_rates

    gen = load_speech(str(out))
    texts = texts[: spec.defaults_texts]
    results = []
    for temp in spec.temperature_grid:
        res = gen.generate(texts, method="ar", temperature=temp, top_k=spec.top_k, seed=seed * 7 + 11)
        hyps = [rec.transcribe(a, res.sample_rate) for a in res.audios]
        r = error_rates(texts, hyps)
        results.append({"temperature": temp, "top_k": spec.top_k, "wer": round(r["wer"], 4),
                        "cer": round(r["cer"], 4), "unfinished": res.summary()["unfinished"]})
        say(f"sampling at temperature {temp}: WER {r['wer']:.3f} on {len(texts)} held-out sentences")
    return results


__all__ = ["SpeechTrainSpec", "REAL", "TINY", "TokenLayout", "train_speech", "layout_for"]
