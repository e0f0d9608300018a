"""Write the README's example WAV files: one held-out sentence spoken by flite, through the
codec, and by the embedded speech model with a few methods (the same seed).

    python benchmarks/speech_examples.py --out docs/audio
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/audio")
    p.add_argument("--methods", default="ar,pcg,vadusa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, default=0, help="which of bench_texts(8, seed) to speak")
    a = p.parse_args()

    import genrefine
    from genrefine.methods.base import MethodOptions
    from genrefine.modalities.speech.bench import bench_texts
    from genrefine.modalities.speech.data import synthesize
    from genrefine.modalities.speech.quality import write_wav

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tts = genrefine.load_speech()
    text = bench_texts(8, a.seed)[a.index]
    flite = synthesize(text, tts.bundle.meta["defaults"]["voice"], 1.0)
    write_wav(out / "flite.wav", flite)
    write_wav(out / "codec.wav", tts.bundle.codec.decode(tts.bundle.codec.encode(flite)))
    lines = [f"text: {text}", "flite.wav: flite's own audio", "codec.wav: flite's audio through the codec"]
    for m in a.methods.split(","):
        opts = MethodOptions(tolerance=5, group_size=16) if m in ("vadusa", "pcg") else None
        r = tts.generate(text, method=m, seed=a.seed, options=opts)
        write_wav(out / f"{m}.wav", r.audio, r.sample_rate)
        s = r.summary()
        lines.append(f"{m}.wav: the model with {m}{' (--tolerance 5 --group-size 16)' if opts else ''}, "
                     f"seed {a.seed}, {s['tokens_per_step']:.2f} tokens/step")
    (out / "README.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
