"""An OpenAI-compatible server with continuous batching (``genrefine serve``).

    app.py        FastAPI routes, request bodies and their validation, SSE streaming
    scheduler.py  the worker thread that owns the model and decodes requests in batches
    metrics.py    counters in the Prometheus text format
    playground/   the page served at / (plain HTML, JS and CSS: no build step)

Needs the ``serve`` extra (``pip install genrefine[serve]``: FastAPI and uvicorn).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from collections.abc import Callable

from ..errors import GenrefineError
from .scheduler import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve", "bind"]


def _need_extras() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GenrefineError(
            f"the server needs FastAPI and uvicorn ({e.name} is missing): "
            "pip install 'genrefine[serve]'"
        ) from e


def create_app(generator, config: ServerConfig | None = None, warm: bool = True, image=None, speech=None):
    """The FastAPI app for a loaded :class:`genrefine.Generator` (see ``app.create_app``);
    ``image``: a loaded image model for ``POST /v1/images/generations``; ``speech``: a loaded
    speech model for ``POST /v1/audio/speech``."""
    _need_extras()
    from .app import create_app as _create

    return _create(generator, config, warm=warm, image=image, speech=speech)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); a clear error when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GenrefineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)  # connections queue from now on, before uvicorn serves them
    sock.set_inheritable(True)
    return sock


def serve(
    generator,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    announce: Callable[[str], None] | None = None,
    log_level: str = "warning",
    image=None,
    speech=None,
) -> None:
    """Serve until Ctrl-C or SIGTERM; then finish the requests in flight and return.

    ``announce`` receives one line with the address once the server listens.
    """
    _need_extras()
    import uvicorn

    app = create_app(generator, config, image=image, speech=speech)
    sock = bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None, lifespan="on")
    )
    say = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    c = config
    say(
        f"genrefine: serving {generator.name} on http://{shown}:{bound[1]} (method {c.method}, "
        f"max batch {c.max_batch}, queue {c.max_queue}, batched forward "
        f"{'on' if app.state.server.scheduler.batched else 'off: one forward per sequence'}); "
        "Ctrl-C stops after the requests in flight"
    )
    # uvicorn catches SIGINT/SIGTERM, drains, then re-raises the signal to the handler that was
    # there before it: make that one a no-op so a drained server exits with status 0
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, f: None)
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
