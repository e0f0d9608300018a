"""The training images: the digits 0-9 rendered from matplotlib's bundled fonts, augmented.

Every image is one glyph, white on black, ``IMAGE_SIZE`` x ``IMAGE_SIZE`` uint8. Augmentation:
a random font among the usable ones (:func:`font_paths`), size, stroke thickness, rotation
(+-``MAX_ROTATION`` degrees), shear, shift and a slight blur. Everything is drawn from a
``torch.Generator`` seeded with the ``seed`` argument, so ``render_glyphs(n, seed)`` returns the
same images on every machine with the same fonts and Pillow; held-out images are another seed.
Nothing is downloaded: matplotlib (a dependency) ships the fonts.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError

IMAGE_SIZE = 32
CLASSES = tuple("0123456789")
MAX_ROTATION = 12.0  # degrees
_CANVAS = 96  # glyphs are drawn large, transformed, then shrunk to IMAGE_SIZE
# fonts whose digits are symbols, boxes or missing
_SKIP = ("cmex10", "cmsy10", "LastResort", "SymReg", "SymBol", "STIXNonUni")


def fonts_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _draw(path: str, char: str, size: int, stroke: int) -> np.ndarray:
    """[_CANVAS, _CANVAS] uint8: ``char`` centred on a black canvas."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    d = ImageDraw.Draw(img)
    font = _font(path, size)
    x0, y0, x1, y1 = d.textbbox((0, 0), char, font=font, stroke_width=stroke)
    xy = ((_CANVAS - (x1 - x0)) / 2 - x0, (_CANVAS - (y1 - y0)) / 2 - y0)
    d.text(xy, char, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


@functools.lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """The bundled fonts whose ten digits all render, non-empty and pairwise different (a font
    without digits draws the same box for each)."""
    out = []
    for p in sorted(fonts_dir().glob("*.ttf")):
        if any(s in p.name for s in _SKIP):
            continue
        try:
            glyphs = [_draw(str(p), c, 48, 0) for c in CLASSES]
        except OSError:
            continue
        if any(g.max() == 0 for g in glyphs):
            continue
        if len({g.tobytes() for g in glyphs}) < len(CLASSES):
            continue
        out.append(str(p))
    if not out:
        raise ConfigError(f"no usable fonts in {fonts_dir()}: reinstall matplotlib")
    return tuple(out)


def _render_one(path: str, char: str, r: list[float]) -> np.ndarray:
    """One augmented glyph from eight uniform draws ``r`` in [0, 1)."""
    from PIL import Image, ImageFilter

    size = int(52 + 24 * r[0])  # digit height about 0.4-0.6 of the canvas
    stroke = int(r[1] * 3.2)  # 0..3 pixels on the 3x canvas
    img = Image.fromarray(_draw(path, char, size, stroke))
    angle = math.radians((2 * r[2] - 1) * MAX_ROTATION)
    shear = (2 * r[3] - 1) * 0.2
    dx, dy = (2 * r[4] - 1) * 8, (2 * r[5] - 1) * 8  # canvas pixels (about +-2.7 output pixels)
    # the inverse map (output -> input) of: rotate by angle and shear about the centre, shift
    c, s = math.cos(angle), math.sin(angle)
    a, b, d, e = c, -s + shear * c, s, c + shear * s
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    h = _CANVAS / 2
    ox, oy = h + dx, h + dy
    coeffs = (ia, ib, h - ia * ox - ib * oy, id_, ie, h - id_ * ox - ie * oy)
    img = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    if r[6] < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(0.5 + 1.5 * r[7]))
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(img)


def render_glyphs(n_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n_per_class`` augmented images of each digit: (images uint8 [N, 32, 32], labels long
    [N]), N = 10 * n_per_class, in a seeded random order. Deterministic given the arguments."""
    if n_per_class < 1:
        raise ConfigError(f"n_per_class must be >= 1, got {n_per_class}")
    fonts = font_paths()
    n = n_per_class * len(CLASSES)
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(len(CLASSES)).repeat(n_per_class)[torch.randperm(n, generator=g)]
    font_ix = torch.randint(len(fonts), (n,), generator=g).tolist()
    draws = torch.rand(n, 8, generator=g, dtype=torch.float64).tolist()
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, (lab, f, r) in enumerate(zip(labels.tolist(), font_ix, draws)):
        images[i] = _render_one(fonts[f], CLASSES[lab], r)
    return torch.from_numpy(images), labels
