"""The package's layering: no import circles, and the low layers never import the high ones.

Imports are read from the source (module level and inside functions alike), so a circle hidden
behind a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import genrefine

ROOT = Path(genrefine.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """genrefine modules that ``path`` (module ``name``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("genrefine"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("genrefine"):
                continue
            for a in node.names:  # `from pkg import module` names a module
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return {m for m in found if m in MODULES and m != name}


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_import_graph_is_read():
    assert "genrefine.engine" in GRAPH["genrefine.api"]
    assert "genrefine.errors" in GRAPH["genrefine.engine"]


def test_no_import_circles():
    cycles = {tuple(c) for name in GRAPH if (c := _cycle_from(name)) is not None}
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in sorted(cycles))


# (layer, modules it must never import): the model layer knows nothing of decoding policy,
# methods or front ends; the disk cache and the basic types know nothing at all.
LOWER = [
    ("genrefine.diskcache", ("genrefine.",)),
    ("genrefine.errors", ("genrefine.",)),
    ("genrefine.types", ("genrefine.models", "genrefine.methods", "genrefine.engine")),
    ("genrefine.models", ("genrefine.methods", "genrefine.policy", "genrefine.engine",
                          "genrefine.api", "genrefine.cli", "genrefine.bench", "genrefine.server",
                          "genrefine.train", "genrefine.registry", "genrefine.costs")),
    ("genrefine.verify", ("genrefine.methods", "genrefine.engine", "genrefine.models",
                          "genrefine.api", "genrefine.registry")),
    ("genrefine.methods", ("genrefine.api", "genrefine.cli", "genrefine.bench",
                           "genrefine.server", "genrefine.registry", "genrefine.train")),
]


@pytest.mark.parametrize("layer, forbidden", LOWER, ids=[x[0] for x in LOWER])
def test_lower_layers_do_not_import_upward(layer, forbidden):
    bad = sorted(
        f"{name} -> {dep}"
        for name, deps in GRAPH.items()
        if name == layer or name.startswith(layer + ".")
        for dep in deps
        if any(dep.startswith(f) for f in forbidden) and not dep.startswith(layer)
    )
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _backends():
    from genrefine.models.hf import HFModel
    from genrefine.models.llamacpp import LlamaCppModel
    from genrefine.models.runtime import NativeModel

    return {"native": NativeModel, "llama.cpp": LlamaCppModel, "hf": HFModel}


@pytest.mark.parametrize("backend", ["native", "llama.cpp", "hf"])
def test_every_backend_forward_takes_the_protocol_arguments(backend):
    """The three forwards were kept in step by hand; models/protocol.py now says what they take,
    in that order (a backend may accept more after them)."""
    import inspect

    from genrefine.models.protocol import Model

    want = list(inspect.signature(Model.forward).parameters)
    cls = _backends()[backend]
    got = list(inspect.signature(cls.forward).parameters)
    assert got[: len(want)] == want
    for name in ("new_cache",):
        assert callable(getattr(cls, name))
