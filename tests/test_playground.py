"""The playground page (``genrefine serve`` at ``/``) and the provenance stream it reads.

The server serves the page's three files with their content types and lists its methods; a
streamed request with ``genrefine_provenance`` says, chunk by chunk, which tokens were accepted
drafts, and its counts add up to the request's usage; requests that do not ask get the chunks
they always got. Then the page itself runs in a real headless Chromium (driven over the DevTools
protocol, tests/browser.py): it streams a race of two methods and colours as many tokens "draft"
as the server's usage says were accepted.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

import genrefine
from browser import Chromium, find_chromium
from genrefine.registry import METHODS
from tiny import save_tiny_model_dir

from test_server import TEMPLATE, Live

pytest.importorskip("uvicorn")

PROMPT = "The cat sat on the mat. The cat sat on the mat. The cat"  # pld finds its n-grams
MESSAGES = [{"role": "user", "content": "abc abc abc abc abc"}]
MAX_TOKENS = 40


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


def sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# --------------------------------------------------------------------------- the page's files
@pytest.mark.parametrize("path,kind", [("/", "text/html"), ("/playground/app.js", "text/javascript"),
                                       ("/playground/style.css", "text/css")])
def test_page_and_assets_are_served_with_their_content_types(live, path, kind):
    r = live.http.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == f"{kind}; charset=utf-8"
    assert r.text.strip()


def test_the_page_fetches_nothing_from_outside(live):
    for path in ("/", "/playground/app.js", "/playground/style.css"):
        r = live.http.get(path)
        assert r.status_code == 200
        text = r.text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


@pytest.mark.parametrize("path", ["/playground/index.html", "/playground/app.py",
                                  "/playground/..%2Fapp.py", "/playground/"])
def test_only_the_page_files_are_served(live, path):
    r = live.http.get(path)
    assert r.status_code == 404
    assert "error" in r.json()


def test_methods_lists_every_method_and_what_this_server_can_run(live):
    body = live.http.get("/v1/genrefine/methods").json()
    assert body["default"] == "ar"
    got = {m["id"]: m for m in body["data"]}
    assert list(got) == list(METHODS)
    assert got["pld"]["available"] and got["pld"]["lossless"] and got["pld"]["reason"] is None
    assert not got["sps"]["available"] and "draft model" in got["sps"]["reason"]


# --------------------------------------------------------------------------- the provenance stream
def provenance_stream(live, route: str, method: str) -> tuple[list[dict], list[dict], dict]:
    """(pieces: text + provenance, every chunk, the usage) of one streamed request."""
    if route == "chat":
        url, body = "/v1/chat/completions", {"messages": MESSAGES}
    else:
        url, body = "/v1/completions", {"prompt": PROMPT}
    body |= {"max_tokens": MAX_TOKENS, "temperature": 0, "method": method, "stream": True,
             "stream_options": {"include_usage": True}, "genrefine_provenance": True}
    chunks = sse(live.http.post(url, json=body).text)
    pieces = []
    for c in chunks:
        if "genrefine" in c:
            choice = c["choices"][0]
            text = choice["delta"].get("content", "") if route == "chat" else choice["text"]
            pieces.append(c["genrefine"] | {"text": text})
    return pieces, chunks, chunks[-1]["usage"]


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("method", ["ar", "pld"])
def test_provenance_counts_equal_the_usage(live, gen, route, method):
    pieces, chunks, usage = provenance_stream(live, route, method)
    prompt = gen.chat_prompt(MESSAGES) if route == "chat" else PROMPT
    ref = gen.generate(prompt, max_new_tokens=MAX_TOKENS, method=method)
    assert ref.finish_reason == "length"  # (the counts add up exactly for a run that ends so)
    assert "".join(p["text"] for p in pieces) == ref.text
    spec = usage["speculative"]
    assert sum(p["tokens"] for p in pieces) == usage["completion_tokens"] == len(ref.token_ids)
    assert sum(p["accepted"] for p in pieces) == spec["accepted"] == ref.stats.accepted
    assert max(p["step"] for p in pieces) == spec["steps"]
    for p in pieces:  # a piece is a step's accepted drafts, or the target's own token
        assert p["accepted"] in (0, p["tokens"])
        assert p["accepted"] == 0 or p["drafter"] is not None
    assert pieces[0]["step"] == 0 and pieces[0]["accepted"] == 0
    if method == "ar":
        assert all(p["accepted"] == 0 and p["drafter"] is None for p in pieces)
    elif route == "completions":  # the prompt repeats itself: some drafts are accepted
        assert spec["accepted"] > 0
        assert {p["drafter"] for p in pieces if p["accepted"]} == {"pld"}


def test_streams_that_do_not_ask_are_unchanged(live):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "method": "pld", "stream": True}
    chunks = sse(live.http.post("/v1/completions", json=body).text)
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)
    assert all(c["choices"][0]["text"] for c in chunks[:-1])  # no empty text chunks


def test_provenance_needs_a_stream(live):
    body = {"prompt": PROMPT, "max_tokens": 4, "genrefine_provenance": True}
    r = live.http.post("/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "genrefine_provenance" and "set stream to true" in err["message"]


# --------------------------------------------------------------------------- the page in Chromium
@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    with Chromium(exe) as b:
        yield b


LANES = """[...document.querySelectorAll('.lane')].map(l => ({
  method: l.dataset.method, state: l.dataset.state,
  usageAccepted: +l.dataset.usageAccepted, usageTokens: +l.dataset.usageCompletionTokens,
  usageSteps: +l.dataset.usageSteps,
  text: l.querySelector('.output').textContent,
  draftTokens: [...l.querySelectorAll('.tok-draft')].reduce((n, s) => n + +s.dataset.tokens, 0),
  allTokens: [...l.querySelectorAll('.tok')].reduce((n, s) => n + +s.dataset.tokens, 0),
  draftTitles: [...l.querySelectorAll('.tok-draft')].map(s => s.title),
  histSteps: [...l.querySelectorAll('.hist .bar')].reduce((n, b) => n + +b.dataset.count, 0),
  shownAccepted: +l.querySelector('.f-accepted').textContent,
}))"""


def test_the_page_races_two_methods_and_colours_the_drafts(live, gen, browser):
    query = urlencode({"prompt": PROMPT, "method": "pld", "race": "ar", "max_tokens": MAX_TOKENS,
                       "temperature": 0, "chat": 0, "autorun": 1})
    browser.open(f"{live.url}/?{query}")
    browser.wait_for("document.body.dataset.state === 'done'")
    lanes = {lane["method"]: lane for lane in browser.evaluate(LANES)}
    assert set(lanes) == {"pld", "ar"}
    for method, lane in lanes.items():
        ref = gen.generate(PROMPT, max_new_tokens=MAX_TOKENS, method=method)
        assert lane["state"] == "done"
        assert lane["text"] == ref.text
        assert lane["usageAccepted"] == ref.stats.accepted
        # the colours match the response's figures
        assert lane["draftTokens"] == lane["usageAccepted"] == lane["shownAccepted"]
        assert lane["allTokens"] == lane["usageTokens"] == len(ref.token_ids)
        assert lane["histSteps"] == lane["usageSteps"] == ref.stats.steps
    assert lanes["pld"]["draftTokens"] > 0 and lanes["ar"]["draftTokens"] == 0
    assert all("drafted by pld" in t for t in lanes["pld"]["draftTitles"])
    colours = browser.evaluate("""['tok-draft', 'tok-target'].map(c =>
        getComputedStyle(document.querySelector('.lane .' + c)).backgroundColor)""")
    assert colours[0] != colours[1]


def test_the_page_shows_a_request_error(live, browser):
    query = urlencode({"prompt": PROMPT, "method": "sps", "max_tokens": 8, "chat": 0, "autorun": 1})
    browser.open(f"{live.url}/?{query}")
    browser.wait_for("document.body.dataset.state === 'done'")
    lane = browser.evaluate("document.querySelector('.lane').dataset.state")
    status = browser.evaluate("document.querySelector('.lane .status').textContent")
    assert lane == "error" and "draft model" in status
