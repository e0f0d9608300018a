"""Options and checks shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import GenrefineError


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="local Hugging Face directory or .gguf file (default: the embedded Gemma 3 270M)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto (for GGUF files on the CPU: their own quantized weights or bfloat16, the faster here, measured once; else bfloat16), gguf (the file's quantized weights, exact integer kernels), q8_0 (a Hugging Face checkpoint's weights rounded to Q8_0 at load, same kernels), float32, bfloat16, float16",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda")
    g.add_argument(
        "--backend",
        default="native",
        help="native (default: the PyTorch runtime), llama.cpp (GGUF files; needs "
        "pip install 'genrefine[llamacpp]'), hf (the transformers adapter), auto (the faster of "
        "native and llama.cpp for this model here, measured once)",
    )


def add_draft_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH",
        help="method sps (and bench's hf_assisted): the draft model, a Hugging Face directory or "
        ".gguf file, loaded with the target's dtype and device; best with the target's "
        "tokenizer (another tokenizer is bridged through text)",
    )


def add_drafter_option(p) -> None:
    p.add_argument(
        "--drafter",
        default=None,
        metavar="DIR",
        help="bpd, bpd+ngram, bpd+lm, medusa, eagle: a drafter trained with `genrefine train` "
        "(default: the one shipped for the embedded model)",
    )


def add_generation_options(p: argparse.ArgumentParser) -> None:
    from ..methods.base import MethodOptions
    from ..registry import method_names

    g = p.add_argument_group("generation")
    g.add_argument(
        "--method",
        default="ar",
        help=f"one of {', '.join(method_names())} (see `genrefine methods`); default ar",
    )
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (repeatable runs)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--draft-len", type=int, default=None, help="largest draft per step (method default)")
    g.add_argument(
        "--acceptance",
        default="exact",
        choices=["exact", "typical"],
        help="sampling acceptance: exact (lossless, default) or typical (Medusa's, lossy)",
    )
    g.add_argument("--datastore", default=None,
                   help="rest: a datastore built by `genrefine index build` (default: none, "
                   "drafts from the context and earlier outputs)")
    g.add_argument("--exit-layer", type=int, default=None,
                   help="early-exit-draft: how many layers the draft runs")
    g.add_argument("--calm-threshold", type=float, default=0.9,
                   help="calm (lossy): exit at an earlier layer once the top probability passes "
                   "this (default 0.9; 1.0 never exits early)")
    g.add_argument("--draft-vocab", type=int, default=None,
                   help="self-drafting, trained methods and sps: project drafts onto the N most "
                   "frequent tokens (default for early-exit-draft, swift and sps: 32768 when the "
                   "vocabulary has over 65536 tokens; for trained drafters: 8192 of the tokens "
                   "they were trained on; a number >= the vocabulary size means all)")
    g.add_argument("--tolerance", type=int, default=MethodOptions.tolerance,
                   help="vadusa (lossy): under sampling, accept a drafted token that is among the "
                   f"target's top N at its position (default {MethodOptions.tolerance}; 1: the "
                   "most likely only)")
    g.add_argument("--no-tree-cut", dest="tree_cut", action="store_false",
                   help="trained methods (and pld, rest on llama.cpp): verify whole drafts "
                   "instead of cutting them to what pays on this machine (measured forward times)")
    add_draft_model_option(g)
    add_drafter_option(g)


def version() -> str:
    from .. import __version__

    return __version__


def read_prompt(arg: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise GenrefineError("the prompt is empty: give some text (or - to read it from stdin)")
    return text


def method_options(args):
    from ..methods.base import MethodOptions

    return MethodOptions(
        draft_len=args.draft_len,
        acceptance=args.acceptance,
        datastore=args.datastore,
        exit_layer=args.exit_layer,
        calm_threshold=args.calm_threshold,
        draft_vocab=args.draft_vocab,
        draft_model=args.draft_model,
        drafter=args.drafter,
        tree_cut=args.tree_cut,
        tolerance=args.tolerance,
    )


def validate_before_load(args, methods: list[str]) -> None:
    """Catch user mistakes before spending seconds on loading a model."""
    from ..models.loading import (
        check_backend,
        resolve_backend,
        resolve_device,
        resolve_dtype,
        resolve_source,
    )
    from ..registry import METHODS

    check_method_names(methods)
    if getattr(args, "max_new_tokens", 1) < 1:
        raise GenrefineError("--max-new-tokens must be a positive integer")
    dev = resolve_device(args.device)
    resolve_dtype(args.dtype, dev)
    if args.model is not None:
        resolve_source(args.model)
    backend = resolve_backend(getattr(args, "backend", None))
    if backend == "llama.cpp":
        check_backend(backend, resolve_source(args.model))
    if backend in ("llama.cpp", "hf"):
        for m in methods:
            if m in METHODS and METHODS[m].native_only:
                raise GenrefineError(
                    f"method {m} needs the native runtime ({METHODS[m].native_reason}); the "
                    f"{backend} backend runs the whole model only: use --backend native"
                )
    draft = getattr(args, "draft_model", None)
    needs = [m for m in methods if METHODS[m].needs_draft_model]
    if needs and draft is None:
        raise GenrefineError(
            f"method {needs[0]} needs a draft model: add --draft-model PATH (a smaller model, "
            "best with the same tokenizer; `genrefine draft-model shrink` cuts one from the target)"
        )
    if draft is not None:
        resolve_source(draft)
    store = getattr(args, "datastore", None)
    if store is not None and not Path(store).is_file():
        raise GenrefineError(
            f"datastore {store!r} does not exist: build one with "
            "`genrefine index build DIR --out FILE`"
        )


def modality_method_options(args, names: tuple[str, ...], **fixed):
    """The MethodOptions of the image and speech commands: ``fixed`` plus each option of ``names``
    the user gave (``--relax-k`` etc.), refused with one line when this version lacks it."""
    from ..methods.base import MethodOptions

    fields = MethodOptions.__dataclass_fields__
    kw = dict(fixed)
    for name in names:
        v = getattr(args, name)
        if v is not None:
            if name not in fields:
                raise GenrefineError(f"--{name.replace('_', '-')} is not supported by this version")
            kw[name] = v
    return MethodOptions(**kw)


def check_method_names(names: list[str]) -> None:
    """A one-line error for a method name ``genrefine methods`` does not list."""
    from ..registry import METHODS

    for m in names:
        if m not in METHODS:
            raise GenrefineError(f"unknown method {m!r}: choose one of {', '.join(METHODS)}")


def modality_bench_command(args, head: list[str], flags: tuple[str, ...]) -> str:
    """The command line that reruns an image or speech bench: ``head`` (the subcommand and its
    fixed arguments), ``--dtype`` unless float32, ``--no-tree-cut`` where asked, then each of
    ``flags`` (argparse names) the user set."""
    from ..bench.runner import command_line

    argv = list(head)
    if args.dtype != "float32":
        argv += ["--dtype", args.dtype]
    if not getattr(args, "tree_cut", True):
        argv += ["--no-tree-cut"]
    for flag in flags:
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    return command_line(argv)


def write_modality_bench(args, report: dict, md: str, plot, payload: dict | None = None) -> None:
    """Write a modality bench's ``--json`` (``payload``, default ``report``), ``--report``
    (``md``) and ``--plot`` (``plot(report, path)``) where asked, then print the report."""
    import json

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report if payload is None else payload, f, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            f.write(md)
    if args.plot:
        plot(report, args.plot)
    print(md)
