"""The registry of methods: every module of :mod:`genrefine.methods` that declares a ``SPEC``.

``genrefine methods`` prints it. A method is lossless when its greedy output equals plain greedy
decoding token for token and its sampled output has exactly the target's distribution; the tests
check every method that claims it. Adding a method is adding one module to
``genrefine/methods/`` with its drafter (or decoding loop), its builder and its
:class:`~genrefine.methods.base.MethodSpec`; this module finds it. It sits above the methods:
nothing under :mod:`genrefine.methods` imports it.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import methods as _methods_pkg
from .errors import ConfigError, GenrefineError
from .methods.base import Method, MethodOptions, MethodSpec

_NOT_METHODS = {"base", "parts"}


def _discover() -> dict[str, MethodSpec]:
    specs = []
    for info in pkgutil.iter_modules(_methods_pkg.__path__):
        if info.name in _NOT_METHODS:
            continue
        module = importlib.import_module(f"{_methods_pkg.__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, MethodSpec):
            raise TypeError(f"{module.__name__} is in genrefine/methods/ but declares no SPEC")
        specs.append(spec)
    specs.sort(key=lambda s: s.order)
    return {s.name: s for s in specs}


METHODS: dict[str, MethodSpec] = _discover()


def method_names() -> list[str]:
    """Every method's name, in listing order."""
    return list(METHODS)


def build_method(name: str, model, options: MethodOptions | None = None, tokenizer=None) -> Method:
    """Instantiate a method for a model; unknown names raise with the list of valid ones.

    ``tokenizer`` is needed for a reduced draft vocabulary (``MethodOptions.draft_vocab``) and
    by ``sps`` (to tell whether the draft model shares it, and to bridge the two if not).
    """
    opts = options or MethodOptions()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    info = METHODS[name]
    if info.native_only:
        from .models.runtime import NativeModel

        # a wrapper over a native model (GuidedModel) names it, so its methods run there too
        if not isinstance(getattr(model, "native_base", model), NativeModel):
            raise GenrefineError(f"method {name} needs the native runtime; {_where(model)}")
    m = info.build(model, opts, tokenizer)
    if opts.acceptance == "typical":
        m.name += "+typical"
    return m


def _where(model) -> str:
    """Why a model is not on the native runtime, for one-line refusals."""
    if getattr(model, "backend", None) == "llama.cpp":
        return (
            "this model runs on the llama.cpp backend, which gives no intermediate layers "
            "(use --backend native)"
        )
    return "this architecture runs through the transformers adapter"


def is_lossless(name: str, options: MethodOptions | None = None) -> bool:
    """Whether ``name`` with ``options`` claims lossless output (typical acceptance does not)."""
    opts = options or MethodOptions()
    return METHODS[name].lossless and opts.acceptance == "exact"
