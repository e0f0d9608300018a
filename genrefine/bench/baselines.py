"""The baselines that are not genrefine: transformers' ``generate`` (plain, with prompt lookup,
with an assistant model) and llama-cpp-python's own completion loop, stock (``llamacpp_plain``,
in a child process) and on genrefine's exact build (``llamacpp_exact``). Each offers the backends'
``run(...) -> TurnResult`` (backends.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..models.llamacpp_stock import StockUnavailable
from .backends import TurnResult
from .llamacpp_worker import generate_plain

WORKER = str(Path(__file__).with_name("llamacpp_worker.py"))  # run as a script (its docstring)

HF_PROMPT_LOOKUP_TOKENS = 10


def hf_dtype(dtype: str, device: str, override: str | None = None) -> str:
    """The transformers baselines' dtype: ``override`` (``--hf-dtype``) when given; genrefine's
    own dtype when that is a float one; where genrefine runs quantized (or chooses), bfloat16 on
    a GPU or on a CPU with native bfloat16 arithmetic (AVX-512 BF16, AMX) and float32 on other
    CPUs. Without those instructions torch's bfloat16 matmuls of several rows are slow: on an
    AMD EPYC (AVX2), transformers' prompt lookup ran at 11.8 tokens/s in bfloat16 and 29.1 in
    float32 (plain ``generate`` 8.9 and 9.1), which would make that baseline look worse than it
    is."""
    from .. import diskcache

    if override:
        return override
    if dtype not in ("auto", "gguf", "q8_0"):
        return dtype
    if not device.startswith("cpu"):
        return "bfloat16"
    return "bfloat16" if diskcache.native_bf16() else "float32"


def load_hf_model(model: str | None, dtype: str, device: str):
    """The same weights through transformers (``AutoModelForCausalLM``), same dtype and device."""
    import torch

    from ..models.loading import _load_hf, resolve_source

    return _load_hf(resolve_source(model), getattr(torch, dtype)).to(device).eval()


class HFBackend:
    """transformers' ``generate`` (optionally with prompt lookup or an assistant model) on an HF
    model. ``tokenizers``: ``(target's, assistant's)`` when the assistant's tokenizer differs
    (transformers then bridges them itself), else None.

    Steps, drafts and accepted lengths are read off the model's forward calls: a pre-hook sees
    each call's input length and the cache length before it, so the tokens a step emitted are
    the difference between consecutive cache lengths.
    """

    def __init__(
        self,
        hf_model,
        eos_ids,
        pad_id: int | None,
        prompt_lookup: int | None,
        assistant=None,
        tokenizers: tuple | None = None,
    ) -> None:
        self.hf = hf_model
        self.eos = frozenset(int(e) for e in eos_ids)
        self.pad_id = pad_id if pad_id is not None else (min(self.eos) if self.eos else 0)
        self.prompt_lookup = prompt_lookup
        self.assistant, self.tokenizers = assistant, tokenizers
        # transformers' "heuristic" schedule carries the assistant's draft length from one
        # generate call to the next: every run starts again from this one
        self._assistant_tokens = (
            assistant.generation_config.num_assistant_tokens if assistant is not None else None
        )

    def run(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed) -> TurnResult:
        import torch

        calls: list[tuple[int | None, int]] = []  # (cache length before, input length)

        def pre_hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            pkv = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.24
            start = None
            if pkv is not None and hasattr(pkv, "get_seq_length"):
                try:
                    start = int(pkv.get_seq_length())
                except Exception:  # an unusual cache: fall back to counting steps only
                    start = None
            calls.append((start, int(ids.shape[-1]) if ids is not None else 1))

        x = torch.tensor([prompt_ids], dtype=torch.long, device=self.hf.device)  # [1, L]
        kw = dict(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos) or None,
            pad_token_id=self.pad_id,
        )
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(seed if seed is not None else 0)
        else:
            kw.update(do_sample=False)
        if self.prompt_lookup:
            kw["prompt_lookup_num_tokens"] = self.prompt_lookup
        if self.assistant is not None:
            self.assistant.generation_config.num_assistant_tokens = self._assistant_tokens
            kw["assistant_model"] = self.assistant
            if self.tokenizers is not None:
                kw["tokenizer"], kw["assistant_tokenizer"] = self.tokenizers
        handle = self.hf.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = self.hf.generate(**kw)
                seconds = time.perf_counter() - t0
        finally:
            handle.remove()
        L = len(prompt_ids)
        gen_ids = out[0, L:].tolist()
        tokens, ended = gen_ids, False
        for i, t in enumerate(gen_ids):
            if t in self.eos:
                tokens, ended = gen_ids[:i], True
                break
        # Steps as for genrefine: forwards after the first, tokens after the first. Call k fed
        # c_k uncached committed tokens (the prompt at k = 0, else the last token) plus
        # n_in - c_k candidates; it accepted a_k = start_{k+1} - start_k - c_k of them.
        steps = max(len(calls) - 1, 0)
        res = TurnResult(tokens, seconds, ended, L, steps=steps)
        starts = [c[0] for c in calls]
        if calls and all(s is not None for s in starts):
            ends = starts[1:] + [L + len(gen_ids) - 1]
            hist: list[int] = []
            drafted = accepted = 0
            for k, ((s, n_in), e) in enumerate(zip(calls, ends)):
                c = L if k == 0 else 1
                d = max(n_in - c, 0)
                if k == 0 and d == 0:
                    continue  # a plain prefill, not a step
                a = min(max(e - s - c, 0), d)
                drafted += d
                accepted += a
                while len(hist) <= a:
                    hist.append(0)
                hist[a] += 1
            res.drafted, res.accepted, res.accepted_hist = drafted, accepted, hist
        return res


class LlamaCppExactBackend:
    """llama-cpp-python's own completion loop (``Llama.generate``, the generator under
    ``create_completion``) on the same GGUF file, in this process: ``llamacpp_exact``. It runs
    genrefine's build with the llama.cpp backend's kernel settings (``plain_llama``: no repacked
    weights, no tiled or llamafile matmuls), so its greedy tokens are comparable with the llama.cpp
    backend's ``ar`` one for one. Loop and sampling: ``llamacpp_worker.generate_plain``.
    """

    def __init__(self, model_path: str, eos_ids, n_ctx: int, n_threads: int) -> None:
        self.llm = plain_llama(model_path, n_ctx, n_threads)
        self.eos = frozenset(int(e) for e in eos_ids)

    def run(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed) -> TurnResult:
        tokens, seconds, ended = generate_plain(
            self.llm, prompt_ids, max_new_tokens, temperature, seed, self.eos
        )
        return TurnResult(tokens, seconds, ended, len(prompt_ids))


class LlamaCppStockBackend:
    """llama-cpp-python as a user gets it: ``llamacpp_plain``. The same loop as
    :class:`LlamaCppExactBackend`, in a child process (llamacpp_worker.py) that loads the stock
    library ``lib`` (models/llamacpp_stock.py: repacked weights, tiled and llamafile matmuls), since
    one process holds one build. The child times its own loop; the pipe is not timed.

    ``command`` replaces the child's command line (tests run a fake worker)."""

    def __init__(
        self, model_path: str, eos_ids, n_ctx: int, n_threads: int, lib, command=None
    ) -> None:
        import subprocess
        import tempfile
        import weakref

        from ..models.llamacpp_stock import stock_env

        cmd = command or [sys.executable, WORKER, str(model_path), str(n_ctx), str(n_threads)]
        self.eos = sorted(int(e) for e in eos_ids)
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
            env=stock_env(lib), text=True, bufsize=1,
        )
        self._finalizer = weakref.finalize(self, _stop, self.proc, self._err)
        ready = self._receive("start")
        self.system_info = ready.get("ready", "")

    def run(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed) -> TurnResult:
        req = {"prompt": [int(t) for t in prompt_ids], "max_new_tokens": int(max_new_tokens),
               "temperature": float(temperature), "seed": seed, "eos": self.eos}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child died: _receive says how
        r = self._receive("generate")
        return TurnResult([int(t) for t in r["tokens"]], float(r["seconds"]), bool(r["ended"]),
                          len(prompt_ids))

    def close(self) -> None:
        """End the child process (also done when the object is collected)."""
        self._finalizer()

    def _receive(self, what: str) -> dict:
        line = self.proc.stdout.readline()
        msg = json.loads(line) if line.strip() else None
        if msg is None or "error" in msg:
            if msg is None:
                rc = self.proc.wait(timeout=30)
                self._err.seek(0)
                tail = [t for t in self._err.read().decode("utf-8", "replace").splitlines() if t.strip()]
                why = f"it exited ({rc}){': ' + tail[-1].strip() if tail else ''}"
            else:
                why = msg["error"]
            raise StockUnavailable(f"the stock llama.cpp process could not {what}: {why}")
        return msg


def _stop(proc, err) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()
    err.close()


def plain_llama(path: str | os.PathLike, n_ctx: int, n_threads: int | None = None):
    """llama-cpp-python's high-level ``Llama`` on ``path`` with the llama.cpp backend's kernels
    (no repacked weights: see genrefine/models/llamacpp.py's docstring), for comparisons token for
    token.

    ``Llama`` has no option for repacking, so the default model parameters it starts from are
    swapped for the duration of the constructor.
    """
    from ..models.llamacpp import default_threads, import_llama_cpp

    lc = import_llama_cpp()
    import llama_cpp.llama_cpp as low

    stock = low.llama_model_default_params

    def defaults():
        params = stock()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = defaults
    try:
        threads = int(n_threads or default_threads())
        return lc.Llama(
            str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    finally:
        low.llama_model_default_params = stock
