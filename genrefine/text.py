"""Token ids to text, a piece at a time, with stop strings: the one tracker the Python API (and
so the CLI) and the server share.

The text handed out so far is always a prefix of the final text: a piece is held back while it
ends in an incomplete multi-byte character or in what could be the start of a stop string, and
released once it cannot be (or when the generation ends). So a stop string that arrives split
over two chunks of tokens never shows its first part, and a client that concatenates the
streamed pieces gets exactly the non-streamed text.

This module sits at the bottom of the package: it imports nothing from genrefine.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class TextTracker:
    """Accumulates one generation's token ids and says what text may be handed out.

    tokenizer: anything with ``decode(ids, skip_special_tokens=True)``. stops: stop strings
    (empty ones are ignored); the text ends just before the first one found. lock: held around
    every decode (tokenizers are not safe across threads; the server shares one lock).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), lock: threading.Lock | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.lock = lock or threading.Lock()
        self.ids: list[int] = []  # every id added, including any past a stop string
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was found; the text ends before it
        self._kept: int | None = None  # when stopped: how many ids the returned text needs

    def _decode(self, ids: Sequence[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int]) -> str:
        """Take new token ids; returns the new text that is safe to hand out (may be empty).

        Sets :attr:`stopped` when the text now contains a stop string; later calls return "".
        """
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in ids)
        text = self._decode(self.ids)
        if self.stops:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self._kept = self._ids_for(text[:cut])
                return self._take(text[:cut])
        end = len(text)
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete multi-byte character: wait for the rest
        end -= self._held_for_stops(text[:end])
        return self._take(text[:end])

    def finish(self) -> str:
        """The generation ended: whatever was held back ("" after a stop string)."""
        if self.stopped:
            return ""
        return self._take(self._decode(self.ids))

    @property
    def text(self) -> str:
        """The text handed out so far (after :meth:`finish`, the whole text)."""
        return self.sent

    @property
    def token_ids(self) -> list[int]:
        """The ids whose text is returned: all of them, or after a stop string the shortest
        prefix whose text begins with the returned text (a token that straddles the start of
        the stop string counts; the tokens after it do not)."""
        return self.ids if self._kept is None else self.ids[: self._kept]

    def _ids_for(self, text: str) -> int:
        """The fewest leading ids whose decoding begins with ``text`` (the stop string was found
        in the latest ids, so this walks back over a few of them only)."""
        k = len(self.ids)
        while k > 0 and self._decode(self.ids[: k - 1]).startswith(text):
            k -= 1
        return k

    def _held_for_stops(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _take(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece = text[len(self.sent) :]
        self.sent = text
        return piece
