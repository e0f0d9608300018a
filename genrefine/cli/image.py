"""``genrefine image generate|bench``: the image modality (the embedded glyph model by default)."""

from __future__ import annotations

import sys

from ..errors import GenrefineError
from .options import (
    check_method_names, modality_bench_command, modality_method_options, write_modality_bench,
)


def _common(p) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="an image bundle written by `genrefine train image` (default: the "
                   "embedded glyph model), or a transformers Janus checkpoint (generate only, "
                   "with --prompt)")
    p.add_argument("--dtype", default="float32",
                   help="float32 (default: the bundle as trained) or q8_0 (its weights rounded to "
                   "Q8_0 when loaded and run on the exact integer kernels: faster on the CPU, a "
                   "slightly different model)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the bundle's, 1.0; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes (default: the bundle's)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1 = none; default: the bundle's)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--draft-len", type=int, default=None, help="largest draft per step (method default)")
    p.add_argument("--relax-k", type=int, default=None,
                   help="lantern: latent neighbours per code (method default)")
    p.add_argument("--relax-delta", type=float, default=None,
                   help="lantern, gsd: total-variation budget per token (method default)")
    p.add_argument("--group-size", type=int, default=None,
                   help="gsd: the target's top tokens a drafted code may be grouped with (method default)")
    p.add_argument("--group-similarity", type=float, default=None,
                   help="gsd: the latent cosine similarity a group needs (method default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_image_parser(sub) -> None:
    img = sub.add_parser(
        "image",
        help="generate class-conditional images (sjd, mc-sjd, lantern, gsd and the lossless "
        "text methods) and measure them",
        description="Autoregressive image generation on the same engine as text: a class token, "
        "then a grid of VQ codes, decoded to pixels.",
    )
    isub = img.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    g = isub.add_parser("generate", help="generate images of one class into a PNG grid")
    g.add_argument("--class", dest="cls", default=None,
                   help="class index or name, for an image bundle (default 0)")
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help="what to draw, for a transformers image model (Janus)")
    g.add_argument("--n", type=int, default=16, help="images (default 16)")
    g.add_argument("--method", default="ar", help="a method of `genrefine methods` (default ar)")
    g.add_argument("--out", required=True, metavar="PNG", help="where to write the grid")
    _common(g)
    b = isub.add_parser("bench", help="speed and quality of image methods, one run")
    b.add_argument("--methods", default="ar,sjd,mc-sjd,lantern,gsd",
                   help="comma-separated methods (ar is always run, twice: the noise)")
    b.add_argument("--n-per-class", type=int, default=20, help="images per class per method (default 20)")
    b.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    b.add_argument("--report", default=None, metavar="PATH", help="write the report as Markdown")
    b.add_argument("--plot", default=None, metavar="PNG", help="write samples and bars as a figure")
    _common(b)


def _options(args):
    names = ("relax_k", "relax_delta", "group_size", "group_similarity")
    return modality_method_options(args, names, draft_len=args.draft_len)



def _progress(total: int, desc: str, off: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=off, file=sys.stderr)


def save_grid(images, path: str, cols: int | None = None) -> None:
    """Write uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB) images as one PNG grid (1-pixel gaps)."""
    import numpy as np
    from PIL import Image

    images = np.asarray(images, dtype=np.uint8)
    n, h, w = images.shape[:3]
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, *images.shape[3:]), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i]
    Image.fromarray(canvas).save(path)


def _generate_from_prompt(args, options, load_image) -> int:
    """``image generate`` on a transformers image model: text prompt in, PNG grid out."""
    if args.cls is not None:
        raise GenrefineError("--class is for image bundles; a transformers image model (Janus) "
                             "takes a text --prompt")
    if args.prompt is None or not args.prompt.strip():
        raise GenrefineError("say what to draw: a transformers image model (Janus) needs --prompt TEXT")
    gen = load_image(args.model, dtype=args.dtype)
    with _progress(args.n, args.method, args.no_progress) as bar:
        res = gen.generate([args.prompt] * args.n, method=args.method, temperature=args.temperature,
                           top_k=args.top_k, cfg=args.cfg, seed=args.seed, options=options,
                           progress=bar.update)
    save_grid(res.images, args.out)
    s = res.summary()
    rate = "–" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.2f}"
    print(f"{args.out}: {s['images']} images of {args.prompt!r} with {res.method}, "
          f"{s['images_per_s']:.2f} images/s, {s['steps_per_image']:.1f} target forwards per "
          f"image, {s['tokens_per_step']:.2f} tokens/step, acceptance {rate}")
    return 0


def cmd_image(args) -> int:
    from ..modalities.image.api import MAX_IMAGES, load_image
    from ..modalities.image.janus import is_janus_dir

    if args.image_command is None:
        raise GenrefineError("say what to do: `genrefine image generate` or `genrefine image bench`")
    options = _options(args)
    if args.image_command == "generate":
        check_method_names([args.method])
        if not 1 <= args.n <= MAX_IMAGES:
            raise GenrefineError(f"--n must be between 1 and {MAX_IMAGES}, got {args.n}")
        if not args.out.lower().endswith(".png"):
            raise GenrefineError(f"--out must name a .png file, got {args.out!r}")
        if is_janus_dir(args.model):
            return _generate_from_prompt(args, options, load_image)
        if args.prompt is not None:
            raise GenrefineError("--prompt is for transformers image models (Janus); an image "
                                 "bundle is class-conditional: use --class")
        gen = load_image(args.model, dtype=args.dtype)
        c = gen.class_index("0" if args.cls is None else args.cls)
        with _progress(args.n, args.method, args.no_progress) as bar:
            res = gen.generate([c] * args.n, method=args.method, temperature=args.temperature,
                               top_k=args.top_k, cfg=args.cfg, seed=args.seed, options=options,
                               progress=bar.update)
        save_grid(res.images, args.out)
        s = res.summary()
        acc = gen.quality(res.images, res.classes)["classifier_accuracy"]
        rate = "–" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.2f}"
        print(f"{args.out}: {s['images']} images of class {gen.class_names[c]} with {res.method}, "
              f"{s['images_per_s']:.2f} images/s, {s['steps_per_image']:.1f} target forwards per "
              f"image, {s['tokens_per_step']:.2f} tokens/step, acceptance {rate}, classifier "
              f"accuracy {100 * acc:.0f}%")
        return 0
    from ..modalities.image.bench import markdown_report, plot_report, run_image_bench
    if is_janus_dir(args.model):
        raise GenrefineError("image bench measures class-conditional bundles (it needs their "
                             "classifier); for a Janus model use `genrefine image generate --prompt`")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_method_names(methods)
    if args.n_per_class < 1:
        raise GenrefineError(f"--n-per-class must be >= 1, got {args.n_per_class}")
    gen = load_image(args.model, dtype=args.dtype)
    total = (len(set(["ar", *methods])) + 1) * args.n_per_class * len(gen.class_names)
    with _progress(total, "image bench", args.no_progress) as bar:
        report = run_image_bench(gen, methods, args.n_per_class, seed=args.seed,
                                 temperature=args.temperature, top_k=args.top_k, cfg=args.cfg,
                                 options=options, progress=bar.update)
    head = ["image", "bench", "--methods", ",".join(methods), "--n-per-class", str(args.n_per_class),
            "--seed", str(args.seed)]
    report["command"] = modality_bench_command(
        args, head, ("model", "temperature", "top_k", "cfg", "draft_len", "relax_k", "relax_delta",
                     "group_size", "group_similarity"))
    write_modality_bench(args, report, markdown_report(report, report["command"]), plot_report)
    return 0
