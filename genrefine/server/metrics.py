"""Server counters, rendered in the Prometheus text exposition format (``GET /metrics``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

RATE_WINDOW_S = 10.0  # tokens/s is measured over this sliding window


@dataclass
class _MethodTotals:
    requests: int = 0
    completion_tokens: int = 0
    decode_tokens: int = 0  # tokens emitted by decoding steps (the prefill's first token excluded)
    steps: int = 0  # target forwards after the prefill
    drafted: int = 0
    accepted: int = 0


class Metrics:
    """Thread-safe counters; the scheduler's worker and the HTTP handlers both write them."""

    def __init__(self, clock=time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.started = clock()
        self.requests: dict[tuple[str, str], int] = {}  # (method, finish reason) -> finished
        self.rejected: dict[str, int] = {}  # reason -> requests answered 4xx/5xx before decoding
        self.methods: dict[str, _MethodTotals] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.forwards = 0  # batched target forwards (decoding steps of the whole batch)
        self.forward_sequences = 0  # sequences over those forwards (mean batch = ratio)
        self.queue_depth = 0
        self.active = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) in the rate window

    # ------------------------------------------------------------------ updates
    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def tokens(self, n: int) -> None:
        """``n`` completion tokens were produced just now."""
        if n <= 0:
            return
        now = self._clock()
        with self._lock:
            self.completion_tokens += n
            self._recent.append((now, n))
            self._trim(now)

    def forward(self, sequences: int) -> None:
        with self._lock:
            self.forwards += 1
            self.forward_sequences += sequences

    def gauges(self, queue_depth: int, active: int) -> None:
        with self._lock:
            self.queue_depth, self.active = queue_depth, active

    def finished(self, method: str, reason: str, prompt_tokens: int, stats) -> None:
        """A request ended (``reason``: stop, length, cancelled, error); ``stats`` is its Stats."""
        with self._lock:
            key = (method, reason)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.prompt_tokens += prompt_tokens
            m = self.methods.setdefault(method, _MethodTotals())
            m.requests += 1
            if stats is not None:
                m.completion_tokens += stats.new_tokens
                m.decode_tokens += stats.decode_tokens
                m.steps += stats.steps
                m.drafted += stats.drafted
                m.accepted += stats.accepted

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    # ------------------------------------------------------------------ reading
    def tokens_per_s(self) -> float:
        """Completion tokens per second over the last ``RATE_WINDOW_S`` seconds."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._recent)
        span = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
        return total / span

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        rate = self.tokens_per_s()
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples) -> None:
            out.append(f"# HELP genrefine_{name} {help_}")
            out.append(f"# TYPE genrefine_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"genrefine_{name}{{{lab}}} {_num(value)}" if lab else f"genrefine_{name} {_num(value)}")

        with self._lock:
            metric("requests_total", "counter", "Requests finished, by method and finish reason.",
                   [({"method": m, "finish_reason": r}, n) for (m, r), n in sorted(self.requests.items())])
            metric("requests_rejected_total", "counter",
                   "Requests answered with an error before decoding, by reason.",
                   [({"reason": r}, n) for r, n in sorted(self.rejected.items())])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [({}, self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "Tokens generated.",
                   [({}, self.completion_tokens)])
            metric("tokens_per_second", "gauge",
                   f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", [({}, rate)])
            per = sorted(self.methods.items())
            metric("method_completion_tokens_total", "counter", "Tokens generated, by method.",
                   [({"method": m}, t.completion_tokens) for m, t in per])
            metric("method_steps_total", "counter", "Target forwards after the prefill, by method.",
                   [({"method": m}, t.steps) for m, t in per])
            metric("method_draft_tokens_total", "counter", "Draft tokens verified, by method.",
                   [({"method": m}, t.drafted) for m, t in per])
            metric("method_accepted_tokens_total", "counter", "Draft tokens accepted, by method.",
                   [({"method": m}, t.accepted) for m, t in per])
            metric("tokens_per_step", "gauge",
                   "Tokens emitted per target forward (accepted + bonus), by method.",
                   [({"method": m}, t.decode_tokens / t.steps if t.steps else 1.0) for m, t in per])
            metric("acceptance_rate", "gauge", "Accepted / drafted tokens, by method.",
                   [({"method": m}, t.accepted / t.drafted) for m, t in per if t.drafted])
            metric("queue_depth", "gauge", "Requests waiting for a batch slot.",
                   [({}, self.queue_depth)])
            metric("active_sequences", "gauge", "Sequences being decoded.", [({}, self.active)])
            metric("batch_forwards_total", "counter", "Decoding steps of the batch.",
                   [({}, self.forwards)])
            metric("batch_sequences_total", "counter",
                   "Sequences over all decoding steps (mean batch size = this / forwards).",
                   [({}, self.forward_sequences)])
        return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))
