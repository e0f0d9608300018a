"""llama-cpp-python's own completion loop, for the llama.cpp baselines: in the bench's process
(``llamacpp_exact``, genrefine's exact build) or in a child process on the stock library
(``llamacpp_plain``: baselines.py starts this file as a script with ``LLAMA_CPP_LIB_PATH`` set).

As a script, ``python llamacpp_worker.py MODEL N_CTX N_THREADS`` loads the model, writes one JSON
line ``{"ready": system_info}`` and then answers each request line ``{"prompt": [ids],
"max_new_tokens": n, "temperature": t, "seed": s or null, "eos": [ids]}`` with ``{"tokens":
[ids], "seconds": s, "ended": bool}``, or ``{"error": message}``. It imports nothing of genrefine
(nor torch), so the child loads no library but the one ``LLAMA_CPP_LIB_PATH`` names.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # a script's folder goes first on sys.path; genrefine/bench is no root
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import json  # noqa: E402
import time  # noqa: E402


def generate_plain(llm, prompt_ids, max_new_tokens: int, temperature: float, seed, eos) -> tuple:
    """``Llama.generate`` from an empty cache until a token of ``eos`` or ``max_new_tokens``:
    ``(tokens, seconds, ended)``. Greedy is ``temperature`` 0; sampling uses temperature alone
    (top-k 0, top-p 1, min-p 0, no repeat penalty)."""
    if seed is not None:
        llm.set_seed(int(seed))
    llm.reset()  # no prompt-prefix reuse between runs, as genrefine's runs
    tokens: list[int] = []
    ended = False
    t0 = time.perf_counter()
    for t in llm.generate(
        list(prompt_ids), temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0
    ):
        if t in eos:  # the same stop tokens as genrefine's runs
            ended = True
            break
        tokens.append(int(t))
        if len(tokens) >= max_new_tokens:
            break
    return tokens, time.perf_counter() - t0, ended


def serve(llm, requests, reply) -> None:
    """Answer each JSON line of ``requests`` with one JSON line through ``reply(str)``."""
    for line in requests:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            tokens, seconds, ended = generate_plain(
                llm, r["prompt"], int(r["max_new_tokens"]), float(r["temperature"]), r.get("seed"),
                frozenset(int(e) for e in r.get("eos", ())),
            )
            out = {"tokens": tokens, "seconds": seconds, "ended": ended}
        except Exception as e:  # the parent reports it in one line
            out = {"error": f"{type(e).__name__}: {e}"}
        reply(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    model, n_ctx, n_threads = (argv if argv is not None else sys.argv[1:])[:3]
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the replies' channel
    os.dup2(2, 1)  # whatever llama.cpp prints goes to stderr, not into the replies

    def reply(text: str) -> None:
        proto.write(text + "\n")
        proto.flush()

    try:
        import llama_cpp

        llm = llama_cpp.Llama(
            model, n_ctx=int(n_ctx), n_threads=int(n_threads), n_threads_batch=int(n_threads),
            verbose=False,
        )
        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    except Exception as e:
        reply(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    reply(json.dumps({"ready": info, "lib": os.environ.get("LLAMA_CPP_LIB_PATH")}))
    serve(llm, sys.stdin, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
