"""Where genrefine keeps what it converts or measures once: ``$GENREFINE_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$GENREFINE_CACHE``, default ``~/.cache/genrefine``."""
    env = os.environ.get("GENREFINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genrefine"
