"""Retrieval datastores: token documents with a suffix array (REST).

:class:`Datastore` holds documents as one token array with separators and its suffix array;
:func:`context_lookup` finds the longest suffix of the context that occurs in it and the
continuations after its occurrences. ``genrefine index build DIR --out FILE``
(:func:`index_build_main`) builds one from text files; saved as safetensors and tied to the
tokenizer that made it.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError, GenrefineError

SEP = -1  # ends every document in Datastore.tokens


FORMAT = "genrefine-datastore"


FORMAT_VERSION = "1"


TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


_BUILD_HINT = "build one with `genrefine index build DIR --model MODEL --out FILE`"


# ---------------------------------------------------------------------------- kernels
def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Positions of the non-separator entries of ``tokens`` [N], sorted by their suffixes: [M].

    Prefix doubling with the Larsson-Sadakane refinement: after round ``r`` the suffixes are
    sorted by their first ``2 ** r`` tokens into *groups* of equal prefixes, and a suffix's rank
    is the first slot of its group. A round re-sorts only the suffixes of groups with more than one
    member, by the pair ``(rank[i], rank[i + 2 ** r])`` packed into one int64 key (``argsort``),
    then splits those groups. Each separator gets a rank of its own (ordered by position, below
    every token), so no two suffixes tie past a separator: the rounds number
    ``ceil(log2(longest repeat within a document))`` and the later ones touch only the repeats.
    O(N log^2 N) at worst. Returns int32 positions (int64 for N near 2**31 and beyond).
    """
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1, tokens.shape
    n = int(tokens.shape[0])
    out_dtype = np.int32 if n < 2**31 - 1024 else np.int64  # room for s + m in searches
    if n == 0:
        return np.zeros(0, dtype=out_dtype)
    sep = tokens == SEP
    n_sep = int(sep.sum())
    key = tokens.astype(np.int64) + n_sep  # [N] tokens rank above every separator
    key[sep] = np.arange(n_sep, dtype=np.int64)
    order = np.argsort(key)  # [N] suffix positions, sorted by the first 2 ** r tokens
    sorted_key = key[order]
    first = np.empty(n, dtype=bool)  # [N] slot starts a group
    first[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    rank = np.empty(n, dtype=np.int64)  # [N] position -> first slot of its group
    rank[order] = np.maximum.accumulate(np.where(first, np.arange(n, dtype=np.int64), 0))
    k = 1
    while True:
        single = first.copy()
        single[:-1] &= first[1:]
        active = np.flatnonzero(~single)  # [a] slots of groups not yet split to singletons
        if active.size == 0:
            break
        pos = order[active]
        nxt = pos + k
        second = np.where(nxt < n, rank[np.minimum(nxt, n - 1)] + 1, 0)
        key = rank[pos] * (n + 1) + second  # [a]; groups keep their relative order
        o = np.argsort(key)
        pos, key = pos[o], key[o]
        order[active] = pos
        f = np.empty(pos.shape[0], dtype=bool)
        f[0] = True
        np.not_equal(key[1:], key[:-1], out=f[1:])
        first[active] = f
        rank[pos] = np.maximum.accumulate(np.where(f, active, 0))
        k *= 2
    return order[~sep[order]].astype(out_dtype)


def _doc_array(docs: Iterable[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, int]:
    """Concatenate non-empty documents, each followed by SEP: ([N] int32, number of documents)."""
    parts: list[np.ndarray] = []
    sep = np.full(1, SEP, dtype=np.int32)
    for d in docs:
        a = np.asarray(d, dtype=np.int64).reshape(-1)
        if a.size == 0:
            continue
        if a.min() < 0:
            raise ConfigError("token ids must be >= 0 (-1 separates documents)")
        parts += [a.astype(np.int32), sep]
    if not parts:
        return np.zeros(0, dtype=np.int32), 0
    return np.concatenate(parts), len(parts) // 2


def context_lookup(
    tokens: np.ndarray,  # [L] the current context
    max_len: int,
    max_candidates: int = 64,
    max_match: int = 16,
    min_match: int = 2,
) -> tuple[int, list[list[int]]]:
    """``(m, continuations)`` for the longest suffix of ``tokens`` (``max_match >= m >=
    min_match``) that also ends at an earlier position ``e < L - 1``: ``tokens[e + 1 : e + 1 +
    max_len]`` for each such ``e``, latest first, at most ``max_candidates``; ``(0, [])`` if none.

    The positions holding the last token are extended backwards one token per step while they
    still match, so a call costs ``max_match`` vectorised passes over the shrinking candidates.
    """
    tokens = np.asarray(tokens)
    n = int(tokens.shape[0])
    if n < 2 or max_len <= 0:
        return 0, []
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # [c] matches of length 1
    m = 1
    for k in range(1, min(max_match, n - 1)):  # try length k + 1
        longer = ends[ends >= k]
        longer = longer[tokens[longer - k] == tokens[n - 1 - k]]
        if longer.size == 0:
            break
        ends, m = longer, k + 1
    if ends.size == 0 or m < min_match:
        return 0, []
    return m, [tokens[e + 1 : e + 1 + max_len].tolist() for e in ends[::-1][:max_candidates]]


class Datastore:
    """Documents of token ids with a suffix array (see the module docstring).

    ``tokenizer_name`` and ``vocab_size`` record which tokenizer made the ids ("" and 0: unknown);
    :meth:`load` checks them against the model's.
    """

    def __init__(
        self,
        tokens: np.ndarray,  # [N] int32, documents each followed by SEP
        sa: np.ndarray | None = None,  # [M] int32/int64, M = number of non-SEP entries
        tokenizer_name: str = "",
        vocab_size: int = 0,
    ) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        assert tokens.ndim == 1, tokens.shape
        if tokens.size and tokens[-1] != SEP:
            raise ConfigError("a datastore's token array must end with the separator -1")
        self.tokens = tokens
        self.sa = suffix_array(tokens) if sa is None else np.ascontiguousarray(sa)
        self.tokenizer_name = tokenizer_name
        self.vocab_size = int(vocab_size)
        self.num_documents = int((tokens == SEP).sum())

    @classmethod
    def from_documents(
        cls,
        docs: Iterable[Sequence[int] | np.ndarray],
        tokenizer_name: str = "",
        vocab_size: int = 0,
    ) -> "Datastore":
        """Index token sequences (empty ones are skipped)."""
        tokens, _ = _doc_array(docs)
        return cls(tokens, None, tokenizer_name, vocab_size)

    @property
    def num_tokens(self) -> int:
        """Tokens stored, separators not counted."""
        return int(self.sa.shape[0])

    def __len__(self) -> int:
        return self.num_tokens

    def documents(self) -> list[list[int]]:
        """The stored documents, in order."""
        ends = np.flatnonzero(self.tokens == SEP)
        starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else ends
        return [self.tokens[s:e].tolist() for s, e in zip(starts, ends)]

    # ---------------------------------------------------------------- search
    def match_range(self, pattern: Sequence[int]) -> tuple[int, int]:
        """``[lo, hi)`` in ``sa`` of the occurrences of ``pattern`` (followed by a token)."""
        pattern = list(pattern)
        m = len(pattern)
        toks, sa = self.tokens, self.sa
        if m == 0 or sa.shape[0] == 0:
            return 0, 0
        # Comparing the first m (+1) tokens of a suffix as a list orders the suffixes as sa does
        # up to the first separator, and the pattern has none, so both searches are monotone.
        # The occurrences directly followed by SEP sort first among those starting with pattern:
        # searching for pattern + [0] over m + 1 tokens skips them.
        lo = bisect.bisect_left(sa, pattern + [0], key=lambda s: toks[s : s + m + 1].tolist())
        hi = bisect.bisect_right(sa, pattern, lo=lo, key=lambda s: toks[s : s + m].tolist())
        return lo, max(lo, hi)

    def longest_match(
        self, context: Sequence[int], max_match: int = 16, min_match: int = 2
    ) -> tuple[int, int, int]:
        """``(m, lo, hi)`` for the longest suffix of ``context`` (``max_match >= m >= min_match``)
        that occurs; ``(0, 0, 0)`` when none does."""
        context = list(context)
        lo_m, hi_m = min_match, min(max_match, len(context))
        best = (0, 0, 0)
        while lo_m <= hi_m:  # the occurring suffix lengths are 1..m*: bisect for m*
            m = (lo_m + hi_m) // 2
            lo, hi = self.match_range(context[len(context) - m :])
            if hi > lo:
                best = (m, lo, hi)
                lo_m = m + 1
            else:
                hi_m = m - 1
        return best

    def continuations(
        self, m: int, lo: int, hi: int, max_len: int, max_candidates: int
    ) -> list[list[int]]:
        """Continuations of the occurrences ``sa[lo:hi]`` of an ``m``-token pattern.

        At most ``max_candidates`` occurrences, evenly spaced along the range (all of them when
        the range is no longer), latest position first; each continuation has 1..max_len tokens.
        """
        count = hi - lo
        if count <= 0 or max_len <= 0 or max_candidates <= 0:
            return []
        k = min(max_candidates, count)
        pick = lo + (np.arange(k, dtype=np.int64) * count) // k
        starts = np.sort(self.sa[pick].astype(np.int64) + m)[::-1]  # [k], latest first
        idx = starts[:, None] + np.arange(max_len, dtype=np.int64)  # [k, max_len]
        np.minimum(idx, self.tokens.shape[0] - 1, out=idx)  # the last entry is SEP
        block = self.tokens[idx]  # [k, max_len]
        lengths = np.cumprod(block != SEP, axis=1).sum(axis=1)  # [k], tokens before SEP
        return [row[:n] for row, n in zip(block.tolist(), lengths.tolist())]

    def lookup(
        self,
        context: Sequence[int],
        max_len: int,
        max_candidates: int = 64,
        max_match: int = 16,
        min_match: int = 2,
    ) -> tuple[int, list[list[int]]]:
        """``(m, continuations)`` of the longest matching suffix of ``context``; ``(0, [])``."""
        m, lo, hi = self.longest_match(context, max_match, min_match)
        if m == 0:
            return 0, []
        return m, self.continuations(m, lo, hi, max_len, max_candidates)

    # ---------------------------------------------------------------- files
    def check_compatible(
        self, tokenizer_name: str | None, vocab_size: int | None, where: str = ""
    ) -> None:
        """Raise :class:`GenrefineError` unless the ids suit a model of this name and vocabulary.

        Names must be equal when both are known. The stored vocabulary may be smaller than the
        model's (models pad their embedding tables: Qwen2.5 has 151,936 rows for 151,665 tokens)
        but not larger.
        """
        known = bool(tokenizer_name and self.tokenizer_name)
        bad_name = known and tokenizer_name != self.tokenizer_name
        bad_vocab = vocab_size is not None and self.vocab_size > int(vocab_size)
        if bad_name or bad_vocab:
            raise GenrefineError(
                f"the datastore{where} was built with the tokenizer of {self.tokenizer_name!r} "
                f"(vocabulary {self.vocab_size:,}) but the model is {tokenizer_name!r} "
                f"(vocabulary {int(vocab_size or 0):,}): rebuild it for this model with "
                "`genrefine index build DIR --model MODEL --out FILE`"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file: ``tokens`` and ``suffix_array``, metadata as strings."""
        from safetensors import SafetensorError

        from ...diskcache import save_tensors

        path = Path(path).expanduser()
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": self.tokenizer_name,
            "vocab_size": str(self.vocab_size),
            "documents": str(self.num_documents),
            "tokens": str(self.num_tokens),
        }
        try:
            tensors = {"tokens": self.tokens, "suffix_array": self.sa}
            return save_tensors(path, tensors, meta, make_parent=False)
        except (OSError, SafetensorError) as e:
            raise GenrefineError(f"cannot write the datastore to {str(path)!r}: {e}") from e

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        tokenizer_name: str | None = None,
        vocab_size: int | None = None,
    ) -> "Datastore":
        """Read a file written by :meth:`save`; check it against the model's tokenizer name and
        vocabulary size when given (see :meth:`check_compatible`)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise GenrefineError(f"datastore {str(path)!r} does not exist: {_BUILD_HINT}")
        not_ours = f"{str(path)!r} is not a genrefine datastore (a safetensors file): {_BUILD_HINT}"
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or set(f.keys()) != {"tokens", "suffix_array"}:
                    raise GenrefineError(not_ours)
                if meta.get("version") != FORMAT_VERSION:
                    raise GenrefineError(
                        f"datastore {str(path)!r} has format version {meta.get('version')}, this "
                        f"genrefine reads version {FORMAT_VERSION}: rebuild it"
                    )
                tokens = f.get_tensor("tokens")
                sa = f.get_tensor("suffix_array")
        except (SafetensorError, OSError, ValueError) as e:
            raise GenrefineError(not_ours) from e
        n = tokens.shape[0]
        ok = (
            tokens.dtype == np.int32
            and sa.dtype in (np.int32, np.int64)
            and tokens.ndim == sa.ndim == 1
            and (n == 0 or tokens[-1] == SEP)
            and sa.shape[0] == n - int((tokens == SEP).sum())
            and (sa.shape[0] == 0 or (int(sa.min()) >= 0 and int(sa.max()) < n))
        )
        vocab = int(meta.get("vocab_size", "0") or 0)
        if ok and vocab and n:
            ok = int(tokens.max()) < vocab
        if not ok:
            raise GenrefineError(f"datastore {str(path)!r} is damaged: {_BUILD_HINT}")
        ds = cls(tokens, sa, meta.get("tokenizer", ""), vocab)
        ds.check_compatible(tokenizer_name, vocab_size, where=f" {str(path)!r}")
        return ds


# ---------------------------------------------------------------------------- building
def text_files(directory: str | os.PathLike) -> list[Path]:
    """``*.txt *.md *.py *.rst`` under ``directory``, recursively, sorted; hidden paths and
    ``__pycache__`` are skipped."""
    root = Path(directory)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if p.suffix in TEXT_SUFFIXES and p.is_file():
            if not any(part.startswith(".") or part == "__pycache__" for part in rel):
                out.append(p)
    return sorted(out)


def _sources(files_or_texts) -> list[Path | str]:
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [Path(files_or_texts)]
    out: list[Path | str] = []
    for item in files_or_texts:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, os.PathLike):
            p = Path(item)
            if p.is_dir():
                out.extend(text_files(p))
            elif p.is_file():
                out.append(p)
            else:
                raise GenrefineError(
                    f"{str(p)!r} does not exist: give text files or a folder of them"
                )
        else:
            raise TypeError(f"expected a path or a text, got {type(item).__name__}")
    return out


def build_datastore(
    files_or_texts,
    tokenizer,
    progress: bool = True,
    tokenizer_name: str = "",
    chunk: int = 32,
) -> Datastore:
    """Tokenize texts into a :class:`Datastore` (one document per file or text).

    ``files_or_texts``: a folder or a file (``str`` or path), or an iterable whose ``str`` items
    are texts and whose path items are files or folders (folders: :func:`text_files`). Tokens are
    taken without special tokens (no BOS); files are read as UTF-8 (bad bytes replaced); empty
    documents are skipped. ``progress`` shows a tqdm bar over the files on stderr.

    A file holds 8 bytes a token (int32 tokens and int32 suffix array); tokenizing the text
    takes most of the build time, the suffix array a small part of it.
    """
    from tqdm import tqdm

    sources = _sources(files_or_texts)
    docs: list[np.ndarray] = []
    n_tok = 0
    with tqdm(total=len(sources), unit="file", disable=not progress, desc="tokenizing") as bar:
        for i in range(0, len(sources), chunk):
            part = sources[i : i + chunk]
            texts = [
                s.read_text(encoding="utf-8", errors="replace") if isinstance(s, Path) else s
                for s in part
            ]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for seq in ids:
                docs.append(np.asarray(seq, dtype=np.int32))
                n_tok += len(seq)
            bar.update(len(part))
            bar.set_postfix(tokens=f"{n_tok:,}")
    return Datastore.from_documents(docs, tokenizer_name, len(tokenizer))


def _writable(out_path: str | os.PathLike) -> Path:
    out = Path(out_path).expanduser()
    if out.is_dir():
        raise GenrefineError(
            f"--out {str(out)!r} is a folder: give a file name such as index.safetensors"
        )
    if not out.parent.is_dir():
        raise GenrefineError(
            f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe"):
            pass
    except OSError as e:
        raise GenrefineError(f"cannot write {str(out)!r}: {e.strerror or e}") from e
    return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def index_build_main(
    directory: str | os.PathLike,
    model_spec: str | os.PathLike | None,
    out_path: str | os.PathLike,
    dtype: str | None = None,
) -> int:
    """``genrefine index build DIR --model M --out FILE``: index a folder of text files.

    Loads only the tokenizer of ``model_spec`` (None: the embedded model); ``dtype`` is accepted
    for symmetry with the other commands and unused. Prints one summary line; returns 0.
    """
    del dtype  # no weights are loaded
    t0 = time.perf_counter()
    folder = Path(directory).expanduser()
    kinds = ", ".join(f"*{s}" for s in TEXT_SUFFIXES)
    if not folder.exists():
        raise GenrefineError(
            f"folder {str(folder)!r} does not exist: give a folder of text files ({kinds})"
        )
    if not folder.is_dir():
        raise GenrefineError(
            f"{str(folder)!r} is not a folder: give a folder of text files ({kinds})"
        )
    files = text_files(folder)
    if not files:
        raise GenrefineError(
            f"folder {str(folder)!r} holds no text files ({kinds}, searched recursively)"
        )
    out = _writable(out_path)

    from ...models.loading import load_tokenizer, resolve_source

    src = resolve_source(model_spec)
    tokenizer = load_tokenizer(src)
    ds = build_datastore(files, tokenizer, progress=True, tokenizer_name=src.display_name)
    if ds.num_tokens == 0:
        raise GenrefineError(f"the {len(files)} text files under {str(folder)!r} are all empty")
    ds.save(out)
    seconds = time.perf_counter() - t0
    print(
        f"indexed {ds.num_tokens:,} tokens from {ds.num_documents:,} documents in {seconds:.1f} s "
        f"-> {out} ({_size(out.stat().st_size)})"
    )
    return 0
