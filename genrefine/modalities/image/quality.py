"""Quality of generated images: classifier accuracy against the requested class and the Frechet
distance between classifier features of generated and held-out real images.

The Frechet distance between Gaussians N(mu1, S1) and N(mu2, S2) is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (the FID formula, here on the bundle's
classifier features instead of Inception's). ``tr((S1 S2)^(1/2))`` is computed as the sum of the
square roots of the eigenvalues of the symmetric ``S1^(1/2) S2 S1^(1/2)``, in float64. With few
images the estimate is biased upwards and noisy; compare distances computed from the same number
of images.
"""

from __future__ import annotations

import torch
from torch import Tensor


def feature_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """feats [N, F] -> (mu [F], sigma [F, F]) in float64 (unbiased covariance; N >= 2)."""
    assert feats.dim() == 2 and feats.shape[0] >= 2, feats.shape
    f = feats.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.t() @ c / (f.shape[0] - 1)


def _sqrt_psd(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((s + s.t()) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.t()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) ([F], [F, F] each)."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    assert mu1.shape == mu2.shape and s1.shape == s2.shape == (mu1.numel(), mu1.numel())
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    ev = torch.linalg.eigvalsh((m + m.t()) / 2).clamp(min=0)
    d = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * ev.sqrt().sum()
    return max(float(d), 0.0)


@torch.inference_mode()
def image_quality(bundle, images: Tensor, classes: Tensor) -> dict:
    """images uint8 [N, H, W] generated for classes long [N] -> ``{"classifier_accuracy": float,
    "frechet_distance": float}`` (the distance to the bundle's held-out real images)."""
    assert images.dim() == 3 and classes.shape == images.shape[:1], (images.shape, classes.shape)
    clf = bundle.classifier
    feats = clf.features(images)
    acc = float((clf.head(feats).argmax(1) == classes.to(feats.device)).float().mean()) if len(classes) else 0.0
    fd = float("nan")
    if images.shape[0] >= 2:
        mu, sigma = feature_stats(feats)
        fd = frechet_distance(mu, sigma, bundle.real_mu, bundle.real_sigma)
    return {"classifier_accuracy": acc, "frechet_distance": fd}
