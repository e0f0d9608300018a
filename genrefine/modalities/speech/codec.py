"""The audio tokenizer: one code per log-mel frame (k-means), decoded by a small network and
Griffin-Lim.

* Features: log-mel frames of 16 kHz audio (:func:`.quality.log_mel`: 1024-point FFT, hop 256 =
  62.5 frames/s, 80 triangular mel bands from 0 to 8 kHz), ``log(mel magnitude + 1e-5)``.
* Encoding: each frame's nearest centroid of a k-means codebook (``codebook_size`` codes) fitted
  on training frames. One code per frame, so a second of speech is 62.5 tokens.
* Decoding: a small convolutional network over the code sequence (it sees neighbouring codes, so
  it smooths what one centroid per frame cannot say) predicts the log-mel frames; the mel
  magnitudes go back to a linear spectrogram through the filterbank's pseudo-inverse, and
  Griffin-Lim (:data:`GL_ITERS` iterations, phase from a fixed seed) makes the waveform.

Everything is deterministic given the seeds; the weights are a plain state dict (safetensors).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor, nn

from .quality import HOP, N_FFT, N_MELS, SAMPLE_RATE, log_mel, mel_filterbank

GL_ITERS = 48
MIN_GL_FRAMES = 8  # shorter mel sequences are padded with silence for Griffin-Lim
__all__ = ["Codec", "CodeDecoder", "griffin_lim", "kmeans", "log_mel", "mel_filterbank",
           "HOP", "N_FFT", "N_MELS", "SAMPLE_RATE", "GL_ITERS"]


@functools.lru_cache(maxsize=4)
def _mel_pinv(n_mels: int = N_MELS) -> Tensor:
    return torch.linalg.pinv(mel_filterbank(n_mels=n_mels))


def griffin_lim(logmel: Tensor, iters: int = GL_ITERS, seed: int = 0) -> np.ndarray:
    """float32 audio [T] from [frames, N_MELS] log-mel frames (Griffin-Lim, seeded phase)."""
    frames = logmel.shape[0]
    if frames < MIN_GL_FRAMES:  # too short for the STFT's padding: pad with silence, cut after
        pad = logmel.new_full((MIN_GL_FRAMES - frames, logmel.shape[1]), math.log(1e-5))
        return griffin_lim(torch.cat([logmel, pad]), iters, seed)[: frames * HOP]
    mag = (_mel_pinv() @ logmel.float().exp().T).clamp_min(1e-6)  # [bins, frames]
    window = torch.hann_window(N_FFT)
    g = torch.Generator().manual_seed(seed)
    phase = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=g))
    for _ in range(iters):
        y = torch.istft(mag * phase, N_FFT, HOP, window=window)
        c = torch.stft(y, N_FFT, HOP, window=window, return_complex=True)
        phase = c / c.abs().clamp_min(1e-8)
    y = torch.istft(mag * phase, N_FFT, HOP, window=window)
    peak = float(y.abs().max()) if y.numel() else 0.0
    if peak > 0.99:
        y = y * (0.99 / peak)
    return y.numpy().astype(np.float32)


def kmeans(x: Tensor, k: int, iters: int, seed: int, progress=None) -> Tensor:
    """[k, d] centroids of the rows of ``x`` (Lloyd's algorithm, k-means++-free: random rows
    to start, empty clusters re-seeded from the rows worst served)."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        d = torch.cdist(x, c)
        a = d.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).float()
        empty = counts == 0
        c = sums / counts.clamp_min(1).unsqueeze(1)
        if empty.any():
            worst = d.gather(1, a.unsqueeze(1)).squeeze(1).topk(int(empty.sum())).indices
            c[empty] = x[worst]
        if progress is not None:
            progress(1)
    return c


class CodeDecoder(nn.Module):
    """Codes [B, T] -> log-mel [B, T, N_MELS]: the centroids plus a convolutional correction
    that sees ``2 * layers`` neighbouring codes on each side."""

    def __init__(self, codebook: Tensor, width: int = 256, layers: int = 3, kernel: int = 5) -> None:
        super().__init__()
        k, d = codebook.shape
        self.register_buffer("codebook", codebook.clone().float())
        self.embed = nn.Embedding(k, width)
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, kernel, padding=kernel // 2) for _ in range(layers)
        )
        self.out = nn.Conv1d(width, d, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, codes: Tensor) -> Tensor:
        h = self.embed(codes).transpose(1, 2)  # [B, W, T]
        for conv in self.convs:
            h = h + torch.nn.functional.gelu(conv(h))
        return self.codebook[codes] + self.out(h).transpose(1, 2)


class Codec(nn.Module):
    """Audio <-> codes: :meth:`encode` (nearest centroid per log-mel frame), :meth:`decode`
    (network + Griffin-Lim)."""

    def __init__(self, codebook: Tensor, width: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.decoder = CodeDecoder(codebook, width, layers)

    @property
    def codebook(self) -> Tensor:
        return self.decoder.codebook

    @property
    def codebook_size(self) -> int:
        return int(self.decoder.codebook.shape[0])

    def encode_features(self, logmel: Tensor) -> Tensor:
        """[frames] long codes of [frames, N_MELS] log-mel frames."""
        return torch.cdist(logmel.float(), self.codebook).argmin(1)

    def encode(self, audio, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """[frames] long codes of 16 kHz audio."""
        return self.encode_features(log_mel(audio, sample_rate))

    @torch.no_grad()
    def decode_features(self, codes) -> Tensor:
        """[frames, N_MELS] log-mel frames of a code sequence."""
        c = torch.as_tensor(codes, dtype=torch.long).reshape(1, -1)
        if c.numel() == 0:
            return torch.zeros(0, self.codebook.shape[1])
        return self.decoder(c)[0]

    def decode(self, codes, seed: int = 0) -> np.ndarray:
        """float32 16 kHz audio of a code sequence (empty for no codes)."""
        feats = self.decode_features(codes)
        if len(feats) == 0:
            return np.zeros(0, dtype=np.float32)
        return griffin_lim(feats, seed=seed)
