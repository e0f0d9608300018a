"""Training text for drafters.

The default corpus is on every machine with Python and has nothing to do with any benchmark: the
docstrings of the standard library's modules, classes and functions, and the language reference
shipped in ``pydoc_data``, read in a fixed order. Half of the docstrings are wrapped in the
model's chat template (a question naming the object, the docstring as the answer) so that
drafters also see the turn markers and the reply position that chat prompts put them in.

A user corpus is a folder of ``.txt``, ``.md`` and ``.rst`` files (read recursively, sorted).
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from ..errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
_MIN_DOC = 80  # characters: shorter docstrings teach little


def _stdlib_docstrings() -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` for the standard library, sorted by file, tests and IDLE
    left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in ("test", "site-packages", "idlelib", "__phello__")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC:
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    out.append((name, doc))
    return out


def _reference_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[k] for k in sorted(topics)]


def default_corpus(tokenizer=None) -> list[str]:
    """The default training texts (see the module docstring). With a tokenizer that has a chat
    template, every other docstring becomes a chat exchange."""
    texts: list[str] = []
    chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    for i, (name, doc) in enumerate(_stdlib_docstrings()):
        if chat and i % 2 == 1:
            messages = [
                {"role": "user", "content": f"What does `{name}` do in Python?"},
                {"role": "assistant", "content": doc},
            ]
            try:
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
                continue
            except Exception:  # a template that refuses these roles: plain text
                pass
        texts.append(doc)
    texts.extend(_reference_topics())
    if not texts:
        raise ConfigError(
            "the default corpus is empty: no standard library sources were found; pass --corpus DIR"
        )
    return texts


def read_corpus(path: str | Path) -> list[str]:
    """Every ``.txt``/``.md``/``.rst`` file under ``path`` (or the file itself), sorted."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"corpus {p} does not exist: give a folder of .txt/.md/.rst files")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
    texts = []
    for f in files:
        try:
            t = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ConfigError(f"cannot read corpus file {f}: {e}") from None
        if t.strip():
            texts.append(t)
    if not texts:
        raise ConfigError(
            f"corpus {p} holds no text: put .txt, .md or .rst files in it (read recursively)"
        )
    return texts
