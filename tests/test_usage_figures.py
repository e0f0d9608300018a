"""The server's per-request speculative figures in ``usage`` (completions, chat, and a stream's
usage chunk) equal the library's :class:`~genrefine.engine.Stats` for the same greedy request, and
OpenAI's usage fields stay as they were."""

from __future__ import annotations

import json

import pytest

import genrefine
from tiny import save_tiny_model_dir

from test_server import TEMPLATE, Live

pytest.importorskip("uvicorn")

PROMPT = "The cat sat on the mat. The cat sat on the mat. The cat"
MESSAGES = [{"role": "user", "content": "abc abc abc abc abc"}]


@pytest.fixture(scope="module")
def gen(tmp_path_factory, cache_dir):
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama", "llama")
    g = genrefine.load(str(d), dtype="float32", quiet=True)
    g.tokenizer.chat_template = TEMPLATE
    return g


@pytest.fixture(scope="module")
def live(gen):
    s = Live(gen, method="ar", max_batch=4, max_queue=8)
    yield s
    s.close()


def expected(res) -> dict:
    s = res.stats
    return {"method": s.method, "drafted": s.drafted, "accepted": s.accepted, "steps": s.steps,
            "tokens_per_step": s.tokens_per_step, "acceptance_rate": s.acceptance_rate,
            "drafter_steps": dict(s.drafter_steps)}


def check_usage(usage: dict, res) -> None:
    assert usage["completion_tokens"] == len(res.token_ids)
    assert usage["prompt_tokens"] == len(res.prompt_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["speculative"] == expected(res)


def sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("method", ["ar", "pld", "jacobi"])
def test_completion_usage_carries_the_library_figures(live, gen, method):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "method": method}
    r = live.http.post("/v1/completions", json=body).json()
    ref = gen.generate(PROMPT, max_new_tokens=20, method=method)
    assert r["choices"][0]["text"] == ref.text
    check_usage(r["usage"], ref)
    if method == "pld":
        assert r["usage"]["speculative"]["drafted"] > 0  # the prompt repeats itself: pld drafts


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_chat_usage_carries_the_library_figures(live, gen, method):
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "method": method}
    r = live.http.post("/v1/chat/completions", json=body).json()
    ref = gen.generate(gen.chat_prompt(MESSAGES), max_new_tokens=16, method=method)
    assert r["choices"][0]["message"]["content"] == ref.text
    check_usage(r["usage"], ref)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_stream_usage_chunk_carries_the_library_figures(live, gen, route):
    if route == "chat":
        url, body = "/v1/chat/completions", {"messages": MESSAGES}
        ref = gen.generate(gen.chat_prompt(MESSAGES), max_new_tokens=16, method="pld")
    else:
        url, body = "/v1/completions", {"prompt": PROMPT}
        ref = gen.generate(PROMPT, max_new_tokens=16, method="pld")
    body |= {"max_tokens": 16, "temperature": 0, "method": "pld", "stream": True,
             "stream_options": {"include_usage": True}}
    chunks = sse(live.http.post(url, json=body).text)
    with_usage = [c for c in chunks if c.get("usage")]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1]["choices"] == []
    check_usage(chunks[-1]["usage"], ref)


def test_openai_client_reads_the_usage(live, gen):
    r = live.client.completions.create(model=live.model, prompt=PROMPT, max_tokens=12,
                                       temperature=0, extra_body={"method": "pld"})
    ref = gen.generate(PROMPT, max_new_tokens=12, method="pld")
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.model_extra["speculative"] == expected(ref)
