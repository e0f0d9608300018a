"""The offline recognizer that measures intelligibility, and its floor.

:class:`Recognizer` wraps pocketsphinx (PyPI ``pocketsphinx`` with its bundled US English
acoustic model, language model and dictionary; the optional extra ``speech``). It takes float
audio at any sample rate, resamples it to the 16 kHz the model expects (band-limited, see
:func:`.quality.resample`), scales it to a fixed peak so quiet or loud audio neither vanishes in
16-bit rounding nor clips, and decodes it as one utterance.

:func:`recognizer_floor` reports the recognizer's own error rates on the synthesizer's original
audio (Debian's ``flite``), the floor under any WER measured on generated speech.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from .quality import SAMPLE_RATE, _as_numpy, error_rates, normalize_text, read_wav, resample

INSTALL_HINT = "pip install 'genrefine[speech]'"
FLITE_VOICES = ("slt", "rms", "awb")
_PEAK = 0.9  # decoder input peak, as a fraction of int16 full scale
_SILENCE = 1e-4  # audio whose peak is below this is silence: transcribed as ""


class Recognizer:
    """Offline US English speech recognizer (pocketsphinx). One decoder, built on first use and
    reused; calls are serialized by a lock, so sharing one instance between threads is safe but
    not parallel."""

    def __init__(self):
        try:
            import pocketsphinx  # noqa: F401
        except ImportError:
            raise ConfigError(f"speech recognition needs pocketsphinx: {INSTALL_HINT}") from None
        self._decoder = None
        self._lock = threading.Lock()

    def _get_decoder(self):
        if self._decoder is None:
            from pocketsphinx import Decoder

            self._decoder = Decoder(samprate=SAMPLE_RATE, logfn=os.devnull)
        return self._decoder

    def transcribe(self, audio, sample_rate: int = SAMPLE_RATE) -> str:
        """float audio [T] in [-1, 1] at ``sample_rate`` -> the recognized words, lowercase and
        space-separated ("" for empty or silent audio)."""
        x = _as_numpy(audio)
        if not np.all(np.isfinite(x)):
            raise ConfigError("audio to transcribe contains NaN or infinite samples")
        if sample_rate != SAMPLE_RATE:
            x = resample(x, sample_rate, SAMPLE_RATE)
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak < _SILENCE:
            return ""
        pcm = np.round(x * (_PEAK * 32767.0 / peak)).astype("<i2").tobytes()
        with self._lock:
            d = self._get_decoder()
            d.start_utt()
            d.process_raw(pcm, full_utt=True)
            d.end_utt()
            hyp = d.hyp()
        return normalize_text(hyp.hypstr) if hyp is not None else ""


@functools.lru_cache(maxsize=4)
def flite_voices(exe: str = "flite") -> tuple[str, ...]:
    """The voice names the installed flite knows (``flite -lv``)."""
    out = subprocess.run([exe, "-lv"], capture_output=True, text=True).stdout
    return tuple(out.partition(":")[2].split())


def synthesize(text: str, voice: str = "slt", stretch: float = 1.0) -> tuple[np.ndarray, int]:
    """Speak ``text`` with Debian's flite -> (float32 audio [T], sample rate). ``stretch`` is
    flite's duration_stretch (above 1: slower)."""
    exe = shutil.which("flite")
    if exe is None:
        raise ConfigError("speech synthesis needs Debian's flite: apt-get install flite")
    voices = flite_voices(exe)
    if voice not in voices:  # flite itself falls back to its default voice without a word
        raise ConfigError(f"flite has no voice {voice!r}; its voices: {', '.join(voices)}")
    with tempfile.TemporaryDirectory(prefix="genrefine-flite-") as tmp:
        txt, wav = Path(tmp) / "in.txt", Path(tmp) / "out.wav"
        txt.write_text(text)
        cmd = [exe, "-voice", voice, "--setf", f"duration_stretch={stretch}", "-f", str(txt),
               "-o", str(wav)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise ConfigError(f"flite failed for voice {voice!r}: {msg[-1] if msg else proc.returncode}")
        return read_wav(wav)


def recognizer_floor(texts: list[str], voices: tuple[str, ...] = FLITE_VOICES,
                     recognizer: Recognizer | None = None) -> dict:
    """The recognizer's error rates on flite's own audio of ``texts`` (text i in voice
    ``voices[i % len(voices)]``): ``{"wer", "cer", "transcripts", "voices"}``, WER and CER
    corpus-level fractions as in :func:`.quality.error_rates`."""
    texts = list(texts)
    if not voices:
        raise ConfigError("recognizer_floor needs at least one flite voice")
    rec = recognizer if recognizer is not None else Recognizer()
    used, transcripts = [], []
    for i, text in enumerate(texts):
        voice = voices[i % len(voices)]
        audio, sr = synthesize(text, voice)
        transcripts.append(rec.transcribe(audio, sample_rate=sr))
        used.append(voice)
    out = dict(error_rates(texts, transcripts))
    out["transcripts"] = transcripts
    out["voices"] = used
    return out
