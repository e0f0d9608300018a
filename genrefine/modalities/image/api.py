"""The image API: ``genrefine.load_image()`` and the :class:`ImageGenerator` it returns.

    import genrefine
    gen = genrefine.load_image()                   # the embedded glyph model
    out = gen.generate([3] * 16, method="sjd", seed=0)
    out.images                                     # uint8 [16, 32, 32]
    out.summary()["steps_per_image"]

An image is a prompt of one class token followed by ``grid * grid`` VQ codes in raster order,
decoded by the bundle's VQ decoder. Generation runs on the same engine as text: the transformer is
wrapped in :class:`~genrefine.models.guided.GuidedModel`, which returns classifier-free-guided
logits, so every verifier sees the guided distribution and lossless methods stay lossless under
guidance. Sampling (temperature 1 with top-k) is the default, as image models use.

A transformers Janus checkpoint (``config.json`` with model_type "janus") loads as a
:class:`~genrefine.modalities.image.janus.HFImageGenerator` instead, prompted with text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...errors import ConfigError
from ...methods.base import MethodOptions
from ...registry import build_method
from .generation import MAX_IMAGES, ImageResult, generate_codes, sampling_settings

__all__ = ["MAX_IMAGES", "ImageGenerator", "ImageResult", "load_image"]


class ImageGenerator:
    """A loaded image bundle (transformer, VQ tokenizer, classifier), ready to generate."""

    def __init__(self, bundle, model, name: str | None = None) -> None:
        self.bundle = bundle
        self.model = model  # a GuidedModel over the native transformer
        self.name = name or f"image:{bundle.path.name}"
        defaults = bundle.meta.get("defaults", {})
        self.default_temperature = float(defaults.get("temperature", 1.0))
        self.default_top_k = int(defaults.get("top_k", 0))
        self.default_cfg = float(defaults.get("cfg", 1.0))
        self._methods: dict = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.meta["classes"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.bundle.grid) ** 2

    def method(self, name: str, options: MethodOptions | None = None):
        """The built method for ``name`` (built once per options, reused across calls)."""
        key = (name, options or MethodOptions())
        if key not in self._methods:
            self._methods[key] = build_method(name, self.model, options)
        return self._methods[key]

    def class_index(self, label: int | str) -> int:
        """A class given by index or by name (``"3"``), checked against the bundle's classes."""
        names = self.class_names
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in names:
                raise ConfigError(f"unknown class {label!r}: choose one of {', '.join(names)}")
            return names.index(label)
        try:
            c = int(label)
        except (TypeError, ValueError):
            raise ConfigError(f"a class must be an index or a name, got {label!r}") from None
        if isinstance(label, str) and label in names:
            return names.index(label)
        if not 0 <= c < len(names):
            raise ConfigError(f"class {c} is out of range: this model has classes 0..{len(names) - 1}")
        return c

    def generate(
        self,
        classes: int | str | Sequence[int | str],
        method: str = "ar",
        temperature: float | None = None,
        top_k: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        options: MethodOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ImageResult:
        """Generate one image per entry of ``classes``.

        temperature, top_k, cfg: None takes the bundle's defaults (temperature 0 is greedy: every
        lossless method then returns ``ar``'s codes). cfg is the classifier-free guidance scale
        (1 = no guidance). seed: image ``i`` uses ``seed + i``, so a call is reproducible and a
        method's images can be compared with ``ar``'s for the same seeds; None draws fresh seeds.
        progress: called with 1 after each image.
        """
        if isinstance(classes, (int, str)):
            classes = [classes]
        idx = [self.class_index(c) for c in classes]
        if not idx:
            raise ConfigError("no class given: ask for at least one image")
        if len(idx) > MAX_IMAGES:
            raise ConfigError(f"at most {MAX_IMAGES} images per call, got {len(idx)}")
        temperature, top_k, cfg, seed = sampling_settings(self, temperature, top_k, cfg, seed)
        m = self.method(method, options)
        self.model.scale = cfg
        t0 = time.perf_counter()
        codes, stats = generate_codes(self.model, m, [[self.bundle.class_token(c)] for c in idx],
                                      self.tokens_per_image, temperature, top_k, seed, progress)
        with torch.no_grad():
            images = self.bundle.vq.decode(torch.tensor(codes, dtype=torch.long))
        images = np.asarray(images.cpu().numpy() if torch.is_tensor(images) else images, dtype=np.uint8)
        seconds = time.perf_counter() - t0
        return ImageResult(images, codes, idx, stats, seconds, method=m.name)

    def quality(self, images: np.ndarray, classes: Sequence[int]) -> dict:
        """Classifier accuracy against the requested classes and the Frechet distance of the
        classifier's features to held-out real images (the bundle's statistics)."""
        from .quality import image_quality

        imgs = torch.as_tensor(np.asarray(images, dtype=np.uint8))
        return image_quality(self.bundle, imgs, torch.as_tensor(list(classes), dtype=torch.long))


def load_image(path: str | None = None, dtype: str = "float32", quiet: bool = True):
    """Load an image bundle (default: the embedded glyph model) and return an
    :class:`ImageGenerator`. path: a bundle directory written by ``genrefine train image``, or a
    transformers Janus checkpoint (model_type "janus"), returned as a
    :class:`~genrefine.modalities.image.janus.HFImageGenerator` (text prompts, RGB images).
    dtype: the transformer's weights, "float32" (as trained) or "q8_0" (rounded to Q8_0 when
    loaded and run on the exact integer kernels: faster on the CPU, a slightly different model)."""
    from ...models.guided import GuidedModel
    from ...models.loading import load_model
    from .bundle import load_bundle
    from .janus import is_janus_dir, load_janus

    if is_janus_dir(path):
        return load_janus(path, dtype=dtype)

    bundle = load_bundle(path)
    base, _ = load_model(str(bundle.transformer_dir), dtype=dtype, quiet=quiet)
    model = GuidedModel(
        base,
        n_codes=bundle.codebook_size,
        class_offset=bundle.class_token(0),
        n_classes=bundle.n_classes,
        null_token=bundle.null_token,
        scale=float(bundle.meta.get("defaults", {}).get("cfg", 1.0)),
        latents=bundle.latents(),
    )
    return ImageGenerator(bundle, model)
