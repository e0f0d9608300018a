"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics.

Requests are validated here (types, ranges, the prompt against the context) and answered 400 with
an OpenAI-style error body when they are wrong; valid ones go to the :class:`Scheduler`, whose
worker decodes them in batches. A request may choose its method with the extra body field
``method`` (the openai client: ``extra_body={"method": "pld"}``); every other decoding option
is the operator's (no request can name a file). A streamed request may ask, with the extra field
``genrefine_provenance: true``, that each text chunk say where its tokens came from (a top-level
``genrefine`` object on the chunk: see :func:`_stream`); the playground page at ``/`` does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GenrefineError
from ..methods.base import MethodOptions
from ..types import SEED_RANGE, SamplingParams
from .metrics import Metrics
from .scheduler import Event, Job, QueueFull, Scheduler, ServerConfig, ShuttingDown

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's
DEFAULT_CHAT_TOKENS = 512  # /v1/chat/completions without max_tokens (capped by the context)
MAX_STOPS = 4
POLL_S = 0.5  # how often a waiting handler checks that its client is still there
MAX_BODY_BYTES = 16 << 20


# ---------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # strict: "12" is not a number; forbid: a misspelt field is an error, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None  # one model per server: any name is accepted
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # an extension, as in vLLM
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    method: str | None = None  # genrefine: the decoding method (default: the server's)
    genrefine_provenance: bool = False  # genrefine: stream chunks say which tokens were drafts
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # name, tool_call_id, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


MAX_IMAGES_PER_REQUEST = 16


class ImageRequest(_Body):
    """``POST /v1/images/generations``: ``prompt`` names a class of the image model (its name or
    index, e.g. "3"); genrefine's extra fields choose the method and the sampling."""

    prompt: str
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES_PER_REQUEST)] = 1
    model: str | None = None
    size: str | None = None  # must be the model's own size ("32x32") when given
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    method: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**62)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    cfg: Annotated[float, Field(ge=0.0, le=20.0)] | None = None


class SpeechRequest(_Body):
    """``POST /v1/audio/speech`` (OpenAI-shaped): ``input`` is the text to speak; ``voice`` one
    of the speech model's voices ("alloy" and OpenAI's other names map to its default voice);
    the response body is a WAV file. genrefine's extra fields choose the method and sampling."""

    input: Annotated[str, Field(min_length=1, max_length=4096)]
    model: str | None = None
    voice: str | None = None
    response_format: Literal["wav"] = "wav"
    speed: Annotated[float, Field(ge=0.25, le=4.0)] | None = None
    instructions: str | None = None
    method: str | None = None
    seed: Annotated[int, Field(ge=0, le=2**62)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None


# OpenAI's voice names: accepted, spoken with the model's default voice
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


class BadRequest(Exception):
    """A request the server will not run: answered 400 (or ``status``) with an OpenAI error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(e: BadRequest) -> JSONResponse:
    headers = {"retry-after": "1"} if e.status == 429 else None
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), e.status, headers=headers)


# ---------------------------------------------------------------------------- validation
def _parse(raw: bytes, model: type[BaseModel]):
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # drop the union members pydantic names in the location ("prompt.list[int].0" -> "prompt.0")
        loc = ".".join(str(p) for p in err["loc"] if not _union_tag(p))
        if err["type"] == "extra_forbidden":
            raise BadRequest(f"unrecognized request argument supplied: {loc}", loc) from e
        if err["type"] == "missing":
            raise BadRequest(f"missing required parameter: {loc}", loc) from e
        raise BadRequest(f"invalid value for {loc}: {err['msg']}", loc) from e


def _union_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _unsupported(req) -> None:
    """Fields OpenAI defines that this server accepts only at their neutral values."""
    checks = [
        ("n", req.n in (None, 1), "only n=1 is supported"),
        ("presence_penalty", not req.presence_penalty, "penalties are not supported"),
        ("frequency_penalty", not req.frequency_penalty, "penalties are not supported"),
        ("logit_bias", not req.logit_bias, "logit_bias is not supported"),
        ("logprobs", not getattr(req, "logprobs", None), "logprobs are not supported"),
        ("echo", not getattr(req, "echo", None), "echo is not supported"),
        ("best_of", getattr(req, "best_of", None) in (None, 1), "only best_of=1 is supported"),
        ("suffix", not getattr(req, "suffix", None), "suffix is not supported"),
        ("top_logprobs", not getattr(req, "top_logprobs", None), "logprobs are not supported"),
        ("tools", not getattr(req, "tools", None), "tools are not supported"),
    ]
    rf = getattr(req, "response_format", None)
    checks.append(("response_format", not rf or rf.get("type") == "text",
                   "only the text response format is supported"))
    for param, ok, message in checks:
        if not ok:
            raise BadRequest(message, param)


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"at most {MAX_STOPS} stop sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise BadRequest("stop sequences must not be empty", "stop")
    return stops


def _chat_messages(req: ChatRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise BadRequest(f"only text content is supported, got {part.type!r}",
                                     f"messages.{i}.content")
                texts.append(part.text)
            content = "".join(texts)
        out.append({"role": m.role, "content": content or ""})
    return out


# ---------------------------------------------------------------------------- the app
class Server:
    """The state behind the routes: the generator, its scheduler and the metrics."""

    def __init__(self, generator, config: ServerConfig) -> None:
        self.gen = generator
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(generator, config, self.metrics)
        self.model_name = generator.name
        self.created = int(time.time())

    # -------------------------------------------------------------- request -> job
    def _prompt_ids(self, req) -> list[int]:
        lock = self.scheduler.tokenizer_lock
        try:
            if isinstance(req, ChatRequest):
                messages = _chat_messages(req)
                with lock:
                    return self.gen.chat_prompt(messages)
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise BadRequest("one prompt per request (n=1): send several requests", "prompt")
                prompt = prompt[0]
            if isinstance(prompt, list):
                vocab = self.gen.model.vocab_size
                if any(not 0 <= t < vocab for t in prompt):
                    raise BadRequest(f"token ids must be in [0, {vocab})", "prompt")
            with lock:
                return self.gen.encode(prompt)
        except GenrefineError as e:
            raise BadRequest(str(e), "messages" if isinstance(req, ChatRequest) else "prompt") from e

    def make_job(self, req) -> Job:
        _unsupported(req)
        if req.genrefine_provenance and not req.stream:
            raise BadRequest("genrefine_provenance describes a stream's chunks: set stream to true",
                             "genrefine_provenance")
        method = req.method or self.config.method
        try:
            self.scheduler.check_method(method)
        except GenrefineError as e:
            raise BadRequest(str(e), "method") from e
        stops = _stops(req.stop)
        try:
            params = SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=req.top_k or 0,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed,
            )
        except GenrefineError as e:
            raise BadRequest(str(e)) from e
        ids = self._prompt_ids(req)
        context = self.gen.model.max_context
        if len(ids) >= context:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens but the model's context holds {context}: "
                "shorten the prompt", "messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded")
        room = context - len(ids)
        limit = self.config.max_tokens_limit
        max_tokens = req.max_tokens
        param = "max_tokens"
        if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            default = DEFAULT_CHAT_TOKENS if isinstance(req, ChatRequest) else DEFAULT_COMPLETION_TOKENS
            max_tokens = min(default, room, limit)
        elif not 1 <= max_tokens <= limit:
            raise BadRequest(f"{param} must be between 1 and {limit}, got {max_tokens}", param)
        elif max_tokens > room:
            raise BadRequest(
                f"the model's context holds {context} tokens, but {len(ids)} are in the prompt "
                f"and {param} asks for {max_tokens}: lower {param} or shorten the prompt", param,
                code="context_length_exceeded")
        return Job(ids, max_tokens, params, method, stops, provenance=req.genrefine_provenance)

    # -------------------------------------------------------------- running a job
    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        job.emit = emit
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            self.metrics.reject("queue_full")
            raise BadRequest(str(e), status=429, kind="rate_limit_error", code="queue_full") from e
        except ShuttingDown as e:
            self.metrics.reject("shutting_down")
            raise BadRequest(str(e), status=503, kind="server_error") from e
        return queue

    async def next_event(self, queue: asyncio.Queue, job: Job, client: "_Client") -> Event | None:
        """The job's next event; None when the client disconnected (the job is then cancelled).

        The client is checked every ``POLL_S`` seconds, whether or not events keep coming.
        """
        while True:
            wait = await client.wait_s()
            if wait is None:
                self.scheduler.cancel(job)
                return None
            try:
                return await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                continue

    def methods(self) -> dict:
        """``GET /v1/genrefine/methods``: every method, whether it is lossless and whether this
        server can run it (``reason`` says why not), and the server's default."""
        from ..registry import METHODS

        data = []
        for m in METHODS.values():
            try:
                self.scheduler.check_method(m.name)
                reason = None
            except GenrefineError as e:
                reason = str(e)
            data.append({"id": m.name, "object": "genrefine.method", "lossless": m.lossless,
                         "summary": m.summary, "available": reason is None, "reason": reason})
        return {"object": "list", "default": self.config.method, "data": data}

    def usage(self, job: Job, done: Event) -> dict:
        """OpenAI's usage fields, and ``speculative``: what speculation did for this request
        (the library's :class:`~genrefine.engine.Stats` of its generation)."""
        p, c = len(job.prompt_ids), done.completion_tokens
        out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if done.stats is not None:
            out["speculative"] = _speculative(done.stats)
        return out


# the playground page's files (genrefine/server/playground/), by name: a request names one of
# these, never a path
PLAYGROUND_FILES = {"index.html": "text/html; charset=utf-8",
                    "app.js": "text/javascript; charset=utf-8",
                    "style.css": "text/css; charset=utf-8"}


def _playground_file(name: str) -> Response:
    from importlib.resources import files

    body = files(__package__).joinpath("playground", name).read_bytes()
    return Response(body, media_type=PLAYGROUND_FILES[name], headers={"cache-control": "no-cache"})


class _Client:
    """Whether the HTTP client is still there, looked at no more often than every POLL_S."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.next_check = 0.0

    async def wait_s(self) -> float | None:
        """Seconds until the next look (None: the client has gone)."""
        now = asyncio.get_running_loop().time()
        if now >= self.next_check:
            self.next_check = now + POLL_S
            if await self.request.is_disconnected():
                return None
        return max(self.next_check - now, 0.01)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _speculative(s) -> dict:
    """A request's speculative figures: ``drafted`` draft tokens sent to verification (llama.cpp's
    ``draft_n``), ``accepted`` of them kept (``draft_n_accepted``), ``steps`` target forwards after
    the prefill, ``tokens_per_step`` tokens emitted per such forward, ``acceptance_rate``
    accepted / drafted (None when nothing was drafted), ``drafter_steps`` steps per drafter."""
    return {"method": s.method, "drafted": s.drafted, "accepted": s.accepted, "steps": s.steps,
            "tokens_per_step": s.tokens_per_step, "acceptance_rate": s.acceptance_rate,
            "drafter_steps": dict(s.drafter_steps)}


def _method_figures(ev: Event) -> dict | None:
    s = ev.stats
    if s is None:
        return None
    return {"method": s.method, "tokens_per_step": s.tokens_per_step,
            "acceptance_rate": s.acceptance_rate, "steps": s.steps}


def create_app(generator, config: ServerConfig | None = None, warm: bool = True,
               image=None, speech=None) -> FastAPI:
    """The FastAPI app serving ``generator`` (a :class:`genrefine.Generator`).

    ``image``: an :class:`~genrefine.modalities.image.api.ImageGenerator` for
    ``POST /v1/images/generations`` (None: that route answers that no image model is loaded).
    ``speech``: a :class:`~genrefine.modalities.speech.api.SpeechGenerator` for
    ``POST /v1/audio/speech`` (None: that route answers that no speech model is loaded).

    The scheduler's worker starts with the app and, on shutdown, finishes every request it has.
    ``warm`` builds the default method first (``auto`` measures its cost table once per machine;
    with batched forwards, their cost ``T_batch`` is measured once per machine too).
    """
    config = config or ServerConfig()
    server = Server(generator, config)
    if warm:
        server.scheduler.warm()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.scheduler.stop)

    app = FastAPI(title="genrefine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, e: BadRequest):
        return _error_response(e)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return JSONResponse(error_body(f"no such endpoint: {request.method} {request.url.path}",
                                       code="not_found"), 404)

    @app.exception_handler(405)
    async def _not_allowed(request: Request, e):
        return JSONResponse(error_body(f"method {request.method} not allowed on {request.url.path}",
                                       code="method_not_allowed"), 405)

    async def _start(request: Request, model: type[BaseModel]):
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise BadRequest(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", status=413)
            req = _parse(raw, model)
            job = server.make_job(req)
        except BadRequest:
            server.metrics.reject("bad_request")
            raise
        queue = server.submit(job, asyncio.get_running_loop())
        return req, job, queue

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, job, queue = await _start(request, CompletionRequest)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        name = server.model_name

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": None}]}

        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(server, request, job, queue, [], lambda t: chunk(t, None),
                           lambda f: chunk("", f), chunk("", None) | {"choices": []}, usage)
        text, done = await _collect(server, request, job, queue)
        body = chunk(text, done.finish_reason)
        body["usage"] = server.usage(job, done)
        body["genrefine"] = _method_figures(done)
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, job, queue = await _start(request, ChatRequest)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        name = server.model_name

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": name, "choices": [{"index": 0, "delta": delta,
                                                "finish_reason": finish, "logprobs": None}]}

        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [chunk({"role": "assistant", "content": ""}, None)]
            return _stream(server, request, job, queue, first, lambda t: chunk({"content": t}, None),
                           lambda f: chunk({}, f), chunk({}, None) | {"choices": []}, usage)
        text, done = await _collect(server, request, job, queue)
        body = {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": server.usage(job, done),
                "genrefine": _method_figures(done)}
        return JSONResponse(body)

    async def modality_job(request: Request, req_type, model, what: str, flag: str, make_job, lock):
        """Parse an image or speech request and run it on a worker thread, one at a time per
        modality (the text worker runs beside it); its result."""
        raw = await request.body()
        try:
            if len(raw) > MAX_BODY_BYTES:
                raise BadRequest(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", status=413)
            req = _parse(raw, req_type)
            if model is None:
                raise BadRequest(f"this server has no {what} model: start it with {flag}",
                                 status=404, code="not_found")
            run = make_job(model, req, config)
        except BadRequest:
            server.metrics.reject("bad_request")
            raise
        async with lock:
            try:
                return await asyncio.to_thread(run)
            except GenrefineError as e:
                raise BadRequest(str(e)) from e

    image_lock, speech_lock = asyncio.Lock(), asyncio.Lock()

    @app.post("/v1/images/generations")
    async def images(request: Request):
        res = await modality_job(request, ImageRequest, image, "image", "--image-model", _image_job, image_lock)
        return JSONResponse(_image_body(res))

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        res = await modality_job(request, SpeechRequest, speech, "speech", "--speech-model", _speech_job,
                                 speech_lock)
        return _speech_response(res)

    @app.get("/v1/genrefine/methods")
    async def methods():
        return server.methods()

    @app.get("/")
    async def playground():
        return _playground_file("index.html")

    @app.get("/playground/{name}")
    async def playground_asset(name: str):
        if name not in PLAYGROUND_FILES or name == "index.html":
            raise BadRequest(f"no such playground file: {name}", status=404, code="not_found")
        return _playground_file(name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.created, "owned_by": "genrefine"}]}

    @app.get("/health")
    async def health():
        s = server.scheduler
        return {"status": "ok", "model": server.model_name, "queue_depth": s.queue_depth,
                "in_flight": s.inflight}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _image_job(image, req: ImageRequest, config: ServerConfig):
    """Validate an image request against the loaded image model; a function that runs it."""
    from ..registry import METHODS

    if req.response_format != "b64_json":
        raise BadRequest("only response_format b64_json is served (no URLs: nothing is stored)",
                         "response_format")
    side = image.bundle.image_size
    if req.size is not None and req.size != f"{side}x{side}":
        raise BadRequest(f"this image model makes {side}x{side} images, not {req.size}", "size")
    method = req.method or "ar"
    if method not in METHODS:
        raise BadRequest(f"unknown method {method!r}: choose one of {', '.join(METHODS)}", "method")
    try:
        c = image.class_index(req.prompt.strip())
    except GenrefineError as e:
        raise BadRequest(f"{e} (the prompt names a class of the image model)", "prompt") from e
    options = MethodOptions(draft_len=config.options.draft_len) if config.options else None
    try:
        image.method(method, options)  # build errors are the request's (e.g. a missing drafter)
    except GenrefineError as e:
        raise BadRequest(str(e), "method") from e

    def run():
        return image.generate([c] * req.n, method=method, temperature=req.temperature,
                              top_k=req.top_k, cfg=req.cfg, seed=req.seed, options=options)

    return run


def _speech_job(speech, req: SpeechRequest, config: ServerConfig):
    """Validate a speech request against the loaded speech model; a function that runs it."""
    from ..modalities.speech.data import normalize_text
    from ..registry import METHODS

    method = req.method or "ar"
    if method not in METHODS:
        raise BadRequest(f"unknown method {method!r}: choose one of {', '.join(METHODS)}", "method")
    voice = None if req.voice is None or req.voice in OPENAI_VOICES else req.voice
    if voice is not None and voice not in speech.voices:
        raise BadRequest(f"unknown voice {req.voice!r}: one of {', '.join(speech.voices)} "
                         "(or an OpenAI voice name, spoken with the default voice)", "voice")
    rate = None
    if req.speed is not None:
        # OpenAI's speed (larger is faster) to the nearest of the model's rates (larger is slower)
        rate = min(speech.bundle.rates, key=lambda r: abs(1.0 / r - req.speed))
    try:
        speech.prompt(req.input, voice, rate)
        normalize_text(req.input)
    except GenrefineError as e:
        raise BadRequest(str(e), "input") from e
    options = MethodOptions(draft_len=config.options.draft_len) if config.options else None
    try:
        speech.method(method, options)  # build errors are the request's (e.g. a missing drafter)
    except GenrefineError as e:
        raise BadRequest(str(e), "method") from e

    def run():
        return speech.generate(req.input, method=method, temperature=req.temperature, top_k=req.top_k,
                               seed=req.seed, voice=voice, rate=rate, options=options)

    return run


def _speech_response(res) -> Response:
    """The utterance as a WAV body; genrefine's figures in ``x-genrefine-*`` headers."""
    import io
    import wave

    from ..modalities.speech.data import wav_bytes_pcm

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(res.sample_rate)
        w.writeframes(wav_bytes_pcm(res.audio))
    s = res.summary()
    acc = s["acceptance_rate"]
    headers = {"x-genrefine-method": s["method"],
               "x-genrefine-audio-seconds": f"{s['audio_seconds']:.3f}",
               "x-genrefine-target-forwards-per-second-of-audio": f"{s['steps_per_second_of_audio']:.2f}",
               "x-genrefine-tokens-per-step": f"{s['tokens_per_step']:.3f}",
               "x-genrefine-acceptance-rate": "" if acc is None else f"{acc:.4f}",
               "x-genrefine-finished": "true" if res.finished[0] else "false"}
    return Response(buf.getvalue(), media_type="audio/wav", headers=headers)


def _image_body(res) -> dict:
    import base64
    import io

    from PIL import Image

    data = []
    for img in res.images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        data.append({"b64_json": base64.b64encode(buf.getvalue()).decode("ascii")})
    s = res.summary()
    return {"created": int(time.time()), "data": data,
            "usage": {"images": s["images"],
                      "target_forwards": int(round(s["steps_per_image"] * s["images"]))},
            "genrefine": {k: s[k] for k in ("method", "images_per_s", "steps_per_image",
                                            "tokens_per_step", "acceptance_rate")}}


async def _collect(server: Server, request: Request, job: Job, queue) -> tuple[str, Event]:
    pieces = []
    client = _Client(request)
    while True:
        ev = await server.next_event(queue, job, client)
        if ev is None:  # the client is gone; nobody reads this
            raise BadRequest("client disconnected", status=499)
        if ev.kind == "text":
            pieces.append(ev.text)
        elif ev.kind == "error":
            raise BadRequest(ev.message, status=ev.status,
                             kind="invalid_request_error" if ev.status < 500 else "server_error")
        else:
            return "".join(pieces), ev


def _stream(server: Server, request: Request, job: Job, queue, first: list[dict], text_chunk,
            final_chunk, usage_chunk: dict, usage: bool) -> StreamingResponse:
    """The job's events as OpenAI's server-sent chunks.

    A job with provenance (``genrefine_provenance: true``) gets, on every text chunk, a top-level
    ``"genrefine": {"step": s, "tokens": n, "accepted": k, "drafter": d}``: the chunk's text came
    from ``n`` tokens of decoding step ``s`` (0: the prefill's first token), of which ``k`` are
    accepted draft tokens (then ``k == n``: the step's accepted drafts) or none (``k == 0``: the
    target's own token, bonus or correction); ``d`` is the drafter that proposed the step's draft
    (None: nothing was drafted). Counts are exact; text may lag its tokens by a chunk (a partial
    character or a possible stop string is held back), and the chunk that releases text held back
    to the end has ``n == 0``. Summed over a stream that ends by length, ``k`` is the usage's
    ``speculative.accepted`` and ``n`` its ``completion_tokens``.
    """
    async def events():
        finished = False
        client = _Client(request)
        try:
            for c in first:
                yield _sse(c)
            while True:
                ev = await server.next_event(queue, job, client)
                if ev is None:
                    finished = True  # cancelled by next_event
                    return
                if ev.kind == "text":
                    c = text_chunk(ev.text)
                    if ev.provenance is not None:
                        c["genrefine"] = ev.provenance
                    yield _sse(c)
                elif ev.kind == "error":
                    finished = True
                    kind = "invalid_request_error" if ev.status < 500 else "server_error"
                    yield _sse(error_body(ev.message, kind))
                    return
                else:
                    finished = True
                    yield _sse(final_chunk(ev.finish_reason))
                    if usage:
                        yield _sse(usage_chunk | {"usage": server.usage(job, ev)})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away mid-stream: free the slot
                server.scheduler.cancel(job)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
