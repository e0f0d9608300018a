"""Continuous batching: one worker thread owns the model and decodes every request together.

Each request becomes a *sequence*: its own :class:`~genrefine.engine.Decoder` (KV cache, drafter
state through a method instance of its own, random generator, emitted tokens). One scheduler step
is::

    admit    waiting requests join while the batch has room (max_batch): each is prefilled alone
    propose  every active sequence drafts its next step (its method's drafter and policy)
    verify   ONE target forward for all of them (models/batched.py): each sequence's
             [root] + draft on its own cache, at its own positions
    accept   each sequence verifies, accepts, rolls back and observes on its own; finished ones
             (EOS, max_tokens, a stop string, a client that went away) leave the batch

so sequences join and leave between steps, and each keeps its own accepted length and cache
positions. Before proposing, each sequence's policy that has ``observe_load(sequences)`` (``auto``)
hears how many sequences share the step's forward (1 where every sequence's forward runs alone):
drafting that pays alone may not pay in a full batch. The forward gives every sequence exactly the logits its own forward would (see
models/batched.py for when rows are batched and when each sequence runs alone), so greedy output
is what the request gets alone.

Methods with a decoding loop of their own (``calm``) step one token per scheduler step with their
own forwards, outside the batched one; so do all sequences of a model without the native runtime
(the transformers adapter).

Method instances are pooled per method name: a sequence takes one (or builds one) when it joins
and gives it back when it leaves, so learning drafters (suffix decoding, ``auto``'s acceptance
estimates) carry what they learned to later requests, as :class:`genrefine.Generator` does.
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..engine import Decoder, Engine, Stats, check_prompt
from ..costs import batch_costs
from ..errors import ConfigError, GenrefineError
from ..methods.base import MethodOptions
from ..models.batched import MODES, BatchItem, batches_rows, forward_batch, max_rows
from ..registry import METHODS, build_method
from ..text import TextTracker
from ..types import SamplingParams
from .metrics import Metrics


class QueueFull(GenrefineError):
    """Every batch slot and every queue place is taken (HTTP 429)."""


class ShuttingDown(GenrefineError):
    """The server is draining and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class ServerConfig:
    """How the server decodes; every field is the operator's (requests choose only a method)."""

    method: str = "auto"  # the method of requests that name none
    options: MethodOptions = field(default_factory=MethodOptions)
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 32  # requests waiting for a slot; one more is answered 429
    batching: str = "auto"  # models.batched mode: auto | always | never
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.batching not in MODES:
            raise ConfigError(f"--batching must be one of {', '.join(MODES)}, got {self.batching!r}")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")


@dataclass
class Event:
    """What the worker tells a request: text, then one ``done`` or ``error``."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop" | "length"
    completion_tokens: int = 0  # done: tokens of the returned text (EOS, a stop string not counted)
    stats: Stats | None = None  # done
    message: str = ""  # error
    status: int = 500  # error: the HTTP status it maps to
    # text, for a job that asked for provenance: where the piece's tokens came from
    # {"step": s, "tokens": n, "accepted": k, "drafter": name or None}, see Scheduler._tokens
    provenance: dict | None = None


_ids = itertools.count(1)


class Job:
    """One request as the worker sees it. ``emit`` is called from the worker thread."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        method: str,
        stops: Sequence[str] = (),
        emit: Callable[[Event], None] = lambda ev: None,
        provenance: bool = False,
    ) -> None:
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.params = params
        self.method = method
        self.stops = tuple(stops)
        self.emit = emit
        self.provenance = provenance  # text events say which tokens were accepted drafts
        self.cancelled = threading.Event()


class _Seq:
    """An admitted job: its decoder (or its method's own loop) and its text so far."""

    def __init__(self, job: Job, method, text: TextTracker) -> None:
        self.job = job
        self.method = method
        self.stats = Stats(method.name)
        self.text = text
        self.decoder: Decoder | None = None
        self.loop = None  # iterator of token lists, for methods with their own decode loop
        self.engine: Engine | None = None


class Scheduler:
    """Owns the model on one worker thread; requests come in through :meth:`submit`."""

    def __init__(self, generator, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.gen = generator
        self.model = generator.model
        self.config = config
        self.metrics = metrics or Metrics()
        self.tokenizer_lock = threading.Lock()
        self.batched = batches_rows(self.model, config.batching)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._inflight = 0  # waiting + active
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._active: list[_Seq] = []  # the worker's own
        self._pool: dict[str, list] = {}

    # ------------------------------------------------------------------ requests (any thread)
    def check_method(self, name: str) -> None:
        """Raise a :class:`ConfigError` for a method this server cannot run."""
        info = METHODS.get(name)
        if info is None:
            raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
        if info.native_only:
            from ..models.runtime import NativeModel

            if not isinstance(self.model, NativeModel):
                raise ConfigError(
                    f"method {name} needs the native runtime; this model runs through the "
                    "transformers adapter"
                )
        if getattr(info, "needs_draft_model", False) and self.config.options.draft_model is None:
            raise ConfigError(f"method {name} needs a draft model, which this server was not given")

    def submit(self, job: Job) -> None:
        """Queue a job; :class:`QueueFull` when every slot and queue place is taken."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._inflight >= self.config.max_batch + self.config.max_queue:
                raise QueueFull(
                    f"the server is busy ({self.config.max_batch} requests decoding, "
                    f"{self.config.max_queue} waiting): retry later"
                )
            self._waiting.append(job)
            self._inflight += 1
            self.metrics.gauges(len(self._waiting), len(self._active))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job (its slot frees at the next step)."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._inflight -= 1
                self.metrics.finished(job.method, "cancelled", len(job.prompt_ids), None)
                self.metrics.gauges(len(self._waiting), len(self._active))
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def inflight(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------ life cycle
    def warm(self, method: str | None = None) -> None:
        """Build a method once before serving (``auto`` measures its cost table the first time;
        with batching on, the batched forward's ``T_batch`` is measured once per machine too)."""
        name = method or self.config.method
        if self.batched:
            batch_costs(self.model, measure=True)
        self._release(name, self._acquire(name))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="genrefine-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish every queued and active one, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if not self._waiting and not self._active:
                    return  # stopping, and drained
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.config.max_batch:
                    admit.append(self._waiting.popleft())
            try:
                for job in admit:
                    self._admit(job)
                self.metrics.gauges(len(self._waiting), len(self._active))
                if self._active:
                    self._step()
            except Exception as e:  # a bug: fail what is running, keep serving
                traceback.print_exc()
                for seq in list(self._active):
                    self._fail(seq, f"internal error: {type(e).__name__}: {e}", 500)

    def _acquire(self, name: str):
        pool = self._pool.setdefault(name, [])
        if pool:
            return pool.pop()
        return build_method(name, self.model, self.config.options, tokenizer=self.gen.tokenizer)

    def _release(self, name: str, method) -> None:
        self._pool.setdefault(name, []).append(method)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._end_job(job, "cancelled", None)
            return
        try:
            method = self._acquire(job.method)
        except Exception as e:  # GenrefineError: the method cannot run here (a 400)
            user = isinstance(e, GenrefineError)
            if not user:
                traceback.print_exc()
            message = str(e) if user else f"internal error: {type(e).__name__}: {e}"
            job.emit(Event("error", message=message, status=400 if user else 500))
            self._end_job(job, "error", None)
            return
        seq = _Seq(job, method, TextTracker(self.gen.tokenizer, job.stops, self.tokenizer_lock))
        self._active.append(seq)
        try:
            prompt = check_prompt(self.model, job.prompt_ids)
            if method.decode is not None:  # its own loop: stepped one token list at a time
                seq.engine = Engine(self.model, method)
                seq.loop = seq.engine.generate(
                    prompt, job.max_tokens, job.params, self.gen.eos_ids, seq.stats
                )
                return
            seq.stats.prompt_tokens = int(prompt.shape[0])
            seq.decoder = Decoder(
                self.model, method, prompt, job.max_tokens, job.params, self.gen.eos_ids, seq.stats
            )
            self._tokens(seq, seq.decoder.start())
            if seq.text.stopped or seq.decoder.done:
                self._finish(seq, "stop" if seq.text.stopped else seq.decoder.finish_reason)
        except GenrefineError as e:
            self._fail(seq, str(e), 400)
        except Exception as e:
            traceback.print_exc()
            self._fail(seq, f"internal error: {type(e).__name__}: {e}", 500)

    def _step(self) -> None:
        items: list[BatchItem] = []
        owners: list[_Seq] = []
        # drafts share the step's forward: keep its rows within one bitwise-exact group
        stepping = sum(1 for s in self._active if s.loop is None)
        cap = None
        if stepping > 1 and self.batched:
            cap = max(0, max_rows() // stepping - 1)
        load = stepping if self.batched else 1  # sequences sharing the step's forward
        for seq in list(self._active):
            if seq.job.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            try:
                if seq.loop is not None:
                    self._step_own_loop(seq)
                    continue
                observe = getattr(seq.method.policy, "observe_load", None)
                if observe is not None:
                    observe(load)
                step = seq.decoder.propose(cap)
            except Exception as e:
                traceback.print_exc()
                self._fail(seq, f"internal error: {type(e).__name__}: {e}", 500)
                continue
            if step is None:
                self._finish(seq, seq.decoder.finish_reason)
                continue
            if step.hidden:  # feature-level drafters: a forward of its own, with hidden states
                self._step_with_hidden(seq, step)
                continue
            items.append(BatchItem(step.tokens, step.cache, step.positions, step.tree_mask))
            owners.append(seq)
        if not items:
            return
        try:
            logits = forward_batch(self.model, items, self.config.batching)
        except Exception as e:
            traceback.print_exc()
            for seq in owners:
                self._fail(seq, f"internal error: {type(e).__name__}: {e}", 500)
            return
        self.metrics.forward(len(items))
        for seq, rows in zip(owners, logits):
            self._accept(seq, lambda seq=seq, rows=rows: seq.decoder.accept(rows))

    def _accept(self, seq: _Seq, finish_step) -> None:
        """Run ``finish_step()`` (the forward's rest and ``Decoder.accept``), emit its tokens and
        end the sequence when it is done; an error fails this sequence only."""
        stats = seq.stats
        if seq.job.provenance:  # what this step accepts, and whose draft it was
            accepted, served = stats.accepted, dict(stats.drafter_steps)
        try:
            ids = finish_step()
            if seq.job.provenance:
                drafter = next((d for d, n in stats.drafter_steps.items() if served.get(d, 0) != n), None)
                self._tokens(seq, ids, stats.accepted - accepted, drafter)
            else:
                self._tokens(seq, ids)
        except Exception as e:
            traceback.print_exc()
            self._fail(seq, f"internal error: {type(e).__name__}: {e}", 500)
            return
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.decoder.done:
            self._finish(seq, seq.decoder.finish_reason)

    def _step_with_hidden(self, seq: _Seq, step) -> None:
        L = self.model.num_layers

        def finish_step():
            out = self.model.forward(
                step.tokens,
                step.cache,
                positions=step.positions,
                tree_mask=step.tree_mask,
                hidden_layers=(L,),
            )
            self.metrics.forward(1)
            return seq.decoder.accept(out.logits, out.hidden[L])

        self._accept(seq, finish_step)

    def _step_own_loop(self, seq: _Seq) -> None:
        try:
            out = next(seq.loop)
        except StopIteration:
            self._finish(seq, seq.engine.finish_reason or "length")
            return
        self._tokens(seq, out)
        if seq.text.stopped:
            seq.loop.close()
            self._finish(seq, "stop")

    def _tokens(self, seq: _Seq, ids: list[int], accepted: int = 0, drafter: str | None = None) -> None:
        """Hand one step's new tokens to the job as text. ``accepted``: how many of them lead the
        list as accepted draft tokens (served by ``drafter``); the rest are the target's own.

        A job that asked for provenance gets the step as up to two text events, the accepted
        drafts' text then the target token's, each with its counts (sent even when the text is
        held back: it then arrives with a later piece, while the counts stay with their step)."""
        if not ids:
            return
        self.metrics.tokens(len(ids))
        job = seq.job
        if not job.provenance:
            piece = seq.text.add(ids)
            if piece:
                job.emit(Event("text", text=piece))
            return
        k = min(accepted, len(ids))  # an EOS among the drafts cuts the list short
        step = seq.stats.steps
        for part, acc in ((ids[:k], k), (ids[k:], 0)):
            if part:
                info = {"step": step, "tokens": len(part), "accepted": acc, "drafter": drafter}
                job.emit(Event("text", text=seq.text.add(part), provenance=info))

    def _finish(self, seq: _Seq, reason: str) -> None:
        self._active.remove(seq)
        self._release(seq.job.method, seq.method)
        if reason != "cancelled":
            piece = seq.text.finish()
            if piece:
                info = None
                if seq.job.provenance:  # text held back until the end: its tokens were counted
                    info = {"step": seq.stats.steps, "tokens": 0, "accepted": 0, "drafter": None}
                seq.job.emit(Event("text", text=piece, provenance=info))
            seq.job.emit(
                Event("done", finish_reason=reason, completion_tokens=len(seq.text.token_ids), stats=seq.stats)
            )
        self._end_job(seq.job, reason, seq.stats, seq.method.name)

    def _fail(self, seq: _Seq, message: str, status: int) -> None:
        """End a sequence with an error; its method instance is dropped (its state is unknown)."""
        if seq in self._active:
            self._active.remove(seq)
        seq.job.emit(Event("error", message=message, status=status))
        self._end_job(seq.job, "error", seq.stats, seq.method.name)

    def _end_job(self, job: Job, reason: str, stats, method_name: str | None = None) -> None:
        self.metrics.finished(method_name or job.method, reason, len(job.prompt_ids), stats)
        with self._cond:
            self._inflight -= 1
            self.metrics.gauges(len(self._waiting), len(self._active))
