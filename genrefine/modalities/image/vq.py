"""The VQ tokenizer: a small convolutional autoencoder whose 8 x 8 latent grid is quantized to
the nearest of ``codebook_size`` code vectors (VQ-VAE, van den Oord et al. 2017).

An image (uint8 [H, W], H = W = 32) becomes ``grid * grid`` code ids in raster order (row by
row), ``grid = H / 4``; :meth:`VQTokenizer.decode` maps ids back to an image. Training
(:mod:`genrefine.train.image`) uses :meth:`VQTokenizer.loss`: reconstruction cross-entropy on
pixel intensities, the codebook term ``|sg(z) - e|^2`` and the commitment term
``beta * |z - sg(e)|^2`` with the straight-through gradient; the codebook is initialized by
k-means on encoder outputs and unused codes are restarted from encoder outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOWNSAMPLE = 4


class _Res(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(ch, ch, 3, padding=1)
        self.b = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(F.gelu(self.a(F.gelu(x))))


class VQTokenizer(nn.Module):
    """Encoder, codebook ([codebook_size, dim]) and decoder; images are uint8 [N, H, W]."""

    def __init__(self, codebook_size: int = 256, dim: int = 16, channels: int = 64, beta: float = 0.25) -> None:
        super().__init__()
        c = channels
        self.codebook_size, self.dim, self.channels, self.beta = codebook_size, dim, channels, beta
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c // 2, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c // 2, c, 4, stride=2, padding=1), _Res(c), _Res(c), nn.GELU(),
            nn.Conv2d(c, dim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, c, 3, padding=1), _Res(c), _Res(c), nn.GELU(),
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(c // 2, 1, 4, stride=2, padding=1),
        )
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * 0.1)  # [C, d]

    def config(self) -> dict:
        """The constructor's arguments (stored in image.json)."""
        return {"codebook_size": self.codebook_size, "dim": self.dim, "channels": self.channels,
                "beta": self.beta, "downsample": DOWNSAMPLE}

    @classmethod
    def from_config(cls, cfg: dict) -> "VQTokenizer":
        return cls(int(cfg["codebook_size"]), int(cfg["dim"]), int(cfg["channels"]), float(cfg["beta"]))

    # ---------------------------------------------------------------- pieces
    def latents(self, x: Tensor) -> Tensor:
        """x [N, 1, H, W] float in [0, 1] -> encoder outputs [N, g*g, d] (raster order)."""
        z = self.encoder(x)  # [N, d, g, g]
        return z.flatten(2).transpose(1, 2)

    def nearest(self, z: Tensor) -> Tensor:
        """z [..., d] -> long [...]: the nearest code (Euclidean)."""
        flat = z.reshape(-1, self.dim)
        e = self.codebook
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d2.argmin(1).view(z.shape[:-1])

    def decode_latents(self, q: Tensor) -> Tensor:
        """q [N, g*g, d] -> pixel logits [N, 1, H, W]."""
        n, t, d = q.shape
        g = int(round(t**0.5))
        return self.decoder(q.transpose(1, 2).reshape(n, d, g, g))

    def loss(self, x: Tensor) -> tuple[Tensor, dict]:
        """x [N, 1, H, W] in [0, 1]: the training loss and logs (rec, commit, codes used)."""
        z = self.latents(x)  # [N, T, d]
        idx = self.nearest(z.detach())  # [N, T]
        e = self.codebook[idx]  # [N, T, d]
        q = z + (e - z).detach()  # straight-through
        rec = F.binary_cross_entropy_with_logits(self.decode_latents(q), x)
        cb = F.mse_loss(e, z.detach())
        commit = F.mse_loss(z, e.detach())
        used = float(idx.unique().numel()) / self.codebook_size
        return rec + cb + self.beta * commit, {"rec": float(rec.detach()), "used": used}

    # ---------------------------------------------------------------- public
    @torch.inference_mode()
    def encode(self, images: Tensor, chunk: int = 512) -> Tensor:
        """images uint8 [N, H, W] -> long [N, grid*grid] code ids in raster order."""
        assert images.dim() == 3 and images.dtype == torch.uint8, (images.shape, images.dtype)
        out = []
        for part in images.split(chunk):
            out.append(self.nearest(self.latents(part.float()[:, None] / 255.0)))
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.long)

    @torch.inference_mode()
    def decode(self, codes: Tensor, chunk: int = 512) -> Tensor:
        """codes long [N, grid*grid] (ids < codebook_size) -> images uint8 [N, H, W]."""
        assert codes.dim() == 2, codes.shape
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"code ids must be in [0, {self.codebook_size}), got {int(codes.min())}..{int(codes.max())}")
        out = []
        for part in codes.long().split(chunk):
            logits = self.decode_latents(self.codebook[part])
            out.append((torch.sigmoid(logits[:, 0]) * 255).round().to(torch.uint8))
        return torch.cat(out)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """x [n, d] -> k centroids [k, d] (Lloyd's algorithm from k random points; an empty
    cluster takes a random point)."""
    n = x.shape[0]
    cent = x[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(iters):
        d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ cent.t() + cent.pow(2).sum(1)[None]
        a = d2.argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).to(x.dtype)
        empty = cnt == 0
        cent = torch.where(empty[:, None], x[torch.randint(n, (k,), generator=generator)], sums / cnt.clamp(min=1)[:, None])
    return cent
