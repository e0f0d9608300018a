"""The speech transformer's token ids (:class:`TokenLayout`): what the training writes and the
API reads."""

from __future__ import annotations

from dataclasses import dataclass

from .data import ALPHABET, RATES, VOICES


@dataclass(frozen=True)
class TokenLayout:
    """The speech transformer's ids: codes ``0 .. C-1``, end ``C``, then the characters of
    :data:`~genrefine.modalities.speech.data.ALPHABET`, the voices, the rates, and start."""

    codebook_size: int
    n_chars: int
    n_voices: int
    n_rates: int

    @property
    def end(self) -> int:
        return self.codebook_size

    @property
    def char_offset(self) -> int:
        return self.codebook_size + 1

    @property
    def voice_offset(self) -> int:
        return self.char_offset + self.n_chars

    @property
    def rate_offset(self) -> int:
        return self.voice_offset + self.n_voices

    @property
    def start(self) -> int:
        return self.rate_offset + self.n_rates

    @property
    def vocab_size(self) -> int:
        return self.start + 1

    def prompt(self, text: str, voice: int, rate: int) -> list[int]:
        """``[voice, rate] + characters + [start]`` of normalized ``text``."""
        return ([self.voice_offset + voice, self.rate_offset + rate]
                + [self.char_offset + ALPHABET.index(c) for c in text] + [self.start])


def layout_for(codebook_size: int) -> TokenLayout:
    """The layout of a model over ``codebook_size`` codes with this package's alphabet, voices
    and rates."""
    return TokenLayout(codebook_size, len(ALPHABET), len(VOICES), len(RATES))
