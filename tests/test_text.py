"""Token ids to text with stop strings (genrefine/text.py), and the API that streams through it.

A stop string that arrives split over two chunks of accepted tokens must never show its first
part: not in the API's stream, not in ``generate``'s text (the CLI's ``--stop`` is in
test_cli.py). The engine is replaced by one that yields chosen chunks, so the split is exact.
"""

from __future__ import annotations

import pytest

import genrefine
import genrefine.api as api_mod
from genrefine.text import TextTracker
from tiny import byte_tokenizer, save_tiny_model_dir

# "time" is split over the first two chunks; "END" over the last two
CHUNKS = ["Once upon a ti", "me there was an E", "ND of it"]


class ChunkEngine:
    """Stands in for :class:`genrefine.engine.Engine`: yields the ids of :data:`CHUNKS`, one
    list per chunk, as an engine yields the tokens of each step."""

    def __init__(self, model, method) -> None:
        self.finish_reason = None

    def generate(self, prompt_ids, max_new_tokens, params, eos_ids, stats):
        tok = byte_tokenizer()
        for chunk in CHUNKS:
            yield tok(chunk).input_ids[1:]  # no BOS
        self.finish_reason = "length"


@pytest.fixture
def chunk_engine(monkeypatch):
    monkeypatch.setattr(api_mod, "Engine", ChunkEngine)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama", "llama")
    return genrefine.load(str(d), dtype="float32", quiet=True)


def test_tracker_holds_back_stop_prefixes_and_partial_characters() -> None:
    tok = byte_tokenizer()
    ids = tok("héllo END there").input_ids[1:]
    t = TextTracker(tok, ["END"])
    pieces = [t.add([i]) for i in ids]
    assert "".join(pieces) == "héllo " and t.stopped and t.finish() == ""
    assert all("\ufffd" not in p for p in pieces)
    assert t.token_ids == ids[:7]  # "héllo " is 7 bytes; nothing of "END" or after it
    t = TextTracker(tok, ["ENDING"])
    pieces = [t.add([i]) for i in ids] + [t.finish()]
    assert "".join(pieces) == "héllo END there" and not t.stopped and t.token_ids == ids


def test_tracker_counts_a_token_that_straddles_the_stop() -> None:
    tok = byte_tokenizer()
    t = TextTracker(tok, ["ab"])
    assert t.add(tok("xya").input_ids[1:]) == "xy"  # "a" may begin "ab": held back
    assert t.add(tok("b z").input_ids[1:]) == "" and t.stopped
    assert t.text == "xy" and len(t.token_ids) == 2 and len(t.ids) == 6


@pytest.mark.parametrize("stop, text, reason", [
    ("time", "Once upon a ", "stop"),
    ("END", "Once upon a time there was an ", "stop"),
    (["tiger", "Eagle"], "".join(CHUNKS), "length"),  # held back, then released
])
def test_api_stream_never_shows_a_stop_split_over_two_chunks(gen, chunk_engine, stop, text,
                                                             reason) -> None:
    s = gen.stream("hello", max_new_tokens=64, stop=stop)
    pieces = list(s)
    assert "".join(pieces) == text
    for i in range(1, len(pieces) + 1):  # every prefix of the stream is a prefix of the text
        assert text.startswith("".join(pieces[:i]))
    assert s.result.text == text and s.result.finish_reason == reason
    assert len(s.result.token_ids) == len(text)  # one byte token per character here


@pytest.mark.parametrize("stop, text", [("time", "Once upon a "), ("END", "Once upon a time there was an ")])
def test_api_generate_text_ends_before_a_split_stop(gen, chunk_engine, stop, text) -> None:
    r = gen.generate("hello", max_new_tokens=64, stop=[stop])
    assert r.text == text and r.finish_reason == "stop"
    assert r.token_ids == byte_tokenizer()(text).input_ids[1:]
