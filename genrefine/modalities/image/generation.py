"""What both image generators share (the bundles' :class:`~.api.ImageGenerator` and Janus's
:class:`~.janus.HFImageGenerator`): the result type, the sampling settings and the loop that
generates each image's codes on the engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...engine import Engine, Stats
from ...errors import ConfigError
from ...types import SamplingParams

# more images than this in one call is a mistake (the server and the CLI share this limit)
MAX_IMAGES = 256


@dataclass
class ImageResult:
    """Images generated in one call, with what each generation did."""

    images: np.ndarray  # uint8 [N, H, W] (grey, the bundles) or [N, H, W, 3] (RGB, Janus)
    codes: list[list[int]]  # the grid*grid codes of each image, raster order
    classes: list[int]  # the requested class of each image (empty for text prompts)
    stats: list[Stats]  # one per image
    seconds: float  # wall clock of the whole call, VQ decoding included
    method: str = ""
    extra: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)  # the text prompt of each image (Janus)

    def summary(self) -> dict:
        """Aggregates: images/s, target forwards per image, tokens per step, acceptance rate."""
        n = len(self.stats)
        steps = sum(s.steps + 1 for s in self.stats)  # the prefill is a target forward too
        decode_steps = sum(s.steps for s in self.stats)
        decode_tokens = sum(s.decode_tokens for s in self.stats)
        drafted = sum(s.drafted for s in self.stats)
        accepted = sum(s.accepted for s in self.stats)
        gen_seconds = sum(s.time_total for s in self.stats)
        return {
            "method": self.method,
            "images": n,
            "images_per_s": n / self.seconds if self.seconds > 0 else 0.0,
            "generation_seconds": gen_seconds,
            "steps_per_image": steps / n if n else 0.0,
            "tokens_per_step": decode_tokens / decode_steps if decode_steps else 1.0,
            "acceptance_rate": accepted / drafted if drafted else None,
        }


def sampling_settings(gen, temperature, top_k, cfg, seed) -> tuple[float, int, float, int]:
    """``gen``'s defaults for the Nones, checked: (temperature, top_k, cfg, seed)."""
    temperature = gen.default_temperature if temperature is None else float(temperature)
    top_k = gen.default_top_k if top_k is None else int(top_k)
    cfg = gen.default_cfg if cfg is None else float(cfg)
    if not (cfg == cfg) or cfg < 0:
        raise ConfigError(f"the guidance scale (cfg) must be >= 0 (1 = none), got {cfg}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    SamplingParams(temperature=temperature, top_k=top_k, seed=seed)  # validates
    return temperature, top_k, cfg, seed


def generate_codes(model, method, prompts: Sequence[Sequence[int]], n_tokens: int,
                   temperature: float, top_k: int, seed: int,
                   progress: Callable[[int], None] | None = None) -> tuple[list[list[int]], list[Stats]]:
    """``n_tokens`` codes after each prompt (engine ids), prompt ``i`` with seed ``seed + i``."""
    codes, stats = [], []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed + i)
        st = Stats(method.name)
        out: list[int] = []
        for chunk in Engine(model, method).generate(list(prompt), n_tokens, params, frozenset(), st):
            out.extend(chunk)
        if len(out) != n_tokens:  # no EOS exists; the context holds the grid by construction
            raise ConfigError(
                f"generated {len(out)} codes instead of {n_tokens}: the model's context is too short"
            )
        codes.append(out)
        stats.append(st)
        if progress is not None:
            progress(1)
    return codes, stats
