"""The OpenAI-compatible server, over real HTTP on 127.0.0.1 (an ephemeral port).

Servers run in this process (uvicorn on a thread) on tiny random models, and the official
``openai`` client talks to them: completions, chat, streaming, usage. Concurrent requests decode
in one batch yet give each request exactly its greedy text alone; every malformed request is a
400 with an OpenAI error body and the server keeps serving; a full queue is a 429; a client that
goes away frees its slot; a short load run; and ``genrefine serve`` in a subprocess drains its
requests on SIGTERM and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

import genrefine
import genrefine.server.scheduler as scheduler_mod
from genrefine.cli import main
from genrefine.server import ServerConfig, bind, create_app
from tiny import save_tiny_model_dir

uvicorn = pytest.importorskip("uvicorn")

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PROMPTS = ["The cat sat on the mat. The cat", "hello world", "abc abc abc abc", "Once upon a time",
           "1 2 3 4 5 6", "zz"]
DEADLINE_S = 30.0  # waits for a state, never asserted as a speed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, cache_dir):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def gen16(tiny_dir):
    g = genrefine.load(str(tiny_dir), dtype="bfloat16", quiet=True)
    g.tokenizer.chat_template = TEMPLATE
    return g


@pytest.fixture(scope="module")
def gen32(tiny_dir):
    return genrefine.load(str(tiny_dir), dtype="float32", quiet=True)


class Live:
    """A uvicorn server on a thread, on a free port of 127.0.0.1."""

    def __init__(self, gen, **config) -> None:
        config.setdefault("method", "ar")
        self.app = create_app(gen, ServerConfig(**config))
        self.scheduler = self.app.state.server.scheduler
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        self.http = httpx.Client(base_url=self.url, timeout=DEADLINE_S)
        self.model = self.client.models.list().data[0].id

    def close(self) -> None:
        self.http.close()
        self.client.close()
        self.server.should_exit = True
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive()

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def complete(self, prompt: str, max_tokens: int = 24, **kw) -> tuple[str, str, object]:
        r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r


def wait_for(cond, what: str = "a server state") -> None:
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def live(gen16):
    s = Live(gen16, method="ar", max_batch=8, max_queue=16)
    yield s
    s.close()


# --------------------------------------------------------------------------- the API
def test_models_health_metrics(live) -> None:
    assert live.model == "tiny-llama"
    h = live.http.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-llama"
    text = live.http.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    for name in ("requests_total", "completion_tokens_total", "tokens_per_second", "queue_depth",
                 "tokens_per_step", "acceptance_rate", "active_sequences"):
        assert f"# TYPE genrefine_{name} " in text.text


@pytest.mark.parametrize("method", ["ar", "pld", "jacobi"])
def test_completion_equals_the_library_and_counts_usage(live, gen16, method) -> None:
    text, reason, r = live.complete(PROMPTS[0], 20, extra_body={"method": method})
    ref = gen16.generate(PROMPTS[0], max_new_tokens=20, method=method)
    assert text == ref.text and reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == live.model
    m = live.metrics()
    assert m[f'genrefine_method_steps_total{{method="{method}"}}'] > 0
    if method != "ar":  # (ar drafts nothing: no acceptance rate)
        assert f'genrefine_acceptance_rate{{method="{method}"}}' in m


def test_token_id_prompts_and_stop_strings(live, gen16) -> None:
    ids = gen16.encode(PROMPTS[2])
    text, _, _ = live.complete(ids, 20)
    assert text == gen16.generate(ids, max_new_tokens=20).text
    full = gen16.generate(PROMPTS[2], max_new_tokens=30).text
    stop = full[5:7]
    cut, reason, _ = live.complete(PROMPTS[2], 30, stop=[stop, "never-there"])
    assert cut == full[: full.find(stop)] and reason == "stop"


def test_usage_counts_only_the_tokens_before_a_stop_string(live, gen16) -> None:
    ref = gen16.generate(PROMPTS[2], max_new_tokens=30)
    full, ids = ref.text, ref.token_ids
    stop = full[5:7]
    cut = full.find(stop)
    kept = min(k for k in range(len(ids) + 1)
               if gen16.tokenizer.decode(ids[:k], skip_special_tokens=True).startswith(full[:cut]))
    assert kept < len(ids)
    for stream in (False, True):
        kw = {"stream_options": {"include_usage": True}} if stream else {}
        r = live.client.completions.create(model=live.model, prompt=PROMPTS[2], max_tokens=30,
                                           temperature=0, stop=[stop], stream=stream, **kw)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            text, usage = r.choices[0].text, r.usage
        assert text == full[:cut]
        assert usage.completion_tokens == kept
        assert usage.total_tokens == usage.prompt_tokens + kept


def test_streaming_completion(live) -> None:
    text, reason, _ = live.complete(PROMPTS[3], 32)
    pieces, finish, usage = [], None, None
    stream = live.client.completions.create(model=live.model, prompt=PROMPTS[3], max_tokens=32,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == reason
    assert len([p for p in pieces if p]) > 1  # it did stream
    assert usage is not None and usage.completion_tokens > 0


def test_chat_uses_the_template_and_streams(live, gen16) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=16,
                                            temperature=0)
    ids = gen16.chat_prompt(messages)
    assert ids == gen16.encode("<system>be brief\n<user>hi there\n<assistant>")[1:]  # no BOS
    ref = gen16.generate(ids, max_new_tokens=16)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
    stream = live.client.chat.completions.create(model=live.model, messages=messages,
                                                 max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_chat_without_a_template_concatenates(gen32) -> None:
    assert not getattr(gen32.tokenizer, "chat_template", None)
    ids = gen32.chat_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert ids == gen32.encode("a\n\nb\n\n")


def test_seeded_sampling_repeats(live) -> None:
    kw = dict(model=live.model, prompt=PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.9)
    a = live.client.completions.create(seed=7, **kw).choices[0].text
    b = live.client.completions.create(seed=7, **kw).choices[0].text
    assert a == b


# --------------------------------------------------------------------------- batching
def _concurrent(s: Live, jobs: list[tuple[str, str]], max_tokens: int) -> list[str]:
    def one(job):
        prompt, method = job
        return s.complete(prompt, max_tokens, extra_body={"method": method})[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_concurrent_requests_get_their_greedy_text_alone(dtype, gen16, gen32) -> None:
    gen = gen16 if dtype == "bfloat16" else gen32
    s = Live(gen, max_batch=8)
    try:
        jobs = [(p, m) for p, m in zip(PROMPTS, ["ar", "pld", "jacobi", "ar", "lookahead", "pld"])]
        jobs += [(PROMPTS[0], "ar"), (PROMPTS[2], "swift")]
        alone = [s.complete(p, 40, extra_body={"method": m})[0] for p, m in jobs]
        together = _concurrent(s, jobs, 40)
        assert together == alone
        ar = {p: gen.generate(p, max_new_tokens=40).text for p, _ in jobs}
        assert alone == [ar[p] for p, _ in jobs]  # lossless: every method gives ar's text
        m = s.metrics()
        if dtype == "bfloat16":  # one forward verified several sequences' drafts
            assert s.scheduler.batched
            assert m["genrefine_batch_sequences_total"] > m["genrefine_batch_forwards_total"]
        else:  # float32 rows are not batch-invariant here: one forward per sequence
            assert not s.scheduler.batched
    finally:
        s.close()


def test_own_loop_methods_and_the_transformers_adapter_run_one_sequence_at_a_time(
        live, tmp_path) -> None:
    """calm (its own decoding loop) steps beside the batch; a model without the native runtime
    runs every sequence's forward alone. Both still give each request its text alone."""
    jobs = [(p, "calm") for p in PROMPTS[:4]]
    assert _concurrent(live, jobs, 24) == [live.complete(p, 24, extra_body={"method": "calm"})[0]
                                           for p, _ in jobs]
    gpt2 = genrefine.load(str(save_tiny_model_dir(tmp_path / "gpt2", "gpt2")), dtype="float32",
                          quiet=True)
    s = Live(gpt2, max_batch=4)
    try:
        assert not s.scheduler.batched
        jobs = [(p, m) for p, m in zip(PROMPTS[:4], ["ar", "pld", "jacobi", "ar"])]
        alone = [gpt2.generate(p, max_new_tokens=20).text for p, _ in jobs]
        assert _concurrent(s, jobs, 20) == alone
        with pytest.raises(openai.BadRequestError, match="native runtime"):
            s.complete("hi", 4, extra_body={"method": "swift"})
    finally:
        s.close()


# --------------------------------------------------------------------------- bad input
BAD = [
    (b'{"model": "m", "prompt": "hi"', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "not valid JSON"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "hi", "stop": [1]}, "stop"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "method": 3}, "method"),
    ({"prompt": "hi", "colour": "blue"}, "unrecognized request argument supplied: colour"),
    ({}, "missing required parameter: prompt"),
    ({"prompt": "x" * 300}, "context"),
    ({"prompt": "hi", "max_tokens": 255}, "context"),  # 3 prompt tokens + 255 > 256
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be between 1 and"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens must be between 1 and"),
    ({"prompt": "hi", "max_tokens": 10**12}, "max_tokens must be between 1 and"),
    ({"prompt": "hi", "method": "nosuch"}, "unknown method 'nosuch'"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 2}, "only n=1"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": [1, 99999]}, "token ids must be in"),
    ({"prompt": ["a", "b"]}, "one prompt per request"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
]
BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "between"),
    ({"messages": [{"role": "user", "content": "hi"}], "method": "nosuch"}, "unknown method"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
]


def _post(live, path: str, body) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps({"model": live.model} | body).encode()
    return live.http.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("body, needle", BAD + [(b, n) for b, n in BAD_CHAT],
                         ids=[f"c{i}" for i in range(len(BAD))] + [f"chat{i}" for i in range(len(BAD_CHAT))])
def test_bad_requests_are_400_and_the_server_keeps_serving(live, body, needle) -> None:
    chat = isinstance(body, dict) and "messages" in body
    for stream in (False, True):
        b = body | {"stream": True} if (stream and isinstance(body, dict) and "stream" not in body) else body
        r = _post(live, "/v1/chat/completions" if chat else "/v1/completions", b)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] or needle == err["param"], err
        assert err["type"] == "invalid_request_error"
    assert live.complete("still here", 4)[1] in ("stop", "length")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_torch_cannot_take_is_a_400(live, seed) -> None:
    for stream in (False, True):
        r = _post(live, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1.0,
                                            "seed": seed, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "seed" and err["type"] == "invalid_request_error", err
    for seed in (2**64 - 1, -(2**63)):  # the ends of torch.Generator's range still run
        r = _post(live, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1.0,
                                            "seed": seed})
        assert r.status_code == 200, r.text


def test_a_tiny_positive_temperature_is_greedy(live, gen16) -> None:
    """Below genrefine.types.GREEDY_BELOW a temperature decodes greedily, in the server and in
    the Python API alike (dividing the logits by it would overflow)."""
    greedy = live.complete(PROMPTS[1], 12)[0]
    assert gen16.generate(PROMPTS[1], max_new_tokens=12, temperature=1e-40, seed=3).text == greedy
    for t in (1e-40, 5e-324, 1e-6):
        r = _post(live, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12,
                                            "temperature": t, "seed": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy


def test_the_openai_client_sees_a_bad_request_error(live) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown method"):
        live.complete("hi", 4, extra_body={"method": "nosuch"})
    assert live.http.get("/v1/nowhere").status_code == 404
    assert live.http.get("/v1/completions").status_code == 405


# --------------------------------------------------------------------------- overload, disconnect
@pytest.fixture
def slow_steps(monkeypatch):
    """Each batched forward first waits for the gate (set: no wait) and then ``delay`` seconds."""
    gate = threading.Event()
    gate.set()
    delay = [0.0]
    inner = scheduler_mod.forward_batch

    def forward(*a, **kw):
        gate.wait()
        time.sleep(delay[0])
        return inner(*a, **kw)

    monkeypatch.setattr(scheduler_mod, "forward_batch", forward)
    return gate, delay


def test_a_full_queue_answers_429_at_once(gen16, slow_steps) -> None:
    gate, _ = slow_steps
    s = Live(gen16, max_batch=1, max_queue=1)
    try:
        gate.clear()  # the first request's first step waits: it holds the only slot
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(s.complete, PROMPTS[0], 8)
            wait_for(lambda: s.scheduler.inflight == 1 and s.scheduler.queue_depth == 0)
            second = pool.submit(s.complete, PROMPTS[1], 8)
            wait_for(lambda: s.scheduler.queue_depth == 1, "the second request to queue")
            r = _post(s, "/v1/completions", {"prompt": "one too many", "max_tokens": 4})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                s.complete("one too many", 4)
            gate.set()
            assert first.result()[1] and second.result()[1]  # both finish normally
        assert s.metrics()['genrefine_requests_rejected_total{reason="queue_full"}'] == 2
        assert s.complete("room again", 4)[1]
    finally:
        gate.set()
        s.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(gen16, slow_steps, stream) -> None:
    _, delay = slow_steps
    delay[0] = 0.02  # 200 tokens would take 4 s or more
    s = Live(gen16, max_batch=1, max_queue=0)
    try:
        body = {"model": s.model, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                "stream": stream}
        if stream:
            with httpx.Client(base_url=s.url, timeout=DEADLINE_S) as c:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first chunk arrived; now go away
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", json=body, timeout=0.3)
        wait_for(lambda: s.scheduler.inflight == 0, "the slot to free")
        m = s.metrics()
        assert m['genrefine_requests_total{method="ar",finish_reason="cancelled"}'] == 1
        assert m["genrefine_completion_tokens_total"] < 200
        assert s.complete("next one", 4)[1]  # the slot is free again
    finally:
        s.close()


# --------------------------------------------------------------------------- load
def test_short_load_run(gen16) -> None:
    """At most 40 requests or 20 seconds from 6 clients: mixed methods, streaming or not."""
    s = Live(gen16, max_batch=4, max_queue=64)
    methods = ["ar", "pld", "jacobi", "lookahead"]
    end = time.monotonic() + 20.0
    count = iter(range(40))
    results, lock = [], threading.Lock()

    def client(k: int) -> None:
        while time.monotonic() < end:
            i = next(count, None)
            if i is None:
                return
            prompt, method = PROMPTS[i % len(PROMPTS)], methods[i % len(methods)]
            if i % 3 == 0:
                stream = s.client.completions.create(
                    model=s.model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                    extra_body={"method": method})
                text = "".join(c.choices[0].text for c in stream)
            else:
                text = s.complete(prompt, 12, extra_body={"method": method})[0]
            with lock:
                results.append((prompt, text))

    try:
        with ThreadPoolExecutor(6) as pool:
            for f in [pool.submit(client, k) for k in range(6)]:
                f.result()
        assert len(results) >= 6
        want = {p: s.complete(p, 12)[0] for p in PROMPTS}
        assert all(text == want[p] for p, text in results)  # greedy: every method, any batch
        m = s.metrics()
        finished = sum(v for k, v in m.items() if k.startswith("genrefine_requests_total{"))
        assert finished == len(results) + len(PROMPTS)
        assert m["genrefine_queue_depth"] == 0 and m["genrefine_active_sequences"] == 0
        assert "genrefine_requests_rejected_total" not in "".join(m)
    finally:
        s.close()


# --------------------------------------------------------------------------- pieces
def test_serve_cli_errors_are_one_line(capsys, tiny_dir) -> None:
    for argv, needle in [
        (["serve", "--max-batch", "0"], "--max-batch"),
        (["serve", "--max-queue", "-1"], "--max-queue"),
        (["serve", "--method", "nosuch"], "unknown method"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--model", "/no/such/model"], "does not exist"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--max-batch", "--max-queue", "--method", "--model"):
        assert opt in out


def test_serve_drains_on_sigterm_and_exits_cleanly(tiny_dir, cache_dir) -> None:
    """``genrefine serve`` in a subprocess: SIGTERM while three requests are in flight (one
    decoding, two queued) lets all three finish, then the process exits with status 0."""
    env = dict(os.environ, GENREFINE_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "genrefine.cli", "serve", "--model", str(tiny_dir), "--port", "0",
           "--method", "ar", "--max-batch", "1", "--dtype", "bfloat16"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent, env=env)
    try:
        line = proc.stderr.readline()
        while line and "serving" not in line:
            line = proc.stderr.readline()
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
                "stream": True}

        def stream() -> tuple[int, bool]:
            with httpx.Client(timeout=DEADLINE_S) as c, c.stream("POST", url + "/v1/completions",
                                                                  json=body) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            return len(lines), lines[-1] == "data: [DONE]"

        with ThreadPoolExecutor(3) as pool:
            with httpx.Client(timeout=DEADLINE_S) as c, c.stream("POST", url + "/v1/completions",
                                                                  json=body) as r:
                it = r.iter_lines()
                next(it)  # decoding has begun
                others = [pool.submit(stream) for _ in range(2)]
                wait_for(lambda: httpx.get(url + "/health").json()["in_flight"] == 3)
                proc.send_signal(signal.SIGTERM)
                rest = [ln for ln in it if ln.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert all(done for _, done in (f.result() for f in others))
        assert proc.wait(DEADLINE_S) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_float32_and_bfloat16_batching_modes(gen32) -> None:
    with pytest.raises(genrefine.GenrefineError, match="batching"):
        ServerConfig(batching="sometimes")
    s = create_app(gen32, ServerConfig(method="ar", batching="always"), warm=False)
    assert s.state.server.scheduler.batched
    assert torch.float32 == gen32.model.dtype


@pytest.mark.parametrize(
    "kind, methods", [("heads", ["bpd", "medusa", "pld"]), ("eagle", ["eagle", "ar", "eagle"])]
)
def test_trained_drafters_that_need_hidden_states_serve_beside_the_batch(
    gen16, tmp_path, kind, methods
) -> None:
    """Heads and EAGLE read the target's hidden states: their steps run a forward of their own
    beside the batched one, and every request still gets its text alone."""
    from genrefine.methods.base import MethodOptions
    from genrefine.train.loop import TrainConfig
    from genrefine.train.run import DrafterSpec, run_training

    texts = [p * 20 for p in PROMPTS]
    cfg = TrainConfig(steps=3, warmup=1, batch=2)
    run_training(gen16.model, gen16.tokenizer, texts,
                 DrafterSpec(kind=kind, seq_len=32, max_tokens=4000), cfg, tmp_path / kind,
                 progress=False, eval_prompts=1)
    s = Live(gen16, max_batch=4, options=MethodOptions(drafter=str(tmp_path / kind)))
    try:
        jobs = [(p, m) for p, m in zip(PROMPTS, methods)]
        alone = [s.complete(p, 24, extra_body={"method": m})[0] for p, m in jobs]
        assert _concurrent(s, jobs, 24) == alone
        assert alone == [gen16.generate(p, max_new_tokens=24).text for p, _ in jobs]
    finally:
        s.close()


@pytest.mark.parametrize("method", ["pld", "lookahead"])
def test_the_scheduler_stops_a_huge_max_tokens_at_the_context(gen16, method) -> None:
    """A job whose max_tokens exceeds the context by far (the HTTP layer refuses one, the
    scheduler must not rely on it) decodes to the end of the context, as ``ar`` does beside it."""
    from genrefine.server.scheduler import Job, Scheduler
    from genrefine.types import SamplingParams

    ids = gen16.tokenizer("abc abc abc abc " * 12)["input_ids"]
    sched = Scheduler(gen16, ServerConfig(method="ar"))
    events: dict[str, list] = {method: [], "ar": []}
    for name in events:
        sched.submit(Job(ids, 10**12, SamplingParams(), name, emit=events[name].append))
    sched.start()
    sched.stop(DEADLINE_S)
    texts = {}
    for name, evs in events.items():
        assert [e.kind for e in evs][-1] == "done", evs[-1].message
        assert evs[-1].finish_reason == "length"
        assert evs[-1].completion_tokens == gen16.model.max_context - len(ids) + 1
        texts[name] = "".join(e.text for e in evs)
    assert texts[method] == texts["ar"]
