"""``genrefine train heads|eagle|draft``: drafters trained against a model."""

from __future__ import annotations

import sys

from ..errors import GenrefineError
from .options import add_model_options, validate_before_load


def add_train_parser(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a drafter against a model: prediction heads (bpd, medusa) or EAGLE",
        description="Record teacher-forced passes of the model over a corpus, train the "
        "drafter (checkpoints in --out; rerunning the same command resumes), save it as "
        "--out/drafter.safetensors and print its tokens per step on held-back text. Load it "
        "with --drafter DIR.",
    )
    tr.add_argument("kind", choices=["heads", "eagle", "draft", "image", "speech"],
                    help="heads: BPD/Medusa heads + rescoring LM and n-gram; eagle: feature "
                    "drafter; draft: a small draft model distilled from the model (method sps); "
                    "image: the embedded image model (VQ, classifier, transformer; only --out, "
                    "--seed, --tiny, --fresh, --no-progress apply); speech: the embedded speech "
                    "model (flite data, codec, transformer, heads, EAGLE; the same options apply)")
    add_model_options(tr)
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
    tr.add_argument("--eagle-style", choices=["genrefine", "engine"], default="genrefine",
                    help="eagle: genrefine (normed inputs and output; the shipped drafter) or "
                    "engine (the EAGLE-1 layer vLLM and SGLang run, so `genrefine export "
                    "--format eagle` can write it)")
    tr.add_argument("--checkpoint-every", type=int, default=200)
    tr.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.add_argument("--tiny", action="store_true",
                    help="image, speech: tiny sizes, a valid bundle in seconds (tests)")


def cmd_train(args) -> int:
    if args.kind == "image":
        return cmd_train_image(args)
    if args.kind == "speech":
        return cmd_train_speech(args)
    if args.tiny:
        raise GenrefineError("--tiny applies to `genrefine train image|speech` only")
    if args.eagle_style != "genrefine" and args.kind != "eagle":
        raise GenrefineError("--eagle-style applies to `genrefine train eagle` only")
    from ..api import load
    from ..train.corpus import default_corpus, read_corpus
    from ..train.loop import TrainConfig
    from ..train.run import DrafterSpec, run_training

    lr = args.lr if args.lr is not None else {"eagle": 3e-3, "heads": 1e-3, "draft": 3e-4}[args.kind]
    cfg = TrainConfig(steps=args.steps, lr=lr, batch=args.batch, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, warmup=min(50, args.steps // 10 + 1))
    spec = DrafterSpec(kind=args.kind, num_heads=args.heads, topk=args.topk, layers=args.layers,
                       draft_vocab=args.draft_vocab, seq_len=args.seq_len, max_tokens=args.max_tokens,
                       eagle_style=args.eagle_style)
    texts = read_corpus(args.corpus) if args.corpus is not None else None
    validate_before_load(args, [])
    if args.self_generated < 0:
        raise GenrefineError(f"--self-generated must be >= 0, got {args.self_generated}")
    if args.backend not in ("native", None):
        raise GenrefineError("training runs on the native runtime: drop --backend")
    gen = load(args.model, dtype=args.dtype, device=args.device)
    if texts is None:
        texts = default_corpus(gen.tokenizer)
    if args.self_generated:
        from ..train.selfgen import self_generated_texts

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


def cmd_train_image(args) -> int:
    """``genrefine train image --out DIR [--tiny] [--seed S]``."""
    from ..train.image import train_image

    res = train_image(args.out, tiny=args.tiny, resume=not args.fresh, seed=args.seed,
                      progress=not args.no_progress)
    tr = res.meta["training"]
    print(f"genrefine: saved the image model in {res.out} in {res.seconds:.0f} s; classifier accuracy "
          f"{res.meta['classifier']['heldout_accuracy']:.3f} on held-out images, "
          f"{tr['sample_accuracy_at_defaults']:.3f} on samples at the defaults {res.meta['defaults']}",
          file=sys.stderr)
    return 0


def cmd_train_speech(args) -> int:
    """``genrefine train speech --out DIR [--tiny] [--seed S]``."""
    from ..train.speech import train_speech

    res = train_speech(args.out, tiny=args.tiny, resume=not args.fresh, seed=args.seed,
                       progress=not args.no_progress)
    tr = res.meta["training"]
    heads = tr.get("drafters", {}).get("heads", {})
    print(f"genrefine: saved the speech model in {res.out} in {res.seconds:.0f} s; held-out code NLL "
          f"{tr['transformer']['heldout_code_nll']} nats; Medusa heads "
          f"{heads.get('greedy_tokens_per_step')} greedy tokens/step", file=sys.stderr)
    return 0
