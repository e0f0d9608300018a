"""The ``genrefine`` command line. Nothing else in the package reads ``sys.argv``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import GenrefineError

DEMO_PROMPT = (
    "Summarize the following notes in two sentences, reusing their wording.\n\n"
    "Notes: The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
    "The council voted to extend the bicycle lanes on Main Street to the river by next summer. "
    "Shop owners on Main Street asked the council to keep parking on one side of Main Street. "
    "The council agreed to keep parking on the north side of Main Street and to review the "
    "bicycle lanes after one year.\n\nSummary: The city council"
)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="local Hugging Face directory or .gguf file (default: the embedded Gemma 3 270M)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16: fastest on CPU here, see README), float32, bfloat16, float16",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda")
    g.add_argument(
        "--backend",
        default="native",
        help="native (default: the PyTorch runtime), llama.cpp (GGUF files; needs "
        "pip install 'genrefine[llamacpp]'), hf (the transformers adapter), auto (the faster of "
        "native and llama.cpp for this model here, measured once)",
    )


def _add_draft_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH",
        help="method sps (and bench's hf_assisted): the draft model, a Hugging Face directory or "
        ".gguf file, loaded with the target's dtype and device; best with the target's "
        "tokenizer (another tokenizer is bridged through text)",
    )


def _add_drafter_option(p) -> None:
    p.add_argument(
        "--drafter",
        default=None,
        metavar="DIR",
        help="bpd, bpd+ngram, bpd+lm, medusa, eagle: a drafter trained with `genrefine train` "
        "(default: the one shipped for the embedded model)",
    )


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    from .methods import method_names

    g = p.add_argument_group("generation")
    g.add_argument(
        "--method",
        default="ar",
        help=f"one of {', '.join(method_names())} (see `genrefine methods`); default ar",
    )
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (repeatable runs)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--draft-len", type=int, default=None, help="largest draft per step (method default)")
    g.add_argument(
        "--acceptance",
        default="exact",
        choices=["exact", "typical"],
        help="sampling acceptance: exact (lossless, default) or typical (Medusa's, lossy)",
    )
    g.add_argument("--datastore", default=None,
                   help="rest: a datastore built by `genrefine index build` (default: none, "
                   "drafts from the context and earlier outputs)")
    g.add_argument("--exit-layer", type=int, default=None,
                   help="early-exit-draft: how many layers the draft runs")
    g.add_argument("--draft-vocab", type=int, default=None,
                   help="self-drafting, trained methods and sps: project drafts onto the N most "
                   "frequent tokens (default for early-exit-draft, swift and sps: 32768 when the "
                   "vocabulary has over 65536 tokens; for trained drafters: 8192 of the tokens "
                   "they were trained on; a number >= the vocabulary size means all)")
    g.add_argument("--no-tree-cut", dest="tree_cut", action="store_false",
                   help="trained methods (and pld, rest on llama.cpp): verify whole drafts "
                   "instead of cutting them to what pays on this machine (measured forward times)")
    _add_draft_model_option(g)
    _add_drafter_option(g)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genrefine",
        description=(
            "Faster generation without changing the output: a cheap drafter proposes tokens, "
            "the model verifies them all in one forward pass."
        ),
    )
    p.add_argument("--version", action="version", version=f"genrefine {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate text from a prompt and print speed figures",
        description="Stream a continuation of PROMPT to stdout; a summary line goes to stderr.",
    )
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    _add_model_options(g)
    _add_generation_options(g)

    d = sub.add_parser(
        "demo",
        help="run plain decoding and speculative methods on one prompt and compare their speed",
        description=(
            "Generate from a built-in summarization prompt with each method, check that greedy "
            "outputs are identical, and print tokens/s and speedup over plain decoding."
        ),
    )
    d.add_argument("--methods", default="ar,pld,jacobi,auto", help="comma-separated methods")
    d.add_argument("--prompt", default=None, help="prompt text (default: a built-in one)")
    d.add_argument("--max-new-tokens", type=int, default=96)
    _add_model_options(d)
    _add_draft_model_option(d)
    _add_drafter_option(d)

    b = sub.add_parser(
        "bench",
        help="benchmark methods against plain decoding on Spec-Bench questions",
        description=(
            "Run every method on every question (interleaved, after a warm-up), check that "
            "lossless methods reproduce ar's greedy tokens, and write a JSON report (plus "
            "Markdown and a plot on request). Per-question results go to OUT.questions.jsonl "
            "as they finish; running the same command again resumes."
        ),
    )
    b.add_argument(
        "--questions",
        default=None,
        help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl "
        "beside the repository, when it exists)",
    )
    b.add_argument(
        "--methods",
        default="ar,pld,jacobi,auto",
        help="comma-separated genrefine methods and hf_generate, hf_prompt_lookup, "
        "hf_assisted (transformers baselines; hf_assisted and sps need --draft-model); ar is "
        "always run (default ar,pld,jacobi,auto)",
    )
    b.add_argument("--categories", default=None, help="comma-separated categories (default all)")
    b.add_argument("--limit-per-category", type=int, default=None, metavar="N",
                   help="the first N questions of each category")
    b.add_argument("--max-new-tokens", type=int, default=128, help="per turn (default 128)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    b.add_argument("--repeats", type=int, default=1, help="runs of each question (default 1)")
    b.add_argument("--json", required=True, metavar="OUT.json", help="the JSON report")
    b.add_argument("--report", default=None, metavar="OUT.md", help="also a Markdown report")
    b.add_argument("--plot", default=None, metavar="OUT.png", help="also a figure")
    b.add_argument("--quick", action="store_true",
                   help="smoke test: 1 question per category, 24 new tokens")
    b.add_argument("--fresh", action="store_true",
                   help="discard earlier per-question results instead of resuming")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--no-tree-cut", dest="tree_cut", action="store_false",
                   help="verify whole drafts instead of cutting them to what pays on this machine "
                   "(trained methods; pld and rest on llama.cpp): block efficiency as the papers "
                   "measure it")
    b.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="self-drafting, trained methods and sps: project drafts onto the N most "
                   "frequent tokens (default: each method's own, see genrefine generate --help)")
    _add_model_options(b)
    _add_draft_model_option(b)
    _add_drafter_option(b)

    ix = sub.add_parser(
        "index",
        help="build a retrieval datastore for method rest",
        description="Datastores for retrieval drafting (method rest).",
    )
    ix_sub = ix.add_subparsers(dest="index_command", metavar="ACTION")
    ib = ix_sub.add_parser(
        "build",
        help="tokenize a folder of text files into a suffix-indexed datastore",
        description="Tokenize every .txt, .md, .py and .rst file under DIR with the model's "
        "tokenizer and write a suffix-array datastore (safetensors) to --out.",
    )
    ib.add_argument("directory", metavar="DIR", help="folder of text files (searched recursively)")
    ib.add_argument("--out", required=True, help="datastore file to write (.safetensors)")
    ib.add_argument("--model", default=None,
                    help="model whose tokenizer to use (default: the embedded Gemma 3 270M)")

    dm = sub.add_parser(
        "draft-model",
        help="make a draft model for method sps",
        description="Draft models for method sps.",
    )
    dm_sub = dm.add_subparsers(dest="draft_model_command", metavar="ACTION")
    ds = dm_sub.add_parser(
        "shrink",
        help="write the target's first K layers as a draft model (a shallow copy, not trained)",
        description="Write the first K decoder layers, the final norm and the embedding/head of "
        "a model as a Hugging Face directory that --draft-model loads. A shallow copy of the "
        "target, not a trained drafter: expect low acceptance (see genrefine/models/shrink.py).",
    )
    ds.add_argument("--model", default=None,
                    help="the model to cut (default: the embedded Gemma 3 270M)")
    ds.add_argument("--layers", type=int, required=True, metavar="K", help="layers to keep")
    ds.add_argument("--out", required=True, metavar="DIR", help="new directory to write")
    ds.add_argument("--dtype", default="bfloat16", help="weights as saved (default bfloat16)")

    tr = sub.add_parser(
        "train",
        help="train a drafter against a model: prediction heads (bpd, medusa) or EAGLE",
        description="Record teacher-forced passes of the model over a corpus, train the "
        "drafter (checkpoints in --out; rerunning the same command resumes), save it as "
        "--out/drafter.safetensors and print its tokens per step on held-back text. Load it "
        "with --drafter DIR.",
    )
    tr.add_argument("kind", choices=["heads", "eagle", "draft"],
                    help="heads: BPD/Medusa heads + rescoring LM and n-gram; eagle: feature "
                    "drafter; draft: a small draft model distilled from the model (method sps)")
    _add_model_options(tr)
    tr.add_argument("--corpus", default=None, metavar="DIR",
                    help="folder of .txt/.md/.rst files (default: the standard library's "
                    "docstrings and language reference, see genrefine/train/corpus.py)")
    tr.add_argument("--self-generated", type=int, default=0, metavar="N",
                    help="also train on the model's own greedy answers to N prompts built from the "
                    "default corpus (self-distillation; decoded in batches, cached)")
    tr.add_argument("--out", required=True, metavar="DIR", help="folder for the drafter and checkpoints")
    tr.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    tr.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default: heads 1e-3, eagle 3e-3, draft 3e-4)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    tr.add_argument("--max-tokens", type=int, default=300_000, help="corpus tokens used (default 300000)")
    tr.add_argument("--heads", type=int, default=4, help="heads: how many (default 4)")
    tr.add_argument("--layers", type=int, default=2,
                    help="draft: the model's first layers the draft starts from (default 2)")
    tr.add_argument("--topk", type=int, default=4, help="candidates per head / per draft node (default 4)")
    tr.add_argument("--draft-vocab", type=int, default=32768,
                    help="tokens the drafter projects onto (default 32768)")
    tr.add_argument("--checkpoint-every", type=int, default=200)
    tr.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")

    sv = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API with continuous batching",
        description=(
            "Serve POST /v1/completions and /v1/chat/completions (streaming with stream: true), "
            "GET /v1/models, /health and /metrics. Requests that arrive together are decoded "
            "together, one target forward per step for the whole batch; a request may pick its "
            "method with the extra body field \"method\". Ctrl-C or SIGTERM stops after the "
            "requests in flight."
        ),
    )
    _add_model_options(sv)
    from .methods import method_names

    s = sv.add_argument_group("serving")
    s.add_argument("--method", default="auto",
                   help=f"default method of requests that name none: one of "
                   f"{', '.join(method_names())} (default auto)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting for a slot; more are answered 429 (default 32)")
    s.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for (default 4096)")
    s.add_argument("--batching", default="auto", choices=["auto", "always", "never"],
                   help="one forward for the whole batch: auto (when the model is bitwise exact, "
                   "bfloat16 with batch-invariant matmuls; else one forward per sequence), "
                   "always, never")
    s.add_argument("--draft-len", type=int, default=None, help="largest draft per step (method default)")
    s.add_argument("--datastore", default=None,
                   help="rest: a datastore built by `genrefine index build` (requests cannot "
                   "name files)")
    s.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info shows every request; default warning)")

    sub.add_parser(
        "methods",
        help="list the methods and whether each is lossless",
        description="List the methods: name, lossless or lossy, and what each does.",
    )
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _read_prompt(arg: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise GenrefineError("the prompt is empty: give some text (or - to read it from stdin)")
    return text


def _options(args):
    from .methods import MethodOptions

    return MethodOptions(
        draft_len=args.draft_len,
        acceptance=args.acceptance,
        datastore=args.datastore,
        exit_layer=args.exit_layer,
        draft_vocab=args.draft_vocab,
        draft_model=args.draft_model,
        drafter=args.drafter,
        tree_cut=args.tree_cut,
    )


def _validate_before_load(args, methods: list[str]) -> None:
    """Catch user mistakes before spending seconds on loading a model."""
    from .methods import METHODS
    from .models.loading import (
        check_backend,
        resolve_backend,
        resolve_device,
        resolve_dtype,
        resolve_source,
    )

    for m in methods:
        if m not in METHODS:
            raise GenrefineError(f"unknown method {m!r}: choose one of {', '.join(METHODS)}")
    if getattr(args, "max_new_tokens", 1) < 1:
        raise GenrefineError("--max-new-tokens must be a positive integer")
    dev = resolve_device(args.device)
    resolve_dtype(args.dtype, dev)
    if args.model is not None:
        resolve_source(args.model)
    backend = resolve_backend(getattr(args, "backend", None))
    if backend == "llama.cpp":
        check_backend(backend, resolve_source(args.model))
    if backend in ("llama.cpp", "hf"):
        for m in methods:
            if m in METHODS and METHODS[m].native_only:
                raise GenrefineError(
                    f"method {m} needs the native runtime ({METHODS[m].native_reason}); the "
                    f"{backend} backend runs the whole model only: use --backend native"
                )
    draft = getattr(args, "draft_model", None)
    needs = [m for m in methods if METHODS[m].needs_draft_model]
    if needs and draft is None:
        raise GenrefineError(
            f"method {needs[0]} needs a draft model: add --draft-model PATH (a smaller model, "
            "best with the same tokenizer; `genrefine draft-model shrink` cuts one from the target)"
        )
    if draft is not None:
        resolve_source(draft)
    store = getattr(args, "datastore", None)
    if store is not None and not Path(store).is_file():
        raise GenrefineError(
            f"datastore {store!r} does not exist: build one with "
            "`genrefine index build DIR --out FILE`"
        )


def _summary(result, elapsed: float) -> str:
    s = result.stats
    acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
    return (
        f"[{s.new_tokens} tokens in {elapsed:.2f} s, {s.tokens_per_s:.1f} tokens/s, "
        f"method {s.method}, {s.tokens_per_step:.2f} tokens/step{acc}]"
    )


def cmd_generate(args) -> int:
    from .api import load
    from .types import SamplingParams

    prompt = _read_prompt(args.prompt)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # validates
    opts = _options(args)
    _validate_before_load(args, [args.method])
    gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    t0 = time.perf_counter()
    stream = gen.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        method=args.method,
        stop=args.stop,
        options=opts,
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_summary(stream.result, time.perf_counter() - t0), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .api import load
    from .methods import MethodOptions, is_lossless

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ar" not in methods:
        methods.insert(0, "ar")
    _validate_before_load(args, methods)
    opts = MethodOptions(draft_model=args.draft_model, drafter=args.drafter)
    prompt = args.prompt or DEMO_PROMPT
    t0 = time.perf_counter()
    gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    print(f"model: {gen.name}, dtype {str(gen.model.dtype).replace('torch.', '')}, "
          f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    gen.generate(prompt, max_new_tokens=8)  # warm-up
    results = {}
    for m in methods:
        results[m] = gen.generate(prompt, max_new_tokens=args.max_new_tokens, method=m, options=opts)
    base = results["ar"]
    print(f"\n--- ar output ---\n{base.text.strip()}\n")
    print(f"{'method':<10} {'tokens/s':>9} {'speedup':>8} {'tok/step':>9}  same output as ar")
    for m, r in results.items():
        s = r.stats
        same = r.token_ids == base.token_ids
        if not same and is_lossless(m):
            flag = "NO (a lossless method must match: please report this)"
        else:
            flag = "yes" if same else "no (lossy)"
        print(
            f"{m:<10} {s.tokens_per_s:>9.1f} {s.tokens_per_s / base.stats.tokens_per_s:>7.2f}x "
            f"{s.tokens_per_step:>9.2f}  {flag}"
        )
    return 0


def cmd_bench(args) -> int:
    from .bench.plan import BenchConfig, plan_bench
    from .bench.runner import command_line, execute

    argv = sys.argv[1:] if sys.argv[1:2] == ["bench"] else _bench_argv(args)
    config = BenchConfig(
        json_path=args.json,
        questions=args.questions,
        methods=args.methods,
        model=args.model,
        draft_model=args.draft_model,
        drafter=args.drafter,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        categories=args.categories,
        limit_per_category=args.limit_per_category,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        report_path=args.report,
        plot_path=args.plot,
        quick=args.quick,
        fresh=args.fresh,
        progress=not args.no_progress,
        command=command_line(argv),
        tree_cut=args.tree_cut,
        draft_vocab=args.draft_vocab,
    )
    plan = plan_bench(config)  # every check that needs no model
    result = execute(plan)
    print(result.markdown)
    written = [plan.json_path, plan.jsonl_path, plan.report_path, plan.plot_path]
    print("wrote " + ", ".join(str(p) for p in written if p is not None), file=sys.stderr)
    bad = [m for m, r in result.report["methods"].items() if r.get("lossless") is False]
    if bad:
        print(f"genrefine: warning: output differs from the reference for {', '.join(bad)}",
              file=sys.stderr)
    return 0


def _bench_argv(args) -> list[str]:
    """The bench options as a command line (for the report, when sys.argv is not ours)."""
    out = ["bench"]
    for opt in ("questions", "methods", "model", "draft_model", "drafter", "categories", "limit_per_category",
                "max_new_tokens", "temperature", "repeats", "draft_vocab", "dtype", "device",
                "backend", "json",
                "report",
                "plot"):
        v = getattr(args, opt)
        if v is not None:
            out += [f"--{opt.replace('_', '-')}", str(v)]
    for flag in ("quick", "fresh"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    if not getattr(args, "tree_cut", True):
        out.append("--no-tree-cut")
    return out


def cmd_index(args) -> int:
    from .drafters.retrieval import index_build_main

    if args.index_command != "build":
        raise GenrefineError("say what to do: genrefine index build DIR --out FILE")
    return index_build_main(args.directory, args.model, args.out)


def cmd_draft_model(args) -> int:
    from .models.shrink import shrink_main

    if args.draft_model_command != "shrink":
        raise GenrefineError("say what to do: genrefine draft-model shrink --layers K --out DIR")
    return shrink_main(args.model, args.layers, args.out, args.dtype)


def cmd_train(args) -> int:
    from .api import load
    from .train.corpus import default_corpus, read_corpus
    from .train.loop import TrainConfig
    from .train.run import DrafterSpec, run_training

    lr = args.lr if args.lr is not None else {"eagle": 3e-3, "heads": 1e-3, "draft": 3e-4}[args.kind]
    cfg = TrainConfig(steps=args.steps, lr=lr, batch=args.batch, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, warmup=min(50, args.steps // 10 + 1))
    spec = DrafterSpec(kind=args.kind, num_heads=args.heads, topk=args.topk, layers=args.layers,
                       draft_vocab=args.draft_vocab, seq_len=args.seq_len, max_tokens=args.max_tokens)
    texts = read_corpus(args.corpus) if args.corpus is not None else None
    _validate_before_load(args, [])
    if args.self_generated < 0:
        raise GenrefineError(f"--self-generated must be >= 0, got {args.self_generated}")
    if args.backend not in ("native", None):
        raise GenrefineError("training runs on the native runtime: drop --backend")
    gen = load(args.model, dtype=args.dtype, device=args.device)
    if texts is None:
        texts = default_corpus(gen.tokenizer)
    if args.self_generated:
        from .train.selfgen import self_generated_texts

        # first, so that --max-tokens keeps them
        texts = self_generated_texts(gen.model, gen.tokenizer, set(gen.eos_ids),
                                     args.self_generated, progress=not args.no_progress) + texts
    res = run_training(gen.model, gen.tokenizer, texts, spec, cfg, args.out,
                       resume=not args.fresh, progress=not args.no_progress, source=args.model)
    method = {"heads": "medusa", "eagle": "eagle", "draft": "sps"}[args.kind]
    print(
        f"genrefine: saved {res.out if args.kind == 'draft' else res.out / 'drafter.safetensors'} in {res.seconds:.0f} s; "
        f"{method} on held-back text: {res.tokens_per_step:.2f} tokens/step "
        f"({'same tokens as ar' if res.ar_steps_equal else 'OUTPUT DIFFERS FROM ar'})",
        file=sys.stderr,
    )
    for k, v in res.extra.items():
        print(f"genrefine: {k}: {v}", file=sys.stderr)
    return 0 if res.ar_steps_equal else 1


def cmd_serve(args) -> int:
    from .api import load
    from .methods import MethodOptions
    from .server import ServerConfig, _need_extras, serve

    _need_extras()
    if not 0 <= args.port <= 65535:
        raise GenrefineError(f"--port must be between 0 and 65535, got {args.port}")
    config = ServerConfig(
        method=args.method,
        options=MethodOptions(draft_len=args.draft_len, datastore=args.datastore),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batching=args.batching,
        max_tokens_limit=args.max_tokens_limit,
    )
    _validate_before_load(args, [args.method])
    if args.backend in ("llama.cpp", "llamacpp", "auto") and args.max_batch > 1:
        raise GenrefineError(  # a llama.cpp context holds one live KV cache (models/llamacpp.py)
            f"--backend {args.backend} may serve on llama.cpp, which decodes one request at a "
            "time: add --max-batch 1 (or use --backend native)"
        )
    gen = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    serve(gen, config, host=args.host, port=args.port, log_level=args.log_level)
    print("genrefine: server stopped", file=sys.stderr)
    return 0


def cmd_methods(args) -> int:
    from .methods import METHODS

    for m in METHODS.values():
        kind = "lossless" if m.lossless else "lossy"
        print(f"{m.name:<10} {kind:<9} {m.summary}")
    print("genrefine: note: lossless = greedy tokens equal ar's when the model runs bitwise exact "
          "(bf16 with batch-invariant kernels); otherwise (float32, some CPUs, the transformers "
          "backend) a near-tie can differ. genrefine bench records bitwise_exact per run",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {
        "generate": cmd_generate,
        "demo": cmd_demo,
        "methods": cmd_methods,
        "bench": cmd_bench,
        "index": cmd_index,
        "serve": cmd_serve,
        "draft-model": cmd_draft_model,
        "train": cmd_train,
    }[args.command]
    try:
        return handler(args)
    except GenrefineError as e:
        print(f"genrefine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngenrefine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
