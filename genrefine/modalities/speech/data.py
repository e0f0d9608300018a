"""The training speech: sentences cut from documentation on the machine, spoken by Debian's flite.

Text: sentences of :data:`MIN_WORDS`..:data:`MAX_WORDS` plain lowercase words taken from the
standard library's docstrings and the language reference (:mod:`genrefine.train.corpus`; on every
machine with Python, unrelated to any benchmark), deduplicated and sorted. A sentence is held out
(never trained on; the bench's prompts) when a hash of its text says so (:func:`is_held_out`), so
the split does not depend on the order or number of sentences.

Speech: ``flite`` (a Debian package) in several voices (:data:`VOICES`) and rates
(:data:`RATES`, flite's ``duration_stretch``), 16 kHz mono. Each utterance's voice and rate are
drawn from the seed, so ``synthesize_corpus(n, seed)`` is the same on every machine with the same
flite. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

SAMPLE_RATE = 16_000
VOICES = ("slt", "rms", "awb")  # flite's US English voices: one female, two male
RATES = (0.9, 1.0, 1.15)  # flite's duration_stretch: larger is slower
MIN_WORDS, MAX_WORDS = 3, 9
MAX_WORD_LEN = 12
HELD_OUT_PER_MILLE = 40  # sentences whose hash falls below this (of 1000) are held out
# the characters a text may use after normalization (lowercase letters, apostrophe, space)
ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"

_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)?$")


def normalize_text(text: str) -> str:
    """``text`` as the speech model reads it: lowercase, punctuation and dashes as spaces,
    runs of spaces collapsed. A ConfigError for characters it cannot speak (digits, non-Latin
    letters), naming them."""
    t = text.lower().replace("\u2019", "'")
    t = re.sub(r"[\s\-_/.,;:!?\"()\[\]{}]+", " ", t).strip()
    bad = sorted({c for c in t if c not in ALPHABET})
    if bad:
        raise ConfigError(
            "the speech model reads English letters only: spell out or remove "
            + " ".join(repr(c) for c in bad)
        )
    if not t:
        raise ConfigError("the text to speak is empty: give a few English words")
    return t


def _plain(word: str) -> str | None:
    """``word`` lowercased when it is a plain English word (lowercase or capitalized letters,
    one apostrophe at most), else None: identifiers, acronyms and numbers are skipped."""
    if not (word.islower() or (word[:1].isupper() and word[1:].islower())):
        return None
    w = word.lower()
    return w if _WORD.match(w) and len(w) <= MAX_WORD_LEN else None


def _chunks(text: str) -> list[str]:
    """Phrases of MIN_WORDS..MAX_WORDS plain words from raw text: runs of plain words between
    punctuation or other tokens, long runs cut into nearly equal pieces."""
    out: list[str] = []
    for clause in re.split(r"[.!?;:,()\[\]{}\"`*=<>|#@$%^&+~]|\s[-\u2014]+\s|\n\s*\n", text):
        run: list[str] = []
        for tok in clause.split() + [""]:
            w = _plain(tok) if tok else None
            if w is not None:
                run.append(w)
                continue
            if len(run) >= MIN_WORDS:
                pieces = -(-len(run) // MAX_WORDS)
                size = -(-len(run) // pieces)
                for i in range(0, len(run), size):
                    part = run[i:i + size]
                    if len(part) >= MIN_WORDS:
                        out.append(" ".join(part))
            run = []
    return out


def documentation_sentences() -> list[str]:
    """Every usable phrase of the installed documentation, deduplicated and sorted."""
    from ...train.corpus import _reference_topics, _stdlib_docstrings

    texts = [doc for _, doc in _stdlib_docstrings()] + _reference_topics()
    out: set[str] = set()
    for text in texts:
        out.update(_chunks(text))
    if not out:
        raise ConfigError("no sentences found in the installed documentation (is the stdlib there?)")
    return sorted(out)


def is_held_out(sentence: str) -> bool:
    """Whether ``sentence`` is held out of training (a stable hash of its text)."""
    h = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:4], "big") % 1000
    return h < HELD_OUT_PER_MILLE


def split_sentences() -> tuple[list[str], list[str]]:
    """``(training, held_out)`` sentences."""
    all_ = documentation_sentences()
    return [s for s in all_ if not is_held_out(s)], [s for s in all_ if is_held_out(s)]


def wav_bytes_pcm(audio: np.ndarray) -> bytes:
    """16-bit little-endian PCM of float samples (clipped to [-1, 1])."""
    a = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (a * 32767.0).round().astype("<i2").tobytes()


def synthesize(text: str, voice: str = "slt", rate: float = 1.0) -> np.ndarray:
    """``text`` spoken by flite's ``voice`` at ``rate`` (duration stretch): float32, 16 kHz."""
    from .asr import synthesize as flite

    if voice not in VOICES:
        raise ConfigError(f"unknown voice {voice!r}: one of {', '.join(VOICES)}")
    audio, sr = flite(text, voice, rate)
    if sr != SAMPLE_RATE:
        raise ConfigError(f"flite's voice {voice} speaks at {sr} Hz, not {SAMPLE_RATE}")
    return audio


@dataclass
class Utterance:
    text: str
    voice: int  # index into VOICES
    rate: int  # index into RATES
    audio: np.ndarray  # float32 [T], 16 kHz


def synthesize_corpus(sentences: list[str], seed: int, workers: int = 2,
                      progress: Callable[[int], None] | None = None) -> list[Utterance]:
    """Each sentence spoken once, in a voice and rate drawn from ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    plan = [(s, int(rng.integers(len(VOICES))), int(rng.integers(len(RATES)))) for s in sentences]
    def one(item):
        s, v, r = item
        return Utterance(s, v, r, synthesize(s, VOICES[v], RATES[r]))

    out: list[Utterance] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for u in ex.map(one, plan):
            out.append(u)
            if progress is not None:
                progress(1)
    return out
