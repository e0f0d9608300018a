"""The quality classifier: a small CNN trained on real glyph images (:mod:`.data`).

Generated images are scored by its accuracy against the requested class
(:meth:`Classifier.predict`) and by a Frechet distance between its penultimate-layer features
(:meth:`Classifier.features`) of generated and held-out real images (:mod:`.quality`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Classifier(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 pixels), a ``features``-wide hidden layer, the
    class logits. Inputs are uint8 images [N, H, W]."""

    def __init__(self, n_classes: int = 10, features: int = 64, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.n_classes, self.n_features, self.channels = n_classes, features, channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * c * 16, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, n_classes)

    def config(self) -> dict:
        """The constructor's arguments (stored in image.json)."""
        return {"n_classes": self.n_classes, "features": self.n_features, "channels": self.channels}

    @classmethod
    def from_config(cls, cfg: dict) -> "Classifier":
        return cls(int(cfg["n_classes"]), int(cfg["features"]), int(cfg["channels"]))

    def logits(self, x: Tensor) -> Tensor:
        """x [N, 1, H, W] float in [0, 1] -> [N, n_classes]."""
        return self.head(self.body(x))

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        """Cross-entropy of x [N, 1, H, W] against labels y [N]; logs the batch accuracy."""
        lg = self.logits(x)
        return F.cross_entropy(lg, y), {"acc": float((lg.detach().argmax(1) == y).float().mean())}

    @torch.inference_mode()
    def features(self, images: Tensor, chunk: int = 1024) -> Tensor:
        """images uint8 [N, H, W] -> float32 [N, F]: the penultimate layer."""
        assert images.dim() == 3 and images.dtype == torch.uint8, (images.shape, images.dtype)
        out = [self.body(p.float()[:, None] / 255.0) for p in images.split(chunk)]
        return torch.cat(out) if out else torch.zeros(0, self.n_features)

    @torch.inference_mode()
    def predict(self, images: Tensor) -> Tensor:
        """images uint8 [N, H, W] -> long [N]: the most likely class."""
        return self.head(self.features(images)).argmax(1)
