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
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


def flite_path() -> str:
    """The ``flite`` executable, or a ConfigError saying how to install it."""
    path = shutil.which("flite")
    if path is None:
        raise ConfigError(
            "Debian's flite synthesizer is not installed (it makes the speech training data): "
            "run `apt-get install flite`"
        )
    return path


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


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(float32 samples in [-1, 1], sample rate)`` of a 16-bit mono WAV file."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ConfigError(f"{path}: only 16-bit PCM WAV files are read")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        ch = w.getnchannels()
        sr = w.getframerate()
    x = x.reshape(-1, ch).mean(axis=1) if ch > 1 else x
    return (x.astype(np.float32) / 32768.0), sr


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float32 samples in [-1, 1] as a 16-bit mono WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(wav_bytes_pcm(audio))


def wav_bytes_pcm(audio: np.ndarray) -> bytes:
    """16-bit little-endian PCM of float samples (clipped to [-1, 1])."""
    a = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (a * 32767.0).round().astype("<i2").tobytes()


def synthesize(text: str, voice: str = "slt", rate: float = 1.0) -> np.ndarray:
    """``text`` spoken by flite's ``voice`` at ``rate`` (duration stretch): float32, 16 kHz."""
    if voice not in VOICES:
        raise ConfigError(f"unknown voice {voice!r}: one of {', '.join(VOICES)}")
    exe = flite_path()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "u.wav"
        cmd = [exe, "-voice", voice, "--setf", f"duration_stretch={rate}", "-t", text, "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise ConfigError(f"flite failed on {text!r}: {r.stderr.strip()[:200]}")
        audio, sr = read_wav(out)
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
    flite_path()

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
