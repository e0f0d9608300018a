"""Quality of generated speech: intelligibility (WER/CER of a recognizer's transcript against the
input text) and a spectral distance between two utterances; plus the audio helpers the speech
modules share (WAV files, resampling, log-mel features).

Audio is 16 kHz mono float32 in [-1, 1] (numpy ``[T]``) unless a ``sample_rate`` says otherwise.

Terms, defined once:

- **WER / CER** are corpus-level: ``(S + D + I) / N`` with substitutions, deletions and insertions
  of the word (character) alignment summed over all utterances and ``N`` the number of reference
  words (characters, spaces included) over all utterances. Both are fractions, not percentages.
  Texts are compared after :func:`normalize_text` on both sides.
- **log-mel**: magnitude STFT (n_fft 1024, Hann window, hop 256, centred) through 80 HTK-style
  triangular mel filters over 0..8 kHz (:func:`mel_filterbank`), then ``log(mel + 1e-5)``.
- **spectral distance**: mel-cepstral distortion (MCD) in dB. The mel-cepstrum of a frame is the
  cosine series of its log-mel values ``L_m`` (m < 80), ``c_n = (1/80) sum_m L_m cos(pi n (m + 1/2) / 80)``
  (a DCT-II scaled like the real cepstrum of a log-magnitude spectrum, so distances fall in the
  range MCD figures are usually quoted in); c1..c13 are kept (c0, the level, is dropped). The two utterances are aligned
  by dynamic time warping (DTW) with the per-frame distortion
  ``(10 / ln 10) * sqrt(2 * sum_d (c_d - c'_d)^2)`` as local cost and steps (1,0), (0,1), (1,1);
  the result is the mean local cost along the optimal path. Identical audio gives 0.
"""

from __future__ import annotations

import math
import re
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError, GenrefineError

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 256
N_MELS = 80
N_CEPSTRA = 13  # c1..c13
_MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)

# --------------------------------------------------------------------------------------------
# WAV files and resampling


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file (8, 16 or 32-bit integer; channels averaged) -> (float32 audio [T] in
    [-1, 1], sample rate)."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, sr = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise GenrefineError(f"no such WAV file: {path}") from None
    except (wave.Error, EOFError) as e:
        raise GenrefineError(f"{path} is not a PCM WAV file ({e}); convert it to 16-bit PCM") from None
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    else:
        raise GenrefineError(f"{path}: {8 * width}-bit WAV is not supported; use 16-bit PCM")
    if channels > 1:
        x = x.reshape(-1, channels).mean(1)
    return np.ascontiguousarray(x, dtype=np.float32), sr


def write_wav(path: str | Path, audio, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float audio [T] (clipped to [-1, 1]) as a mono 16-bit PCM WAV file."""
    x = _as_numpy(audio)
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def _as_numpy(audio) -> np.ndarray:
    if isinstance(audio, Tensor):
        audio = audio.detach().cpu().numpy()
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ConfigError(f"audio must be mono samples [T], got shape {tuple(x.shape)}")
    return x


def _sinc_kernels(orig: int, new: int, zeros: int, rolloff: float) -> tuple[Tensor, int]:
    """Polyphase windowed-sinc filters for resampling by new/orig (both reduced by their gcd):
    kernels [new, taps] (row k makes output sample k of each block of ``new`` outputs from a
    window of input starting ``pad`` samples before block start) and ``pad``."""
    cutoff = min(orig, new) * rolloff / orig  # low-pass cutoff, in cycles per input sample * 2
    pad = math.ceil(zeros / cutoff)  # half-width of the filter, in input samples
    taps = torch.arange(-pad, pad + orig, dtype=torch.float64)  # [taps] input offsets
    # output k sits at input position k * orig / new (within its block)
    t = taps[None, :] - torch.arange(new, dtype=torch.float64)[:, None] * orig / new  # [new, taps]
    u = t * cutoff
    window = torch.where(u.abs() < zeros, torch.cos(u * math.pi / (2 * zeros)) ** 2, 0.0)
    kernels = cutoff * torch.sinc(u) * window
    return kernels, pad


def resample(audio, orig_sr: int, new_sr: int = SAMPLE_RATE, *, zeros: int = 24,
             rolloff: float = 0.95) -> np.ndarray:
    """float audio [T] at ``orig_sr`` -> float32 [ceil(T * new_sr / orig_sr)] at ``new_sr``.

    Band-limited: windowed-sinc interpolation (``zeros`` zero crossings each side, raised-cosine
    window) with its low-pass at ``rolloff`` of the lower Nyquist frequency, applied as one strided
    convolution per output phase (the rates are reduced by their gcd first).
    """
    x = _as_numpy(audio)
    if orig_sr <= 0 or new_sr <= 0:
        raise ConfigError(f"sample rates must be positive, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr or x.size == 0:
        return x.copy()
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    if new * (orig + 2 * zeros * orig / (min(orig, new) * rolloff)) > 5e7:
        raise ConfigError(f"cannot resample {orig_sr} Hz to {new_sr} Hz directly (the rates share "
                          f"too small a factor); convert the audio to a standard rate first")
    kernels, pad = _sinc_kernels(orig, new, zeros, rolloff)
    n_out = math.ceil(x.size * new / orig)
    blocks = math.ceil(n_out / new)
    xt = torch.from_numpy(x).double()
    # enough right padding for the last block's window: (blocks - 1) * orig + taps samples
    right = (blocks - 1) * orig + kernels.shape[1] - pad - x.size
    xt = torch.nn.functional.pad(xt, (pad, max(right, 0)))
    y = torch.nn.functional.conv1d(xt[None, None], kernels[:, None, :], stride=orig)  # [1, new, blocks]
    y = y[0].t().reshape(-1)[:n_out]
    return y.float().numpy()


# --------------------------------------------------------------------------------------------
# text and error rates

_NON_WORD = re.compile(r"[^a-z0-9']+")


def normalize_text(s: str) -> str:
    """Lowercase words separated by single spaces: everything but letters, digits and in-word
    apostrophes becomes a word break ("Hello, world!" -> "hello world")."""
    words = _NON_WORD.sub(" ", s.lower()).split()
    return " ".join(w.strip("'") for w in words if w.strip("'"))


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """Corpus-level ``{"wer": float, "cer": float}`` (fractions) of hypotheses against references,
    both normalized with :func:`normalize_text` first (see the module docstring)."""
    import jiwer  # in the test and speech extras

    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ConfigError(f"error_rates needs one hypothesis per reference, got {len(refs)} "
                          f"references and {len(hyps)} hypotheses")
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
    if not any(refs):
        raise ConfigError("error_rates needs at least one reference with words in it")
    out = {}
    for key, fn in (("wer", jiwer.process_words), ("cer", jiwer.process_characters)):
        o = fn(refs, hyps)
        errors = o.substitutions + o.deletions + o.insertions
        out[key] = errors / (o.substitutions + o.deletions + o.hits)
    return out


# --------------------------------------------------------------------------------------------
# log-mel features and the spectral distance


def mel_filterbank(n_fft: int = N_FFT, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """HTK-style triangular mel filters (peak 1, no area normalization) -> float32
    [n_mels, n_fft // 2 + 1], mapping a magnitude spectrum to mel bands. f_max defaults to the
    Nyquist frequency."""
    f_max = sample_rate / 2 if f_max is None else f_max

    def to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # [bins]
    lo, hi = to_mel(torch.tensor(f_min, dtype=torch.float64)), to_mel(torch.tensor(f_max, dtype=torch.float64))
    mels = torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # [n_mels + 2] Hz
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - left) / (centre - left)
    down = (right - freqs[None]) / (right - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


_FB_CACHE: dict[tuple, Tensor] = {}


def log_mel(audio, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """float audio [T] -> float32 log-mel features [1 + T16 // 256, 80] (T16: samples at 16 kHz;
    audio at another rate is resampled first). See the module docstring for the definition."""
    x = _as_numpy(audio)
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    key = (N_FFT, N_MELS, SAMPLE_RATE)
    if key not in _FB_CACHE:
        _FB_CACHE[key] = mel_filterbank()
    fb = _FB_CACHE[key]  # [80, 513]
    xt = torch.from_numpy(x)
    if xt.numel() < N_FFT // 2 + 1:  # reflect padding needs more samples than half a window
        xt = torch.nn.functional.pad(xt, (0, N_FFT // 2 + 1 - xt.numel()))
    spec = torch.stft(xt, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,
                      return_complex=True).abs()  # [513, frames]
    frames = 1 + x.size // HOP
    return torch.log(fb @ spec[:, :frames] + 1e-5).t().contiguous()  # [frames, 80]


def _cepstrum_matrix(n: int, k: int) -> Tensor:
    """Cepstral DCT-II rows 0..k-1 over n log-mel bands, ``cos(pi r (m + 1/2) / n) / n``, as a
    float64 [k, n] matrix."""
    m = torch.arange(n, dtype=torch.float64)
    r = torch.arange(k, dtype=torch.float64)
    return torch.cos(math.pi / n * (m[None, :] + 0.5) * r[:, None]) / n


def mel_cepstra(audio, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """float audio [T] -> float64 cepstra c1..c13 [frames, 13] of its log-mel frames."""
    return log_mel(audio, sample_rate).double() @ _cepstrum_matrix(N_MELS, N_CEPSTRA + 1)[1:].t()


def dtw(cost: Tensor) -> tuple[float, int]:
    """Dynamic time warping over a local cost matrix [N, M] (steps (1,0), (0,1), (1,1), from (0,0)
    to (N-1, M-1)) -> (total cost along the optimal path, number of cells on it).

    The accumulated costs are filled one anti-diagonal at a time (each diagonal in one tensor op);
    the path is then traced back from the end to count its cells.
    """
    assert cost.dim() == 2 and cost.shape[0] > 0 and cost.shape[1] > 0, cost.shape
    n, m = cost.shape
    c = cost.double()
    inf = float("inf")
    acc = torch.full((n + 1, m + 1), inf, dtype=torch.float64)  # acc[i+1, j+1]: best to (i, j)
    acc[0, 0] = 0.0
    for d in range(n + m - 1):  # cells with i + j == d
        i = torch.arange(max(0, d - m + 1), min(n, d + 1))
        j = d - i
        best = torch.minimum(torch.minimum(acc[i, j], acc[i, j + 1]), acc[i + 1, j])
        acc[i + 1, j + 1] = c[i, j] + best
    # trace back, preferring the diagonal on ties
    a = acc.numpy()
    i, j, cells = n, m, 1
    while (i, j) != (1, 1):
        diag, up, left = a[i - 1, j - 1], a[i - 1, j], a[i, j - 1]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        cells += 1
    return float(acc[n, m]), cells


def spectral_distance(a, b, sample_rate: int = SAMPLE_RATE) -> float:
    """Mel-cepstral distortion in dB between utterances ``a`` and ``b`` (float audio [T] each)
    after DTW alignment (see the module docstring); 0 for identical audio."""
    ca, cb = mel_cepstra(a, sample_rate), mel_cepstra(b, sample_rate)  # [N, 13], [M, 13]
    # [N, M] per-frame MCD; the direct difference form keeps identical frames at exactly 0
    cost = _MCD_SCALE * torch.cdist(ca, cb, compute_mode="donot_use_mm_for_euclid_dist")
    total, cells = dtw(cost)
    return total / cells


# --------------------------------------------------------------------------------------------


def speech_quality(recognizer, audios, texts: list[str], reference_audios=None,
                   sample_rate: int = SAMPLE_RATE) -> dict:
    """Transcribe each generated utterance and score it against its input text.

    audios: float audio [T_i] per utterance; texts: the text each was generated from;
    reference_audios: optional utterances to compare with (e.g. ``ar``'s output for the same
    text), all at ``sample_rate``. Returns ``{"wer", "cer", "spectral_distance", "transcripts"}``;
    ``spectral_distance`` is the mean over utterances, ``None`` without references.
    """
    audios, texts = list(audios), list(texts)
    if len(audios) != len(texts):
        raise ConfigError(f"speech_quality needs one text per utterance, got {len(audios)} "
                          f"utterances and {len(texts)} texts")
    transcripts = [recognizer.transcribe(a, sample_rate=sample_rate) for a in audios]
    out = dict(error_rates(texts, transcripts))
    out["spectral_distance"] = None
    if reference_audios is not None:
        refs = list(reference_audios)
        if len(refs) != len(audios):
            raise ConfigError(f"speech_quality needs one reference per utterance, got "
                              f"{len(refs)} references for {len(audios)} utterances")
        dists = [spectral_distance(a, r, sample_rate) for a, r in zip(audios, refs)]
        out["spectral_distance"] = float(np.mean(dists)) if dists else None
    out["transcripts"] = transcripts
    return out
