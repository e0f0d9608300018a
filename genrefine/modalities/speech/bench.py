"""``genrefine speech bench``: speed and quality of speech methods on the same texts and seeds.

Every method speaks the same ``n`` held-out sentences (never trained on:
:func:`~genrefine.modalities.speech.data.split_sentences`), utterance ``i`` with seed ``seed + i``,
interleaved text by text so that a slow spell of the machine hits every method alike. ``ar`` runs
twice, the second time with other seeds: the distance between its two runs is the noise a
quality difference must exceed. Quality: the offline recognizer
(:mod:`genrefine.modalities.speech.asr`) transcribes every utterance; WER and CER against the input
text, and the spectral distance of each utterance to ``ar``'s for the same seed. The recognizer's
own WER on flite's original audio of the same texts is the floor.

Speed: ``speedup`` is ``ar``'s generation seconds over the method's (the engine's time; decoding
codes to audio costs every method the same and is left out), ``forward_reduction`` is ``ar``'s
target forwards per second of audio over the method's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...diskcache import cpu_model
from ...errors import ConfigError
from ...registry import METHODS
from .data import split_sentences

AR_NOISE = "ar (other seeds)"
NOISE_SEED_OFFSET = 1_000_003


def bench_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out sentences, drawn with ``seed`` (sorted by length for steady batches)."""
    _, held = split_sentences()
    if n > len(held):
        raise ConfigError(f"only {len(held)} held-out sentences exist: ask for at most that many")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(held), n, replace=False)
    return [held[i] for i in sorted(pick.tolist())]


def run_speech_bench(gen, methods: list[str], n: int, *, seed: int = 0, temperature=None, top_k=None,
                     options=None, recognizer=None, floor: bool = True,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Run the bench (module docstring) and return the report as a dict."""
    from .quality import error_rates, spectral_distance

    if recognizer is None:
        from .asr import Recognizer

        recognizer = Recognizer()
    names = ["ar"] + [m for m in dict.fromkeys(methods) if m != "ar"]
    texts = bench_texts(n, seed)
    runs = {m: [] for m in names + [AR_NOISE]}
    for i, text in enumerate(texts):
        for m in names + [AR_NOISE]:
            method = "ar" if m == AR_NOISE else m
            s = seed + i + (NOISE_SEED_OFFSET if m == AR_NOISE else 0)
            runs[m].append(gen.generate(text, method=method, temperature=temperature, top_k=top_k,
                                        seed=s, options=options))
            if progress is not None:
                progress(1)
    report: dict = {"texts": texts, "n": n, "seed": seed, "methods": {}, "cpu": cpu_model(),
                    "weights": gen.model.weights_format,
                    "temperature": gen.default_temperature if temperature is None else temperature,
                    "top_k": gen.default_top_k if top_k is None else top_k}
    ar_audio = [r.audio for r in runs["ar"]]
    transcripts = {}
    for m, results in runs.items():
        audios = [r.audio for r in results]
        hyps = [recognizer.transcribe(a, gen.sample_rate) for a in audios]
        transcripts[m] = hyps
        rates = error_rates(texts, hyps)
        summ = _merge([r.summary() for r in results])
        spec_d = float(np.mean([spectral_distance(a, b, gen.sample_rate) for a, b in zip(audios, ar_audio)]))
        lossless = True if m in ("ar", AR_NOISE) else bool(getattr(METHODS.get(m), "lossless", False))
        report["methods"][m] = {**summ, "lossless": lossless, "wer": rates["wer"], "cer": rates["cer"],
                                "spectral_distance": spec_d}
    ar = report["methods"]["ar"]
    for m, row in report["methods"].items():
        row["speedup"] = ar["generation_seconds"] / row["generation_seconds"] if row["generation_seconds"] else 0.0
        row["forward_reduction"] = (ar["steps_per_second_of_audio"] / row["steps_per_second_of_audio"]
                                    if row["steps_per_second_of_audio"] else 0.0)
    noise = report["methods"].pop(AR_NOISE)
    report["noise"] = {"wer": noise["wer"], "cer": noise["cer"], "spectral_distance": noise["spectral_distance"],
                       "wer_difference": noise["wer"] - ar["wer"], "speedup": noise["speedup"]}
    if temperature == 0 or (temperature is None and gen.default_temperature == 0):
        report["same_codes_as_ar"] = {m: sum(a.codes == b.codes for a, b in zip(runs[m], runs["ar"]))
                                      for m in names}
    # pcg drafts with the draft model when the bundle has one (sps's drafter, exact acceptance),
    # else with mc-sjd's: its acceptance over that method's is what the group rule buys
    same = "sps" if getattr(gen.method("pcg", options).drafters[0], "name", "") == "draft-model" else "mc-sjd"
    ex = report["methods"].get(same, {}).get("acceptance_rate")
    if ex and report["methods"].get("pcg", {}).get("acceptance_rate") is not None:
        report["pcg_acceptance_over_exact"] = report["methods"]["pcg"]["acceptance_rate"] / ex
        report["pcg_exact_counterpart"] = same
    if floor:
        from .asr import recognizer_floor

        report["recognizer_floor"] = recognizer_floor(texts, recognizer=recognizer)
        report["codec_floor"] = codec_floor(gen, texts, recognizer)
    report["transcripts"] = {m: transcripts[m][:5] for m in transcripts}
    report["examples"] = {m: runs[m][0].audio for m in names}  # for the plot; dropped from JSON
    return report


def codec_floor(gen, texts: list[str], recognizer) -> dict:
    """The recognizer's error rates on flite's audio of ``texts`` passed through the bundle's
    codec (encoded, decoded): the best the speech model's codes can sound. Text ``i`` in voice
    ``i % 3`` at rate 1, as the recognizer's floor."""
    from .data import VOICES, synthesize
    from .quality import error_rates

    hyps = []
    for i, text in enumerate(texts):
        audio = synthesize(text, VOICES[i % len(VOICES)], 1.0)
        codes = gen.bundle.codec.encode(audio)
        hyps.append(recognizer.transcribe(gen.bundle.codec.decode(codes), gen.sample_rate))
    return {**error_rates(texts, hyps), "transcripts": hyps[:5]}


def _merge(summaries: list[dict]) -> dict:
    """One summary over several calls' summaries (sums, then ratios)."""
    audio = sum(s["audio_seconds"] for s in summaries)
    gen_s = sum(s["generation_seconds"] for s in summaries)
    steps = sum(s["steps_per_second_of_audio"] * s["audio_seconds"] for s in summaries)
    drafted = sum(s["drafted"] for s in summaries)
    accepted = sum(s["accepted"] for s in summaries)
    dsteps = sum(s["steps"] for s in summaries)
    return {
        "utterances": sum(s["utterances"] for s in summaries), "audio_seconds": audio,
        "generation_seconds": gen_s, "seconds": sum(s["seconds"] for s in summaries),
        "steps_per_second_of_audio": steps / audio if audio else 0.0,
        "tokens_per_step": sum(s["decode_tokens"] for s in summaries) / dsteps if dsteps else 1.0,
        "acceptance_rate": accepted / drafted if drafted else None,
        "drafted": drafted, "accepted": accepted,
        "real_time_factor_generation": audio / gen_s if gen_s else 0.0,
        "unfinished": sum(s["unfinished"] for s in summaries),
    }


def json_report(report: dict) -> dict:
    """The report without the example audio (JSON-friendly)."""
    return {k: v for k, v in report.items() if k != "examples"}


def markdown_report(report: dict, command: str) -> str:
    """The bench table as Markdown."""
    lines = [f"Speech bench: {report['n']} held-out sentences, temperature {report['temperature']}, "
             f"top-k {report['top_k']}, seed {report['seed']}, weights "
             f"{report.get('weights', 'float32')}; CPU: {report['cpu']}", "",
             f"`{command}`", "",
             "| method | lossless | speedup (generation) | fewer target forwards | forwards / s of audio "
             "| tokens/step | acceptance | WER | CER | spectral distance to ar (dB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in report["methods"].items():
        acc = "–" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        lines.append(f"| `{m}` | {'yes' if r['lossless'] else 'no'} | {r['speedup']:.2f}x | "
                     f"{r['forward_reduction']:.2f}x | {r['steps_per_second_of_audio']:.1f} | "
                     f"{r['tokens_per_step']:.2f} | {acc} | {100 * r['wer']:.1f}% | {100 * r['cer']:.1f}% | "
                     f"{r['spectral_distance']:.2f} |")
    nz = report["noise"]
    lines += ["", f"Noise (`ar` with other seeds): WER {100 * nz['wer']:.1f}% (difference to `ar` "
              f"{100 * nz['wer_difference']:+.1f} points), CER {100 * nz['cer']:.1f}%, spectral distance "
              f"to `ar` {nz['spectral_distance']:.2f} dB."]
    fl = report.get("recognizer_floor")
    if fl:
        lines.append(f"Recognizer floor (flite's own audio of the same texts): WER {100 * fl['wer']:.1f}%, "
                     f"CER {100 * fl['cer']:.1f}%.")
    cf = report.get("codec_floor")
    if cf:
        lines.append(f"Codec floor (that audio through the codec, encoded and decoded): WER {100 * cf['wer']:.1f}%, "
                     f"CER {100 * cf['cer']:.1f}%.")
    if report.get("pcg_acceptance_over_exact"):
        lines.append(f"pcg's acceptance over exact acceptance with the same drafter "
                     f"({report.get('pcg_exact_counterpart', 'mc-sjd')}): "
                     f"{report['pcg_acceptance_over_exact']:.2f}x.")
    same = report.get("same_codes_as_ar")
    if same:
        lines.append("Same codes as `ar` (greedy): " + ", ".join(f"{m} {v}/{report['n']}" for m, v in same.items()))
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str) -> None:
    """Speed and WER bars, and a spectrogram of the first utterance per method, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .codec import log_mel

    names = list(report["methods"])
    ex = report.get("examples", {})
    rows = 1 + len(ex)
    fig = plt.figure(figsize=(10, 3 + 1.6 * len(ex)))
    ax1 = fig.add_subplot(rows, 2, 1)
    ax1.bar(names, [report["methods"][m]["forward_reduction"] for m in names], color="tab:blue",
            label="fewer target forwards")
    ax1.bar(names, [report["methods"][m]["speedup"] for m in names], color="tab:orange", width=0.4,
            label="wall-clock speedup")
    ax1.set_ylabel("x over ar")
    ax1.legend(fontsize=7)
    ax1.tick_params(axis="x", labelsize=7)
    ax2 = fig.add_subplot(rows, 2, 2)
    ax2.bar(names, [100 * report["methods"][m]["wer"] for m in names], color="tab:green")
    ax2.axhline(100 * report["noise"]["wer"], color="grey", ls="--", lw=1, label="ar, other seeds")
    fl = report.get("recognizer_floor")
    if fl:
        ax2.axhline(100 * fl["wer"], color="black", ls=":", lw=1, label="flite's audio")
    ax2.set_ylabel("WER %")
    ax2.legend(fontsize=7)
    ax2.tick_params(axis="x", labelsize=7)
    for j, (m, audio) in enumerate(ex.items()):
        ax = fig.add_subplot(rows, 1, 2 + j)
        if len(audio):
            ax.imshow(log_mel(audio).T.numpy(), origin="lower", aspect="auto", cmap="magma")
        ax.set_ylabel(m, fontsize=8)
        ax.set_yticks([])
    fig.suptitle(f"\"{report['texts'][0]}\"", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["bench_texts", "run_speech_bench", "markdown_report", "plot_report", "json_report"]
