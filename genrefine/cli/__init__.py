"""The ``genrefine`` command line. Nothing else in the package reads ``sys.argv``.

One module per group of subcommands, each with an ``add_*_parser(sub)`` that declares its options
and a ``cmd_*(args)`` that runs it: :mod:`.generate` (generate, demo), :mod:`.batch`, :mod:`.bench`,
:mod:`.train`, :mod:`.serve`, :mod:`.image` (image generate, bench), :mod:`.speech` (speech
generate, bench), :mod:`.export` (drafters for other engines), :mod:`.tools` (methods, index,
draft-model); the option groups and the checks made before a model is loaded are in
:mod:`.options`. :func:`main` turns a
:class:`~genrefine.errors.GenrefineError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GenrefineError
from . import batch, bench, export, generate, image, serve, speech, tools, train
from .options import version


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genrefine",
        description=(
            "Faster generation without changing the output: a cheap drafter proposes tokens, "
            "the model verifies them all in one forward pass."
        ),
    )
    p.add_argument("--version", action="version", version=f"genrefine {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_generate_parser(sub)
    generate.add_demo_parser(sub)
    batch.add_batch_parser(sub)
    bench.add_bench_parser(sub)
    tools.add_index_parser(sub)
    tools.add_draft_model_parser(sub)
    train.add_train_parser(sub)
    serve.add_serve_parser(sub)
    image.add_image_parser(sub)
    speech.add_speech_parser(sub)
    tools.add_methods_parser(sub)
    export.add_export_parser(sub)
    return p


HANDLERS = {
    "generate": generate.cmd_generate,
    "demo": generate.cmd_demo,
    "methods": tools.cmd_methods,
    "batch": batch.cmd_batch,
    "bench": bench.cmd_bench,
    "index": tools.cmd_index,
    "serve": serve.cmd_serve,
    "draft-model": tools.cmd_draft_model,
    "train": train.cmd_train,
    "image": image.cmd_image,
    "speech": speech.cmd_speech,
    "export": export.cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``genrefine`` command line on ``argv`` (default ``sys.argv[1:]``); returns the
    exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return HANDLERS[args.command](args)
    except GenrefineError as e:
        print(f"genrefine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngenrefine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
