"""``genrefine batch``: generate over a JSONL file, serially or on Ray Data."""

from __future__ import annotations

import sys

from .options import (
    add_generation_options,
    add_model_options,
    method_options,
    validate_before_load,
)


def add_batch_parser(sub) -> None:
    b = sub.add_parser(
        "batch",
        help="generate for every line of a JSONL file (resumable; serial or on Ray)",
        description=(
            "Read INPUT (one JSON object a line: id, and prompt or chat messages; optional "
            "max_new_tokens, temperature, seed, method, meta), append one result a line to OUT "
            "as each finishes. A rerun skips the ids already in OUT. Bad lines are reported "
            "with their line number and skipped; the exit status is then 1. Sampled lines "
            "without a seed use one derived from --seed (default 0) and their id."
        ),
    )
    b.add_argument("input", metavar="INPUT", help="the input JSONL file")
    b.add_argument("--out", required=True, metavar="OUT", help="the output JSONL file (appended)")
    b.add_argument(
        "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
        help="run on Ray Data: a local Ray instance, or the cluster at ADDRESS (e.g. auto, "
        "ray://head:10001); needs pip install 'genrefine[ray]'",
    )
    b.add_argument("--num-actors", type=int, default=1,
                   help="--ray: actors, each with a model of its own (default 1)")
    b.add_argument("--num-cpus", type=int, default=None,
                   help="--ray without ADDRESS: CPUs of the local Ray instance (default: one per actor)")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    add_model_options(b)
    add_generation_options(b)


def cmd_batch(args) -> int:
    from ..batch import BatchSettings, import_ray, read_input, run_batch, run_batch_ray
    from ..errors import ConfigError

    settings = BatchSettings(
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=0 if args.seed is None else args.seed,
        stop=tuple(args.stop or ()),
        options=method_options(args),
    )
    lines, _ = read_input(args.input)  # duplicate ids and a missing file: before loading
    methods = sorted({settings.method} | {ln.method for ln in lines if ln.method})
    validate_before_load(args, methods)
    if args.num_actors < 1:
        raise ConfigError(f"--num-actors must be >= 1, got {args.num_actors}")
    if args.ray is not None:
        import_ray()
        load_kwargs = {"model": args.model, "dtype": args.dtype, "device": args.device,
                       "backend": args.backend}
        summary = run_batch_ray(load_kwargs, args.input, args.out, settings,
                                address=args.ray or None, num_actors=args.num_actors,
                                num_cpus=args.num_cpus, progress=args.progress)
    else:
        from ..api import load

        gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
        summary = run_batch(gen, args.input, args.out, settings, progress=args.progress)
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 0 if summary.ok else 1
