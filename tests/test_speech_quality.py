"""Speech quality measures (issue 20): text normalization, corpus WER/CER, WAV files, resampling,
log-mel features, the DTW spectral distance, and the pocketsphinx recognizer on flite's speech."""

from __future__ import annotations

import itertools
import math
import shutil
import sys
import wave

import numpy as np
import pytest
import torch

from genrefine.errors import ConfigError, GenrefineError
from genrefine.modalities.speech import asr
from genrefine.modalities.speech import quality as q

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="Debian's flite is not installed (apt-get install flite)")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me tomorrow morning.",
    "This is a test of the speech recognizer.",
]


def _sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return np.argmax(spec) * sr / x.size


# ---------------------------------------------------------------------------------------------
# text and error rates


@pytest.mark.parametrize("raw, want", [
    ("Hello, World!", "hello world"),
    ("  It's   'quoted' -- don't\n", "it's quoted don't"),
    ("well-known 42 things.", "well known 42 things"),
    ("?!", ""),
])
def test_normalize_text(raw, want):
    assert q.normalize_text(raw) == want


def test_error_rates_are_corpus_level_on_a_hand_computed_example():
    # utterance 1: one substitution in 3 words, "cat"->"bat" one character in 11;
    # utterance 2: one inserted word in 2, " c" two inserted characters in 3.
    # Corpus: WER 2/5 (the mean of per-utterance rates would be (1/3 + 1/2) / 2), CER 3/14.
    r = q.error_rates(["The cat sat.", "A b"], ["the bat sat", "a b c"])
    assert r["wer"] == pytest.approx(2 / 5)
    assert r["cer"] == pytest.approx(3 / 14)


def test_error_rates_normalize_both_sides_and_count_empty_hypotheses():
    assert q.error_rates(["Hello, there!"], ["hello there"]) == {"wer": 0.0, "cer": 0.0}
    r = q.error_rates(["one two", "three"], ["one two", ""])
    assert r["wer"] == pytest.approx(1 / 3)
    assert r["cer"] == pytest.approx(5 / 12)


def test_error_rates_reject_mismatched_lengths_and_empty_references():
    with pytest.raises(ConfigError, match="one hypothesis per reference"):
        q.error_rates(["a b", "c"], ["a b"])
    with pytest.raises(ConfigError, match="at least one reference"):
        q.error_rates(["...", ""], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# WAV files and resampling


def test_wav_round_trip_and_mono_mixdown(tmp_path):
    x = _sine(440, 22050, 0.2)
    q.write_wav(tmp_path / "a.wav", x, 22050)
    y, sr = q.read_wav(tmp_path / "a.wav")
    assert sr == 22050 and y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() < 1 / 16000
    # a stereo file is averaged to mono
    pcm = np.stack([np.full(100, 8192), np.full(100, -16384)], 1).astype("<i2")
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    y, _ = q.read_wav(tmp_path / "s.wav")
    assert y.shape == (100,) and np.allclose(y, (0.25 - 0.5) / 2)


def test_write_wav_clips_instead_of_wrapping(tmp_path):
    q.write_wav(tmp_path / "c.wav", np.array([2.0, -2.0, 0.5], np.float32))
    y, _ = q.read_wav(tmp_path / "c.wav")
    assert y[0] > 0.99 and y[1] < -0.99 and y[2] == pytest.approx(0.5, abs=1e-4)


def test_read_wav_errors_are_user_errors(tmp_path):
    with pytest.raises(GenrefineError, match="no such WAV"):
        q.read_wav(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(GenrefineError, match="not a PCM WAV"):
        q.read_wav(tmp_path / "bad.wav")


def test_resampling_keeps_a_sines_frequency_and_shape_22050_to_16000():
    x = _sine(1000, 22050)
    y = q.resample(x, 22050, 16000)
    assert y.dtype == np.float32 and y.size == math.ceil(x.size * 16000 / 22050)
    assert _peak_freq(y, 16000) == pytest.approx(1000, abs=2)
    # away from the edges it is the same sine sampled at 16 kHz
    want = _sine(1000, 16000)
    assert np.abs(y[400:-400] - want[400:-400]).max() < 2e-3


def test_resampling_up_16000_to_22050():
    y = q.resample(_sine(3000, 16000), 16000, 22050)
    want = _sine(3000, 22050)
    assert y.size == want.size
    assert np.abs(y[600:-600] - want[600:-600]).max() < 2e-3


def test_resampling_is_band_limited():
    """A 10 kHz tone does not exist at 16 kHz (Nyquist 8 kHz): it must be filtered out, not
    aliased to 6 kHz as naive interpolation would do."""
    x = _sine(10000, 22050)
    y = q.resample(x, 22050, 16000)
    assert np.sqrt(np.mean(y[400:-400] ** 2)) < 0.01
    naive = np.interp(np.arange(16000) / 16000, np.arange(x.size) / 22050, x)
    assert np.sqrt(np.mean(naive ** 2)) > 0.1  # the check above can fail


def test_resampling_same_rate_and_bad_rates():
    x = _sine(500, 16000, 0.1)
    assert np.array_equal(q.resample(x, 16000, 16000), x)
    with pytest.raises(ConfigError):
        q.resample(x, 0, 16000)
    with pytest.raises(ConfigError, match="standard rate"):
        q.resample(x, 44100, 16001)


# ---------------------------------------------------------------------------------------------
# log-mel and the spectral distance


def test_mel_filterbank_shape_and_peaks():
    fb = q.mel_filterbank()
    assert fb.shape == (80, 513) and fb.dtype == torch.float32
    # triangles of height 1 sampled at the FFT bins: none empty, none above 1
    assert fb.min() >= 0 and fb.max() <= 1 and torch.all(fb.max(1).values > 0.2)
    centres = fb.argmax(1)
    assert torch.all(centres[1:] >= centres[:-1])  # ordered by frequency


def test_log_mel_shape_and_a_tone_lands_in_its_band():
    x = _sine(1000, 16000)
    m = q.log_mel(x)
    assert m.shape == (1 + x.size // 256, 80) and m.dtype == torch.float32
    fb = q.mel_filterbank()
    bin_1k = round(1000 * 1024 / 16000)
    assert int(m[10:-10].mean(0).argmax()) == int(fb[:, bin_1k].argmax())
    # silence is the floor log(1e-5); other rates are resampled first
    assert torch.allclose(q.log_mel(np.zeros(4000, np.float32)), torch.tensor(math.log(1e-5)))
    m22 = q.log_mel(_sine(1000, 22050), sample_rate=22050)
    loud = m[10:-10].mean(0) > -4  # bands near the tone (the rest sit at the floor)
    assert loud.sum() >= 2
    assert m22.shape == m.shape and (m22[10:-10, loud] - m[10:-10, loud]).abs().max() < 0.1


def _all_paths_min(cost):
    """Brute force: the cheapest monotone path's (cost, cells) over all step sequences."""
    n, m = cost.shape
    best = None

    def walk(i, j, total, cells):
        nonlocal best
        total += cost[i, j]
        if (i, j) == (n - 1, m - 1):
            if best is None or total < best[0] - 1e-12:
                best = (total, cells)
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                walk(i + di, j + dj, total, cells + 1)

    walk(0, 0, 0.0, 1)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dtw_matches_brute_force_on_small_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(4, 5, generator=g, dtype=torch.float64)
    total, cells = q.dtw(cost)
    want_total, _ = _all_paths_min(cost.numpy())
    assert total == pytest.approx(want_total)
    assert 5 <= cells <= 8


def test_dtw_aligns_a_time_stretched_copy_at_zero_cost():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])[:, None]
    b = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0])[:, None]
    total, cells = q.dtw(torch.cdist(a, b))
    assert total == 0.0 and cells == 7


def test_spectral_distance_on_synthetic_audio():
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(8000)).astype(np.float32)
    assert q.spectral_distance(x, x) == 0.0
    assert q.spectral_distance(x, _sine(700, 16000, 0.5)) > 1.0


@needs_flite
def test_spectral_distance_on_flite_speech():
    a, _ = asr.synthesize(SENTENCES[0], "slt")
    slow, _ = asr.synthesize(SENTENCES[0], "slt", stretch=1.15)
    other, _ = asr.synthesize(SENTENCES[1], "slt")
    assert q.spectral_distance(a, a) == 0.0
    same_words = q.spectral_distance(a, slow)  # DTW absorbs the tempo
    assert 0.0 < same_words < 0.5 * q.spectral_distance(a, other)


# ---------------------------------------------------------------------------------------------
# the recognizer


def test_recognizer_without_pocketsphinx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'genrefine\[speech\]'"):
        asr.Recognizer()


def test_synthesize_without_flite_says_how_to_install(monkeypatch):
    monkeypatch.setattr(asr.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install flite"):
        asr.synthesize("hello")
    with pytest.raises(ConfigError, match="flite"):
        asr.recognizer_floor(["hello"], recognizer=object())


@needs_flite
def test_synthesize_rejects_an_unknown_voice():
    """flite itself would speak in its default voice instead."""
    with pytest.raises(ConfigError, match="no voice 'nosuch'.*slt"):
        asr.synthesize("hello", "nosuch")


@pytest.fixture(scope="module")
def recognizer():
    return asr.Recognizer()


def test_recognizer_returns_nothing_for_empty_or_silent_audio(recognizer):
    assert recognizer.transcribe(np.zeros(0, np.float32)) == ""
    assert recognizer.transcribe(np.zeros(16000, np.float32)) == ""
    with pytest.raises(ConfigError, match="NaN"):
        recognizer.transcribe(np.full(100, np.nan, np.float32))
    with pytest.raises(ConfigError, match="mono"):
        recognizer.transcribe(np.zeros((2, 100), np.float32))


@needs_flite
def test_recognizer_transcribes_flite_speech(recognizer):
    audio, sr = asr.synthesize(SENTENCES[1], "slt")
    assert sr == 16000
    assert recognizer.transcribe(audio) == "please call me tomorrow morning"


@needs_flite
def test_recognizer_is_indifferent_to_level_and_sample_rate(recognizer):
    """Quiet audio is scaled up and loud audio (beyond [-1, 1]) down before the 16-bit
    conversion; 22.05 kHz audio is resampled to 16 kHz. A recognizer that cast the samples
    straight to int16 would hear wrapped-around noise in the loud copy."""
    audio, _ = asr.synthesize(SENTENCES[1], "awb")
    want = recognizer.transcribe(audio)
    assert q.error_rates([SENTENCES[1]], [want])["wer"] <= 0.2
    assert recognizer.transcribe(audio * 0.01) == want
    assert recognizer.transcribe(audio * 4.0) == want
    assert recognizer.transcribe(q.resample(audio, 16000, 22050), sample_rate=22050) == want


@needs_flite
def test_recognizer_floor_on_flite_voices(recognizer):
    r = asr.recognizer_floor(SENTENCES, recognizer=recognizer)
    assert r["voices"] == ["slt", "rms", "awb"]
    assert len(r["transcripts"]) == 3 and all(r["transcripts"])
    assert 0.0 <= r["wer"] <= 0.3 and 0.0 <= r["cer"] <= r["wer"] + 0.1


# ---------------------------------------------------------------------------------------------
# speech_quality


class _Echo:
    """A fake recognizer: 'hears' the words it was told each audio length stands for."""

    def __init__(self, by_length):
        self.by_length = by_length

    def transcribe(self, audio, sample_rate=16000):
        return self.by_length[len(audio)]


def test_speech_quality_scores_and_distances():
    a = _sine(300, 16000, 0.5)
    b = (0.3 * np.random.default_rng(1).standard_normal(9000)).astype(np.float32)
    rec = _Echo({a.size: "hello there", b.size: "good bye now"})
    out = q.speech_quality(rec, [a, b], ["Hello there.", "Good bye!"])
    assert out["transcripts"] == ["hello there", "good bye now"]
    assert out["wer"] == pytest.approx(1 / 4) and out["spectral_distance"] is None
    out = q.speech_quality(rec, [a, b], ["Hello there.", "Good bye!"], reference_audios=[a, a])
    assert out["spectral_distance"] == pytest.approx(q.spectral_distance(b, a) / 2)
    with pytest.raises(ConfigError, match="one text per utterance"):
        q.speech_quality(rec, [a, b], ["x"])
    with pytest.raises(ConfigError, match="one reference per utterance"):
        q.speech_quality(rec, [a, b], ["x", "y"], reference_audios=[a])


@needs_flite
def test_speech_quality_with_the_real_recognizer(recognizer):
    audio, _ = asr.synthesize(SENTENCES[0], "slt")
    out = q.speech_quality(recognizer, [audio], [SENTENCES[0]], reference_audios=[audio])
    assert out["wer"] <= 0.25 and out["spectral_distance"] == 0.0
    assert out["transcripts"][0].startswith("the quick brown fox")
