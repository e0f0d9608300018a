"""``genrefine speech generate|bench``: the speech modality (the embedded flite-trained model by
default)."""

from __future__ import annotations

import sys

from ..errors import GenrefineError
from .options import (
    check_method_names, modality_bench_command, modality_method_options, write_modality_bench,
)


def _common(p) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a speech bundle written by `genrefine train speech` (default: the embedded model)")
    p.add_argument("--no-tree-cut", dest="tree_cut", action="store_false",
                   help="the heads methods (medusa, vadusa, eagle): verify whole trees instead of "
                   "cutting them to what pays on this machine (measured forward times)")
    p.add_argument("--dtype", default="float32",
                   help="float32 (default: the bundle as trained) or q8_0 (its weights rounded to "
                   "Q8_0 when loaded and run on the exact integer kernels: faster on the CPU, a "
                   "slightly different model)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the bundle's; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="utterance i uses seed + i (default 0)")
    p.add_argument("--draft-len", type=int, default=None, help="largest draft per step (method default)")
    p.add_argument("--drafter", default=None, metavar="DIR",
                   help="a trained drafter's folder (default: the bundle's heads/ or eagle/)")
    p.add_argument("--tolerance", type=int, default=None,
                   help="vadusa: a drafted code is accepted when among the target's top-k (method default)")
    p.add_argument("--relax-k", type=int, default=None, help="lantern: latent neighbours per code")
    p.add_argument("--relax-delta", type=float, default=None,
                   help="lantern, gsd: total-variation budget per token (method default)")
    p.add_argument("--group-size", type=int, default=None,
                   help="pcg: codes per acoustic group; gsd: top tokens a code may be grouped with")
    p.add_argument("--group-similarity", type=float, default=None, help="gsd: latent cosine similarity a group needs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_speech_parser(sub) -> None:
    sp = sub.add_parser(
        "speech",
        help="text to speech as codec codes (vadusa, pcg and the lossless text methods) and measure it",
        description="Autoregressive text-to-speech on the same engine as text: a voice, a rate and "
        "the text's characters, then one codec code per 16 ms frame until the end token, decoded "
        "to 16 kHz audio.",
    )
    ssub = sp.add_subparsers(dest="speech_command", metavar="SUBCOMMAND")
    g = ssub.add_parser("generate", help="speak a text into a WAV file")
    g.add_argument("text", help="what to say (English words)")
    g.add_argument("--method", default="ar", help="a method of `genrefine methods` (default ar)")
    g.add_argument("--voice", default=None, help="one of the bundle's voices (default: its first)")
    g.add_argument("--rate", type=float, default=None, help="one of the bundle's rates (default 1.0; larger is slower)")
    g.add_argument("--out", required=True, metavar="WAV", help="where to write the audio")
    _common(g)
    b = ssub.add_parser("bench", help="speed and quality (WER, CER) of speech methods, one run")
    b.add_argument("--methods", default="ar,medusa,vadusa,pcg",
                   help="comma-separated methods (ar is always run, twice: the noise)")
    b.add_argument("--n", type=int, default=20, help="held-out sentences (default 20)")
    b.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    b.add_argument("--report", default=None, metavar="PATH", help="write the report as Markdown")
    b.add_argument("--plot", default=None, metavar="PNG", help="write bars and spectrograms as a figure")
    b.add_argument("--no-floor", action="store_true", help="skip the recognizer's floor on flite's own audio")
    _common(b)


def _options(args):
    names = ("tolerance", "relax_k", "relax_delta", "group_size", "group_similarity")
    return modality_method_options(args, names, draft_len=args.draft_len, drafter=args.drafter,
                                   tree_cut=args.tree_cut)


def cmd_speech(args) -> int:
    from ..modalities.speech.api import load_speech

    if args.speech_command is None:
        raise GenrefineError("say what to do: `genrefine speech generate` or `genrefine speech bench`")
    options = _options(args)
    if args.speech_command == "generate":
        from ..modalities.speech.quality import write_wav

        check_method_names([args.method])
        if not args.out.lower().endswith(".wav"):
            raise GenrefineError(f"--out must name a .wav file, got {args.out!r}")
        gen = load_speech(args.model, dtype=args.dtype)
        res = gen.generate(args.text, method=args.method, temperature=args.temperature, top_k=args.top_k,
                           seed=args.seed, voice=args.voice, rate=args.rate, options=options)
        write_wav(args.out, res.audio, res.sample_rate)
        s = res.summary()
        rate = "–" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.2f}"
        end = "" if res.finished[0] else " (stopped at the frame limit before the end token)"
        print(f"{args.out}: {s['audio_seconds']:.2f} s of audio with {res.method}{end}, "
              f"{s['steps_per_second_of_audio']:.1f} target forwards per second of audio, "
              f"{s['tokens_per_step']:.2f} tokens/step, acceptance {rate}, "
              f"{s['generation_seconds']:.2f} s generating")
        return 0
    from ..modalities.speech.bench import json_report, markdown_report, plot_report, run_speech_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_method_names(methods)
    if args.n < 1:
        raise GenrefineError(f"--n must be >= 1, got {args.n}")
    gen = load_speech(args.model, dtype=args.dtype)
    from tqdm import tqdm

    total = (len(set(["ar", *methods])) + 1) * args.n
    with tqdm(total=total, desc="speech bench", unit="utt", disable=args.no_progress, file=sys.stderr) as bar:
        report = run_speech_bench(gen, methods, args.n, seed=args.seed, temperature=args.temperature,
                                  top_k=args.top_k, options=options, floor=not args.no_floor,
                                  progress=bar.update)
    head = ["speech", "bench", "--methods", ",".join(methods), "--n", str(args.n), "--seed", str(args.seed)]
    report["command"] = modality_bench_command(
        args, head, ("model", "temperature", "top_k", "draft_len", "drafter", "tolerance", "relax_k",
                     "relax_delta", "group_size", "group_similarity"))
    write_modality_bench(args, report, markdown_report(report, report["command"]), plot_report,
                         json_report(report))
    return 0
