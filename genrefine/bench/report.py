"""The report dict as Markdown and as a figure (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .metrics import EXACTNESS_OFF


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _lossless(m: dict) -> str:
    v = m.get("lossless")
    if v is False and m.get("same_as_reference") is not None:
        same, n = m["same_as_reference"]
        return f"**NO** ({same}/{n} same)"
    return {True: "yes", False: "**NO**", None: "n/a"}[v]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "r") -> list[str]:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join([":---"] + [("---:" if align == "r" else ":---")] * (len(header) - 1)) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _load_text(report: dict) -> str:
    during = report.get("load_average_during")
    if during:
        return f", 1-minute load average {during[0]:.1f} to {during[1]:.1f} while measuring"
    mach = report.get("machine", {})
    text = f", load average {mach['loadavg'][0]} at start" if mach.get("loadavg") else ""
    if mach.get("loadavg_end"):
        text += f", {mach['loadavg_end'][0]} at end"
    return text


def markdown_report(report: dict) -> str:
    """A Markdown page: overall table, speedup and tokens/step by category, setup, command."""
    methods = report["methods"]
    cats = report.get("categories") or list(
        dict.fromkeys(c for m in methods.values() for c in m.get("per_category", {}))
    )
    greedy = report.get("temperature", 0.0) == 0.0
    lines = [
        "# genrefine bench",
        "",
        f"{report.get('n_questions', 0)} questions, {len(cats)} categories, "
        f"up to {report['max_new_tokens']} new tokens per turn, "
        + ("greedy" if greedy else f"sampling at temperature {report.get('temperature')}")
        + f", {report.get('repeats', 1)} run(s) each; baseline `ar`.",
        "",
    ]
    if report.get("bitwise_exact") is False:
        lines += [f"Note: {EXACTNESS_OFF}.", ""]
    lines += [
        "## Overall",
        "",
    ]
    rows = []
    for name, m in methods.items():
        rows.append([
            f"`{name}`",
            _fmt(m.get("tokens_per_s"), ".1f"),
            _fmt(m.get("speedup"), ".2f", "x"),
            _fmt(m.get("tokens_per_step"), ".2f"),
            _fmt(m.get("acceptance_rate"), ".2f"),
            _lossless(m),
            str(m.get("n_questions", 0)),
        ])
    lines += _table(
        ["method", "tokens/s", "speedup", "tokens/step", "acceptance", "lossless", "questions"], rows
    )
    for title, key, spec, suffix in (
        ("Speedup over `ar` by category", "speedup", ".2f", "x"),
        ("Tokens per step by category", "tokens_per_step", ".2f", ""),
    ):
        lines += ["", f"## {title}", ""]
        rows = []
        for name, m in methods.items():
            pc = m.get("per_category", {})
            rows.append(
                [f"`{name}`"]
                + [_fmt(pc.get(c, {}).get(key), spec, suffix) for c in cats]
                + [_fmt(m.get(key), spec, suffix)]
            )
        lines += _table(["method", *cats, "overall"], rows)
    phased = {n: m["phases"] for n, m in methods.items() if m.get("phases")}
    if phased:
        names = ["weights", "attention", "drafting", "other"]
        lines += ["", "## Where the time goes (share of each method's seconds)", ""]
        lines += _table(
            ["method", *names],
            [[f"`{n}`"] + [_fmt(p["share"].get(k), ".0%") for k in names] for n, p in phased.items()],
        )
    mach = report.get("machine", {})
    lines += [
        "",
        "## Setup",
        "",
        f"- model: {report['model']}",
        *([f"- draft model (sps, hf_assisted): {report['draft_model']}"]
          if report.get("draft_model") else []),
        (f"- backend: llama.cpp (the GGUF's own quantized weights), device: {report['device']}"
         if report.get("backend") == "llama.cpp"
         else f"- weights: {report.get('weights') or report['dtype']}, device: {report['device']}"),
        *([f"- transformers baselines: {report['hf_dtype']}"] if report.get("hf_dtype") else []),
        f"- machine: {mach.get('cpu', '?')}, {mach.get('cpu_count', '?')} CPUs, "
        f"{mach.get('torch_threads', '?')} torch threads" + _load_text(report),
        f"- software: torch {mach.get('torch', '?')}, transformers {mach.get('transformers', '?')}",
        f"- command: `{report.get('command', '')}`",
        f"- time: {report.get('timestamp', '')}",
        "",
        "speedup: mean over questions of (method tokens/s ÷ `ar` tokens/s on that question); "
        "tokens/s: all new tokens ÷ all seconds, prefill included; tokens/step: tokens emitted "
        "per target forward after the first, bonus included; lossless: greedy tokens equal the "
        "reference's (`ar`; `hf_generate` for `hf_prompt_lookup` and `hf_assisted`), n/a where it "
        "does not apply.",
        "",
    ]
    return "\n".join(lines)


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Two panels: speedup by category per method (grouped bars), accepted-length histograms."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    methods = report["methods"]
    names = [m for m in methods if m != "ar"] or list(methods)
    cats = list(report.get("categories") or []) + ["overall"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cats) + 4), 9))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(cats))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        m = methods[name]
        vals = [
            (m["speedup"] if c == "overall" else m.get("per_category", {}).get(c, {}).get("speedup"))
            for c in cats
        ]
        ys = [v if v is not None else 0.0 for v in vals]
        bars = ax1.bar(x + (i - (len(names) - 1) / 2) * width, ys, width, label=name,
                       color=colors[i % len(colors)])
        for b, v in zip(bars, vals):
            if v is not None:
                ax1.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                             ha="center", va="bottom", fontsize=7)
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_xticks(x, cats, rotation=20 if len(cats) > 6 else 0)
    ax1.set_ylabel("speedup over ar (×)")
    ax1.set_title(
        f"{report['model']} · {report.get('weights') or report['dtype']} · {report['device']} · "
        f"{report['max_new_tokens']} new tokens · {report.get('n_questions', 0)} questions",
        fontsize=9,
    )
    ax1.legend(fontsize=8, ncol=min(len(names), 4))

    hists = {n: methods[n].get("accepted_hist") for n in names}
    hists = {n: h for n, h in hists.items() if h and sum(h) > 0 and len(h) > 1}
    if hists:
        kmax = max(len(h) for h in hists.values())
        w2 = 0.8 / len(hists)
        for i, (name, h) in enumerate(hists.items()):
            frac = np.array(h + [0] * (kmax - len(h)), dtype=float) / sum(h)
            ax2.bar(np.arange(kmax) + (i - (len(hists) - 1) / 2) * w2, frac, w2, label=name,
                    color=colors[names.index(name) % len(colors)])
        ax2.set_xticks(np.arange(kmax))
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no drafting method reported accepted lengths", ha="center",
                 va="center", transform=ax2.transAxes)
    ax2.set_xlabel("draft tokens accepted in a step")
    ax2.set_ylabel("fraction of steps")
    ax2.set_title("accepted-length histogram (summed over questions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
