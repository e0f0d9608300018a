"""The llama.cpp backend: a GGUF model run by llama-cpp-python's low-level API, behind the model
interface of the native runtime (see ``docs/architecture.md``).

llama.cpp keeps one unified KV cache of *cells*; each cell holds a position and the set of
sequence ids it belongs to, and a new token attends to the cells of its (first) sequence at
positions up to its own. The interface maps onto it like this:

* the committed prefix is sequence 0, one cell per position (slot ``i`` holds position ``i``);
* a chain forward appends its tokens to sequence 0, and ``rollback(k)`` removes the cells of the
  last ``k`` positions (``llama_memory_seq_rm``);
* a tree forward gives each root-to-leaf branch a sequence id, and a node carries the id of every
  branch it lies on (the root all of them), so a node sees the prefix and exactly its ancestors.
  Branches other than 0 first get the prefix by ``llama_memory_seq_cp``, which only tags cells.
  ``keep`` then removes the other branches, cuts the accepted branch after the accepted node,
  copies it into sequence 0 and drops the branch ids;
* ``hidden_layers=(num_layers,)`` is llama.cpp's embeddings output, the final hidden state after
  the final norm (for drafters that read it). Intermediate layers, layer subsets and reduced
  vocabularies cannot be reached through llama.cpp: methods that need them are refused in one line.

A context holds one KV cache, so one cache per model is live at a time: :meth:`new_cache` clears
the context's memory, and the cache object handed out before refuses further use.

Lossless to the last bit: greedy speculative decoding reproduces plain decoding only if each row of
a forward over k tokens equals a one-token forward. ggml's reference kernels compute every output
element on its own, so they are batch-invariant; three faster paths are not, and are kept off:
llamafile's batched matmuls (a build option: ``-DGGML_LLAMAFILE=OFF`` in :data:`CMAKE_ARGS`), the
tiled K-quant matmul for 8 rows or more (``GGML_CPU_TILED_MM=0``, an environment variable ggml
reads once per process: set here before llama.cpp first runs) and repacked weights (the model
parameter ``use_extra_bufts``). :attr:`LlamaCppModel.bitwise_exact` says whether all three hold.
Off, they cost nothing measurable on this model here (figures in the README).

Trees are not bitwise exact, and so are off by default (``supports_trees = False``: drafters send
chains). A tree forward puts its nodes in consecutive cells, so a node's ancestors sit at other
cell indices than in a chain forward of its path, and ggml's attention sums (softmax and the
weighted values, SIMD lanes by cell index) then round differently; through the quantized
activations this moves logits by up to ~1.5 on random tokens, enough to flip near-ties. With
``trees=True`` the tree machinery above runs (rows agree with the path's chain forward up to that
rounding), for speed where bit-exactness does not matter.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import weakref
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..diskcache import cpu_flags, isa_args
from ..errors import GenrefineError, ModelLoadError
from ..types import ModelOutput

# llama-cpp-python is built from source by pip; these flags make a build for the instruction sets
# this CPU has (AVX2 always; AVX-512 and its extensions where /proc/cpuinfo lists them: a build with
# AVX-512 died with an illegal instruction on an AVX2-only AMD EPYC, and a GGML_NATIVE one on the
# CI machines). GGML_LLAMAFILE=OFF keeps batched rows equal to one-token rows (see above);
# LLAVA_BUILD=OFF skips the multimodal library genrefine does not use (a shorter build).
@functools.lru_cache(maxsize=None)
def cmake_args() -> str:
    """The build flags (:data:`CMAKE_ARGS`), read from /proc/cpuinfo on first use, not at import."""
    return " ".join(
        (
            "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON",
            *isa_args(cpu_flags()),
            "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_LLAMAFILE=OFF",
            "-DLLAVA_BUILD=OFF",
        )
    )


def install_hint() -> str:
    """How to install the backend (:data:`INSTALL_HINT`)."""
    return f"pip install 'genrefine[llamacpp]' (built from source: set CMAKE_ARGS=\"{cmake_args()}\")"


def __getattr__(name: str) -> str:
    # CMAKE_ARGS and INSTALL_HINT as module constants, computed when first asked for
    if name == "CMAKE_ARGS":
        return cmake_args()
    if name == "INSTALL_HINT":
        return install_hint()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TILED_ENV = "GGML_CPU_TILED_MM"
MAX_BRANCHES = 64  # sequence ids per context: the widest draft tree (leaves) a forward takes
BATCH = 512  # tokens per llama_decode call (the engine's prefill chunk)
DEFAULT_CONTEXT = 8192  # KV cells (max_context) when the model trained on a longer context


class BackendUnavailable(ModelLoadError):
    """llama-cpp-python is not installed (or its shared library does not load)."""


def import_llama_cpp():
    """The ``llama_cpp`` module, or :class:`BackendUnavailable` saying how to install it."""
    os.environ.setdefault(TILED_ENV, "0")  # before ggml's first matmul reads it (module docstring)
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as e:
        raise BackendUnavailable(f"the llama.cpp backend needs llama-cpp-python: {install_hint()}") from e
    _check_runs_here()
    if not _LOG:
        _LOG.append(llama_cpp.llama_log_callback(_log_line))  # referenced, so never collected
        llama_cpp.llama_log_set(_LOG[0], ctypes.c_void_p(0))
    return llama_cpp


_RUNS_HERE: list[str | None] = []  # [None, or why the installed library cannot run on this CPU]


def _check_runs_here() -> None:
    """BackendUnavailable when the installed library dies on this CPU. A build for instruction
    sets this CPU lacks (AVX-512 on an AVX2-only one, from an old wheel in pip's cache, which is
    keyed by the source alone) imports fine and then kills the process with an illegal
    instruction at its first call, so a child process makes that first call, once per process."""
    if not _RUNS_HERE:
        probe = "import llama_cpp; llama_cpp.llama_print_system_info()"
        try:
            r = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120)
            why = None
            if r.returncode == -signal.SIGILL:
                why = (
                    "the installed llama-cpp-python was built for instruction sets this CPU lacks "
                    "(it died with an illegal instruction); rebuild it: CMAKE_ARGS="
                    f'"{cmake_args()}" pip install --no-cache-dir --force-reinstall llama-cpp-python'
                )
        except (OSError, subprocess.TimeoutExpired):
            why = None  # no verdict: the import above worked, let the backend try
        _RUNS_HERE.append(why)
    if _RUNS_HERE[0]:
        raise BackendUnavailable(_RUNS_HERE[0])


# llama.cpp logs through one process-wide callback. Ours keeps its recent error lines (quoted when
# a call fails) and drops the rest: model-loading chatter is not the user's business.
_LOG: list = []  # [the ctypes callback]
_ERRORS: deque[str] = deque(maxlen=8)
_LOG_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


def _log_line(level: int, text: bytes, user_data) -> None:
    if level == _LOG_ERROR:
        _ERRORS.append(text.decode("utf-8", "replace").strip())


def _last_error() -> str:
    return f": {_ERRORS[-1]}" if _ERRORS else ""


def is_available() -> bool:
    try:
        import_llama_cpp()
    except BackendUnavailable:
        return False
    return True


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LlamaCppCache:
    """The model context's KV cache with the interface of :class:`KVCache`.

    ``length`` counts committed positions plus the new tokens of the last forward; a tree forward
    stays *pending* (its branches live in sequences ``0 .. B-1``) until ``keep`` or ``rollback``.
    """

    def __init__(self, model: "LlamaCppModel", capacity: int, epoch: int) -> None:
        self._model = model
        self._epoch = epoch
        self.capacity = capacity
        self.length = 0
        # the pending tree: (first slot, branches [B, n] bool: node j lies on branch b)
        self._tree: tuple[int, np.ndarray] | None = None

    # ---------------------------------------------------------------- KVCache interface
    def reserve(self, n: int) -> int:
        """Check that ``n`` more entries fit; returns the first new slot."""
        self._check_live()
        if self._tree is not None:
            raise RuntimeError("a tree forward is pending: keep() or rollback() it first")
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache full: {self.length} + {n} entries exceed its capacity {self.capacity}"
            )
        return self.length

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` entries (their cells are freed)."""
        self._check_live()
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} entries of a cache holding {self.length}")
        new_len = self.length - n
        if self._tree is not None:
            start = self._tree[0]
            if new_len > start:  # keeps a prefix of the tree's nodes: must be a path
                self.keep(start, torch.arange(new_len - start))
                return
            self._drop_tree()
        if n:
            self._model._seq_rm(0, new_len, -1)
        self.length = new_len

    def keep(self, start: int, idx: Tensor) -> None:
        """Of the entries from slot ``start`` on, keep those at offsets ``idx`` (ascending): the
        root and the accepted path of the pending tree, or a prefix of a chain."""
        self._check_live()
        a = int(idx.numel())
        offsets = [int(i) for i in idx.tolist()]
        if start < 0 or start + a > self.length or (a and start + offsets[-1] >= self.length):
            raise ValueError(f"keep({start}, idx): offsets point past the {self.length} cached entries")
        if self._tree is None or a == 0:
            if offsets != list(range(a)):
                raise ValueError("keep: a chain keeps a prefix (idx = 0, 1, ..., a - 1)")
            self._drop_tree()
            self._model._seq_rm(0, start + a, -1)
            self.length = start + a
            return
        t_start, branches = self._tree
        if start != t_start:
            raise ValueError(f"keep({start}, ...): the pending tree starts at slot {t_start}")
        last = offsets[-1]
        on = np.flatnonzero(branches[:, last])
        b = int(on[0])
        path = np.flatnonzero(branches[b, : last + 1])  # ancestors-or-self of the last kept node
        if path.tolist() != offsets:
            raise ValueError(f"keep: offsets {offsets} are not a root-to-node path of the tree")
        m = self._model
        for s in range(branches.shape[0]):
            if s != b:
                m._seq_rm(s, start, -1)  # other branches' new cells
        m._seq_rm(b, start + a, -1)  # the accepted branch after the accepted node
        if b != 0:
            m._seq_cp(b, 0, start, -1)
        for s in range(1, branches.shape[0]):
            m._seq_rm(s, -1, -1)  # branch ids off every cell (the prefix's included)
        self._tree = None
        self.length = start + a

    def reset(self) -> None:
        self._check_live()
        self._model._clear()
        self._tree = None
        self.length = 0

    # ---------------------------------------------------------------- internals
    def _drop_tree(self) -> None:
        if self._tree is None:
            return
        start, branches = self._tree
        for s in range(1, branches.shape[0]):
            self._model._seq_rm(s, -1, -1)
        self._model._seq_rm(0, start, -1)
        self._tree = None

    def _check_live(self) -> None:
        if self._epoch != self._model._epoch:
            raise RuntimeError(
                "this llama.cpp cache was replaced by a newer new_cache() on the same model "
                "(one live cache per model)"
            )


class LlamaCppModel:
    """A GGUF model in a llama.cpp context, behind the model interface.

    ``n_ctx``: KV cells (and ``max_context``); default the model's training context, at most
    :data:`DEFAULT_CONTEXT`. ``n_threads``: default every core this process may use. ``trees``:
    verify draft trees (not bitwise exact; chains otherwise). ``repack``, ``flash_attn``: llama.cpp's
    faster paths that are not batch-invariant (off: see the module docstring).
    """

    backend = "llama.cpp"

    def __init__(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        flash_attn: bool = False,
        repack: bool = False,
        trees: bool = False,
    ) -> None:
        lc = import_llama_cpp()
        self._lc = lc
        path = Path(path)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = repack  # weights repacked for the CPU's SIMD kernels
        model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {str(path)!r} (see its log above)")
        self._model_p = model
        vocab = lc.llama_model_get_vocab(model)
        train_ctx = int(lc.llama_model_n_ctx_train(model))
        ctx_len = int(n_ctx or min(train_ctx, DEFAULT_CONTEXT))
        threads = int(n_threads or default_threads())
        cp = lc.llama_context_default_params()
        cp.n_ctx = ctx_len
        cp.n_batch = BATCH
        cp.n_ubatch = BATCH
        cp.n_seq_max = MAX_BRANCHES
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = True  # one cell store: copying a sequence only tags cells
        cp.swa_full = True  # sliding-window layers keep every cell, so any rollback works
        cp.embeddings = False
        cp.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            lc.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create a context for {str(path)!r}")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self._batch = lc.llama_batch_init(BATCH, 0, MAX_BRANCHES)
        self._finalizer = weakref.finalize(self, _free, lc, self._batch, ctx, model)
        b = self._batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(BATCH,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(BATCH,))
        self._b_nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(BATCH,))
        self._b_logits = np.ctypeslib.as_array(b.logits, shape=(BATCH,))
        self._b_seq = [np.ctypeslib.as_array(b.seq_id[i], shape=(MAX_BRANCHES,)) for i in range(BATCH)]
        for row in self._b_seq:
            row[0] = 0
        self._tree_rows = 0  # batch rows whose seq ids a tree forward changed
        self._embeddings = False
        self._epoch = 0

        self.path = path
        self.name = name or path.name
        self.vocab_size = int(lc.llama_vocab_n_tokens(vocab))
        self.num_layers = int(lc.llama_model_n_layer(model))
        self.hidden_size = int(lc.llama_model_n_embd(model))
        self.max_context = ctx_len
        self.n_threads = threads
        self.device = torch.device("cpu")
        self.dtype = "gguf"  # the GGUF's own (quantized) weights; logits come out in float32
        desc = ctypes_string(lc.llama_model_desc, model)
        self.description = desc  # e.g. "gemma3 270M Q4_K - Medium"
        self._vocab = vocab
        self.system_info = lc.llama_print_system_info().decode("utf-8", "replace")
        # rows of a k-token forward equal one-token forwards (module docstring)
        self.supports_trees = trees  # trees are not bitwise exact (module docstring)
        self.bitwise_exact = (
            not trees
            and "LLAMAFILE = 1" not in self.system_info
            and not repack
            and not flash_attn
            and os.environ.get(TILED_ENV) == "0"
        )

    # ------------------------------------------------------------------ interface
    def new_cache(self, capacity: int | None = None) -> LlamaCppCache:
        """The context's KV cache, cleared, for up to ``capacity`` tokens (at most ``n_ctx``).

        Replaces the cache handed out before (one live cache per model)."""
        self._clear()
        self._epoch += 1
        cap = min(capacity or self.max_context, self.max_context)
        return LlamaCppCache(self, cap, self._epoch)

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        cache: LlamaCppCache,
        positions: Tensor | None = None,
        tree_mask: Tensor | None = None,
        logits_rows: Tensor | None = None,
        hidden_layers: Sequence[int] = (),
        layers: Sequence[int] | None = None,
        vocab_subset=None,
    ) -> ModelOutput:
        """Same contract as :meth:`NativeModel.forward`; ``hidden_layers`` may only ask for the
        final hidden state (``num_layers``), and ``layers`` / ``vocab_subset`` are refused."""
        if layers is not None or vocab_subset is not None:
            raise GenrefineError(
                "layer subsets and reduced vocabularies need the native runtime (--backend native); "
                "llama.cpp runs the whole model"
            )
        want = sorted(set(int(h) for h in hidden_layers))
        if want and want != [self.num_layers]:
            raise GenrefineError(
                f"the llama.cpp backend gives only the final hidden state (layer {self.num_layers}); "
                "intermediate layers need the native runtime (--backend native)"
            )
        toks = tokens.detach().to("cpu", torch.long).reshape(-1).numpy()  # [n]
        n = int(toks.shape[0])
        start = cache.reserve(n)
        if tree_mask is None:
            if positions is not None and not torch.equal(
                positions.cpu().long(), torch.arange(start, start + n)
            ):
                raise GenrefineError(
                    "the llama.cpp backend appends chains at the next positions only "
                    "(explicit positions need a tree mask)"
                )
            branches = None
        else:
            branches = _branches(tree_mask)  # [B, n]
            if branches.shape[0] > MAX_BRANCHES:
                raise GenrefineError(
                    f"a draft tree with {branches.shape[0]} leaves is wider than the llama.cpp "
                    f"backend's {MAX_BRANCHES} sequences: draft at most {MAX_BRANCHES} nodes"
                )
            depth = np.asarray(tree_mask.cpu(), dtype=bool).sum(axis=1) - 1  # [n]
            pos = start + depth
            if positions is not None and not np.array_equal(positions.cpu().numpy(), pos):
                raise GenrefineError("tree positions must be the first slot + each node's depth")
            if n > BATCH:
                raise GenrefineError(f"a draft tree of {n} tokens exceeds one batch ({BATCH})")
        if logits_rows is None:
            rows = np.arange(n)
        else:
            rows = np.asarray(logits_rows.cpu(), dtype=np.int64).reshape(-1)
        out_rows = np.arange(n) if want else np.unique(rows)  # rows llama.cpp outputs
        self._set_embeddings(bool(want))
        if branches is None:
            logits, hidden = self._decode_chain(toks, start, out_rows, bool(want))
        else:
            logits, hidden = self._decode_tree(toks, pos, branches, out_rows, bool(want))
            cache._tree = (start, branches)
        cache.length = start + n
        if rows.shape[0] == 0:
            out_logits = None
        elif np.array_equal(rows, out_rows):
            out_logits = logits
        else:
            out_logits = logits.index_select(0, torch.from_numpy(np.searchsorted(out_rows, rows)))
        return ModelOutput(logits=out_logits, hidden={self.num_layers: hidden} if want else {})

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` by the GGUF's own tokenizer (BOS added when the model wants it)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} slots, had {cap}")
        return list(buf[:n])

    # ------------------------------------------------------------------ decoding
    def _decode_chain(self, toks, start, out_rows, embd):
        n = toks.shape[0]
        self._reset_tree_rows()
        logits, hidden = [], []
        for s in range(0, n, BATCH):
            e = min(n, s + BATCH)
            k = e - s
            self._b_token[:k] = toks[s:e]
            self._b_pos[:k] = np.arange(start + s, start + e)
            self._b_nseq[:k] = 1
            flags = np.zeros(k, dtype=np.int8)
            mine = out_rows[(out_rows >= s) & (out_rows < e)] - s
            flags[mine] = 1
            self._b_logits[:k] = flags
            self._run(k, start + s)
            if mine.shape[0]:
                lg, hd = self._outputs(mine.shape[0], embd)
                logits.append(lg)
                hidden.append(hd)
        lg = torch.cat(logits) if logits else torch.zeros(0, self.vocab_size)
        hd = torch.cat(hidden) if embd else None
        return lg, hd

    def _decode_tree(self, toks, pos, branches, out_rows, embd):
        n = toks.shape[0]
        for s in range(1, branches.shape[0]):
            self._seq_cp(0, s, -1, -1)  # the prefix, visible to every branch
        self._b_token[:n] = toks
        self._b_pos[:n] = pos
        for j in range(n):
            ids = np.flatnonzero(branches[:, j])
            self._b_nseq[j] = ids.shape[0]
            self._b_seq[j][: ids.shape[0]] = ids
        self._tree_rows = max(self._tree_rows, n)
        flags = np.zeros(n, dtype=np.int8)
        flags[out_rows] = 1
        self._b_logits[:n] = flags
        self._run(n, int(pos[0]))
        return self._outputs(out_rows.shape[0], embd)

    def _run(self, k: int, first_pos: int) -> None:
        self._batch.n_tokens = k
        rc = self._lc.llama_decode(self._ctx, self._batch)
        if rc != 0:
            what = {1: "no room left in the KV cache", 2: "aborted", -1: "invalid batch"}
            raise RuntimeError(
                f"llama_decode failed ({rc}: {what.get(rc, 'fatal error')}) on {k} tokens at "
                f"position {first_pos}{_last_error()}"
            )

    def _outputs(self, m: int, embd: bool):
        """The last decode's output rows: logits [m, vocab] float32 (and [m, hidden])."""
        ptr = self._lc.llama_get_logits(self._ctx)
        logits = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(m, self.vocab_size)).copy())
        hidden = None
        if embd:
            eptr = self._lc.llama_get_embeddings(self._ctx)
            hidden = torch.from_numpy(
                np.ctypeslib.as_array(eptr, shape=(m, self.hidden_size)).copy()
            )
        return logits, hidden

    def _reset_tree_rows(self) -> None:
        for j in range(self._tree_rows):
            self._b_seq[j][0] = 0
        self._tree_rows = 0

    def _set_embeddings(self, on: bool) -> None:
        if on != self._embeddings:
            self._lc.llama_set_embeddings(self._ctx, on)
            self._embeddings = on

    # ------------------------------------------------------------------ memory
    def _seq_rm(self, seq: int, p0: int, p1: int) -> None:
        if not self._lc.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise RuntimeError(f"llama.cpp could not remove positions [{p0}, {p1}) of sequence {seq}")

    def _seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._lc.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def _clear(self) -> None:
        self._lc.llama_memory_clear(self._mem, False)

    def close(self) -> None:
        """Free the context and the weights now (also done when the object is collected)."""
        self._finalizer()


def _free(lc, batch, ctx, model) -> None:
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)


def ctypes_string(fn, model) -> str:
    buf = ctypes.create_string_buffer(256)
    fn(model, buf, len(buf))
    return buf.value.decode("utf-8", "replace")


def _branches(tree_mask: Tensor) -> np.ndarray:
    """[B, n] bool: node j lies on the root-to-leaf branch b (leaves in node order).

    tree_mask: [n, n] bool, ancestor-or-self (row 0 is the root). Node j is a leaf when no other
    node has it as an ancestor; a leaf's row of the mask is its branch.
    """
    mask = np.asarray(tree_mask.cpu(), dtype=bool)
    n = mask.shape[0]
    if mask.shape != (n, n) or not mask.diagonal().all() or not mask[:, 0].all():
        raise GenrefineError("a tree mask must be [n, n], ancestor-or-self, with every node under the root")
    leaves = np.flatnonzero(mask.sum(axis=0) == 1)
    return mask[leaves]
