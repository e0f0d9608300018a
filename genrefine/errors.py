"""Errors that are the user's to fix.

Anything raised as a :class:`GenrefineError` is shown by the CLI as one line (no traceback) with a
non-zero exit. The message must say what to do.
"""


class GenrefineError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported option."""


class ModelLoadError(GenrefineError):
    """The model path does not exist or does not hold a model we can load."""


class ConfigError(GenrefineError, ValueError):
    """A configuration value is invalid (sampling values, method names, lengths)."""
