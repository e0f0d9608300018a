"""Token ids to text, a piece at a time, with stop strings.

The text sent so far is always a prefix of the final text: a piece is held back while it ends in
an incomplete multi-byte character or in what could be the start of a stop string, so a client
that concatenates the streamed pieces gets exactly the non-streamed text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class TextTracker:
    """Accumulates one generation's token ids and says what text may be sent."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), lock: threading.Lock | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.lock = lock or threading.Lock()  # tokenizers are not safe across threads
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was found; the text ends before it

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int]) -> str:
        """Take new token ids; returns the new text that is safe to send (may be empty).

        Sets :attr:`stopped` when the text now contains a stop string.
        """
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in ids)
        text = self._decode()
        if self.stops:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                return self._take(text[:cut])
        end = len(text)
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete multi-byte character: wait for the rest
        end -= self._held_for_stops(text[:end])
        return self._take(text[:end])

    def finish(self) -> str:
        """The generation ended: whatever was held back."""
        if self.stopped:
            return ""
        return self._take(self._decode())

    @property
    def text(self) -> str:
        return self.sent

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
