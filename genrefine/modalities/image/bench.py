"""`genrefine image bench`: speed and quality of image methods on one image model, one run.

Every method generates the same images (same classes, same seeds) in turns, class by class, so
a slower or busier stretch of the machine hits all methods alike. ``ar`` runs twice, the second
time with other seeds: the difference between the two is the noise a reader sets the other
methods' quality against. Speed is the engine's wall clock (VQ decoding, the same for every
method, excluded); ``speedup`` is against ``ar`` in the same run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from ...methods.base import MethodOptions

NOISE_SEED_OFFSET = 1_000_003  # the second ar run's seeds
AR2 = "ar (other seeds)"


def run_image_bench(
    gen,
    methods: Sequence[str],
    n_per_class: int,
    seed: int = 0,
    temperature: float | None = None,
    top_k: int | None = None,
    cfg: float | None = None,
    options: MethodOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run the bench; the report dict (see the module docstring and :func:`markdown_report`)."""
    from ...diskcache import cpu_model
    from ...registry import is_lossless

    methods = list(dict.fromkeys(["ar", *methods]))
    runs = methods + [AR2]
    n_classes = len(gen.class_names)
    images: dict[str, list[np.ndarray]] = {m: [] for m in runs}
    classes: dict[str, list[int]] = {m: [] for m in runs}
    summaries: dict[str, list[dict]] = {m: [] for m in runs}
    codes: dict[str, list[list[int]]] = {m: [] for m in runs}
    t_start = time.time()
    for c in range(n_classes):
        for k, m in enumerate(runs):
            name = "ar" if m == AR2 else m
            base = seed + c * n_per_class + (NOISE_SEED_OFFSET if m == AR2 else 0)
            res = gen.generate(
                [c] * n_per_class, method=name, temperature=temperature, top_k=top_k, cfg=cfg,
                seed=base, options=options,
            )
            images[m].append(res.images)
            classes[m] += res.classes
            codes[m] += res.codes
            summaries[m].append(res.summary())
            if progress is not None:
                progress(n_per_class)
    out_methods = {}
    for m in runs:
        imgs = np.concatenate(images[m])
        q = gen.quality(imgs, classes[m])
        s = summaries[m]
        n = sum(x["images"] for x in s)
        gsec = sum(x["generation_seconds"] for x in s)
        steps = sum(x["steps_per_image"] * x["images"] for x in s)
        drafted_rates = [x["acceptance_rate"] for x in s if x["acceptance_rate"] is not None]
        tps_num = sum(x["tokens_per_step"] * (x["steps_per_image"] - 1) * x["images"] for x in s)
        tps_den = sum((x["steps_per_image"] - 1) * x["images"] for x in s)
        name = "ar" if m == AR2 else m
        out_methods[m] = {
            "images_per_s": n / gsec if gsec > 0 else 0.0,
            "steps_per_image": steps / n,
            "tokens_per_step": tps_num / tps_den if tps_den else 1.0,
            "acceptance_rate": float(np.mean(drafted_rates)) if drafted_rates else None,
            "lossless": is_lossless(name, options),
            "classifier_accuracy": q["classifier_accuracy"],
            "frechet_distance": q["frechet_distance"],
            "seconds": gsec,
        }
    ar = out_methods["ar"]
    for m, r in out_methods.items():
        r["speedup"] = r["images_per_s"] / ar["images_per_s"] if ar["images_per_s"] else None
        r["forward_reduction"] = ar["steps_per_image"] / r["steps_per_image"]
    if temperature == 0 or (temperature is None and gen.default_temperature == 0):
        for m in methods:
            out_methods[m]["same_codes_as_ar"] = sum(
                a == b for a, b in zip(codes[m], codes["ar"])
            )
    ar2 = out_methods[AR2]
    noise = {
        "classifier_accuracy": abs(ar["classifier_accuracy"] - ar2["classifier_accuracy"]),
        "frechet_distance": abs(ar["frechet_distance"] - ar2["frechet_distance"]),
        "speed_ratio": ar2["images_per_s"] / ar["images_per_s"] if ar["images_per_s"] else None,
    }
    samples = {m: np.stack([images[m][c][0] for c in range(n_classes)]).tolist() for m in runs}
    return {
        "kind": "image",
        "model": gen.name,
        "weights": gen.model.weights_format,
        "cpu": cpu_model(),
        "n_per_class": n_per_class,
        "n_classes": n_classes,
        "tokens_per_image": gen.tokens_per_image,
        "temperature": gen.default_temperature if temperature is None else temperature,
        "top_k": gen.default_top_k if top_k is None else top_k,
        "cfg": gen.default_cfg if cfg is None else cfg,
        "seed": seed,
        "wall_seconds": time.time() - t_start,
        "methods": out_methods,
        "noise": noise,
        "samples": samples,  # one image per class per method (uint8 lists), for the plot
    }


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown_report(report: dict, command: str | None = None) -> str:
    """The bench as a Markdown page: speed and quality per method, the ar-vs-ar noise."""
    noise = report["noise"]
    lines = [
        "# genrefine image bench",
        "",
        f"{report['model']}, {report['n_classes']} classes x {report['n_per_class']} images, "
        f"{report['tokens_per_image']} codes per image, temperature {report['temperature']}, "
        f"top-k {report['top_k']}, guidance scale {report['cfg']}, weights "
        f"{report.get('weights', 'float32')}; CPU: {report['cpu']}. "
        "Speed is the engine's wall clock (VQ decoding excluded); speedup is against `ar` in the "
        "same run.",
        "",
        "| method | lossless | images/s | speedup | forwards/image | fewer forwards | tokens/step "
        "| acceptance | classifier acc. | Frechet dist. |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in report["methods"].items():
        lines.append(
            f"| {m} | {'yes' if r['lossless'] else 'no'} | {r['images_per_s']:.2f} | "
            f"{_f(r['speedup'], '.2f')}x | {r['steps_per_image']:.1f} | "
            f"{r['forward_reduction']:.2f}x | {r['tokens_per_step']:.2f} | "
            f"{_f(r['acceptance_rate'], '.3f')} | {100 * r['classifier_accuracy']:.1f}% | "
            f"{r['frechet_distance']:.2f} |"
        )
    lines += [
        "",
        f"Noise between two `ar` runs with different seeds: classifier accuracy "
        f"{100 * noise['classifier_accuracy']:.1f} points, Frechet distance "
        f"{noise['frechet_distance']:.2f}, speed ratio {_f(noise['speed_ratio'], '.2f')}.",
        "",
    ]
    same = {m: r["same_codes_as_ar"] for m, r in report["methods"].items() if "same_codes_as_ar" in r}
    if same:
        n = report["n_classes"] * report["n_per_class"]
        lines += ["Greedy: images whose codes equal `ar`'s: "
                  + ", ".join(f"{m} {k}/{n}" for m, k in same.items() if m != "ar") + ".", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    return "\n".join(lines)


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """A figure: one sample per class for each method, beside speed and quality bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    fig = plt.figure(figsize=(14, 1.0 + 0.9 * len(names)))
    grid = fig.add_gridspec(len(names), 4, width_ratios=[3.2, 1, 1, 1])
    for i, m in enumerate(names):
        ax = fig.add_subplot(grid[i, 0])
        row = np.concatenate([np.asarray(x, dtype=np.uint8) for x in report["samples"][m]], axis=1)
        ax.imshow(row, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(m, rotation=0, ha="right", va="center", fontsize=8)
    bars = [
        ("speedup (x ar)", [report["methods"][m]["speedup"] or 0 for m in names]),
        ("classifier accuracy", [report["methods"][m]["classifier_accuracy"] for m in names]),
        ("Frechet distance", [report["methods"][m]["frechet_distance"] for m in names]),
    ]
    for j, (title, vals) in enumerate(bars):
        ax = fig.add_subplot(grid[:, j + 1])
        ax.barh(range(len(names)), vals, color="#4878a8")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if j == 0 else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{report['model']} on {report['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
