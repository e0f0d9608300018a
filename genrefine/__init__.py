"""genrefine: faster autoregressive generation by drafting and verifying, without changing the output."""

__version__ = "0.1.0"

from .api import GenerationResult, Generator, load  # noqa: E402
from .errors import GenrefineError  # noqa: E402
from .methods.base import MethodOptions
from .registry import METHODS
from .types import Draft, SamplingParams, VerifyResult  # noqa: E402



def load_image(path: str | None = None, **kwargs):
    """Load an image bundle (default: the embedded glyph model); see
    :func:`genrefine.modalities.image.api.load_image`."""
    from .modalities.image.api import load_image as _load_image

    return _load_image(path, **kwargs)


def load_speech(path: str | None = None, **kwargs):
    """Load a speech bundle (default: the embedded flite-trained model); see
    :func:`genrefine.modalities.speech.api.load_speech`."""
    from .modalities.speech.api import load_speech as _load_speech

    return _load_speech(path, **kwargs)


__all__ = [
    "Draft",
    "GenerationResult",
    "Generator",
    "GenrefineError",
    "METHODS",
    "MethodOptions",
    "SamplingParams",
    "VerifyResult",
    "load",
    "load_image",
    "load_speech",
]
