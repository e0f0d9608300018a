"""``genrefine serve``: the OpenAI-compatible server (:mod:`genrefine.server`)."""

from __future__ import annotations

import sys

from ..errors import GenrefineError
from .options import add_model_options, validate_before_load


DESCRIPTION = (
    "Serve POST /v1/completions and /v1/chat/completions (streaming with stream: true), "
    "GET /v1/models, /health and /metrics, a playground page at / (and POST /v1/images/generations with --image-model, POST /v1/audio/speech with --speech-model). Requests that arrive together are decoded together, "
    "one target forward per step for the whole batch; a request may pick its method with the "
    "extra body field \"method\". Ctrl-C or SIGTERM stops after the requests in flight."
)


def add_serve_parser(sub) -> None:
    summary = "serve an OpenAI-compatible API with continuous batching"
    sv = sub.add_parser("serve", help=summary, description=DESCRIPTION)
    add_model_options(sv)
    from ..registry import method_names

    s = sv.add_argument_group("serving")
    s.add_argument("--method", default="auto",
                   help=f"default method of requests that name none: one of "
                   f"{', '.join(method_names())} (default auto)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting for a slot; more are answered 429 (default 32)")
    s.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for (default 4096)")
    s.add_argument("--batching", default="auto", choices=["auto", "always", "never"],
                   help="one forward for the whole batch: auto (when the model is bitwise exact, "
                   "bfloat16 with batch-invariant matmuls; else one forward per sequence), "
                   "always, never")
    s.add_argument("--draft-len", type=int, default=None, help="largest draft per step (method default)")
    s.add_argument("--datastore", default=None,
                   help="rest: a datastore built by `genrefine index build` (requests cannot "
                   "name files)")
    s.add_argument("--image-model", default="none", metavar="DIR|embedded|none",
                   help="also serve POST /v1/images/generations with this image bundle "
                   "(`embedded`: the shipped glyph model; default none)")
    s.add_argument("--speech-model", default="none", metavar="DIR|embedded|none",
                   help="also serve POST /v1/audio/speech with this speech bundle "
                   "(`embedded`: the shipped flite-trained model; default none)")
    s.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info shows every request; default warning)")


def cmd_serve(args) -> int:
    from ..api import load
    from ..methods.base import MethodOptions
    from ..server import ServerConfig, _need_extras, serve

    _need_extras()
    if not 0 <= args.port <= 65535:
        raise GenrefineError(f"--port must be between 0 and 65535, got {args.port}")
    config = ServerConfig(
        method=args.method,
        options=MethodOptions(draft_len=args.draft_len, datastore=args.datastore),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batching=args.batching,
        max_tokens_limit=args.max_tokens_limit,
    )
    validate_before_load(args, [args.method])
    if args.backend in ("llama.cpp", "llamacpp", "auto") and args.max_batch > 1:
        raise GenrefineError(  # a llama.cpp context holds one live KV cache (models/llamacpp.py)
            f"--backend {args.backend} may serve on llama.cpp, which decodes one request at a "
            "time: add --max-batch 1 (or use --backend native)"
        )
    image = None
    if args.image_model != "none":
        from ..modalities.image.api import load_image
        from ..modalities.image.janus import is_janus_dir

        if is_janus_dir(args.image_model):
            raise GenrefineError("the image route serves class-conditional image bundles; a Janus "
                                 "model runs through `genrefine image generate --prompt` and the API")
        image = load_image(None if args.image_model == "embedded" else args.image_model)
    speech = None
    if args.speech_model != "none":
        from ..modalities.speech.api import load_speech

        speech = load_speech(None if args.speech_model == "embedded" else args.speech_model)
    gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    serve(gen, config, host=args.host, port=args.port, log_level=args.log_level, image=image,
          speech=speech)
    print("genrefine: server stopped", file=sys.stderr)
    return 0
