"""From per-question records to the report's numbers. Pure functions, no model.

A *record* is what the runner appends to the JSONL file for one question::

    {"question_id": 81, "category": "writing", "n_turns": 2,
     "methods": {"ar": {"new_tokens": 250, "time": 7.9, "steps": 249, "step_tokens": 249,
                        "drafted": 0, "accepted": 0, "accepted_hist": [249],
                        "same_as_ar": true, "same_as_hf_generate": null, "turns": [...]},
                 "pld": {...}}}

Per method, ``new_tokens`` and ``time`` are summed over the question's turns (and repeats);
``time`` includes the prefill, as Spec-Bench measures. ``steps`` counts target forwards after the
prefill and ``step_tokens`` the tokens those steps emitted (accepted + bonus, an EOS included),
so ``step_tokens / steps`` is the tokens per step with the bonus counted (1.0 for ``ar``).
``steps``, ``drafted``, ``accepted`` and ``accepted_hist`` are None where a method does not
report them. ``same_as_ar`` (``same_as_hf_generate``) says whether every turn's tokens equal
``ar``'s (``hf_generate``'s); None where that method did not run.

Definitions used in the report:

* ``tokens_per_s``: all new tokens / all seconds (of the questions in scope);
* ``speedup``: the mean over questions of (method tokens/s / ``ar`` tokens/s on that question);
* ``tokens_per_step``: all step tokens / all steps;
* ``acceptance_rate``: accepted draft tokens / drafted tokens (None when nothing was drafted);
* ``lossless``: under greedy decoding, whether every question's tokens equal the reference's
  (``ar`` for genrefine's lossless methods and ``hf_generate``; ``hf_generate`` for
  ``hf_prompt_lookup`` and ``hf_assisted``); None under sampling, for lossy methods, and without
  a reference. It is the measured token equality whether or not the model ran bitwise exact
  (``bitwise_exact``, recorded per question): without exactness a near-tie can flip a token, and
  a method that matched here is not guaranteed to match elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BASELINE = "ar"
EXACTNESS_OFF = (
    "the model did not run bitwise exact (float32, this CPU or the transformers adapter): "
    "lossless is the measured token equality with the reference, not a guarantee"
)


def reference_of(method: str, methods: Sequence[str]) -> str | None:
    """The method whose greedy tokens ``method`` must reproduce, or None if it claims nothing."""
    from ..registry import METHODS, is_lossless

    if method == "hf_generate":
        return BASELINE
    if method in ("hf_prompt_lookup", "hf_assisted"):
        return "hf_generate" if "hf_generate" in methods else None
    if method in METHODS and is_lossless(method):
        return BASELINE
    return None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _sum_hist(hists: Iterable[list[int] | None]) -> list[int] | None:
    out: list[int] | None = None
    for h in hists:
        if h is None:
            continue
        if out is None:
            out = []
        while len(out) < len(h):
            out.append(0)
        for i, v in enumerate(h):
            out[i] += int(v)
    return out


def _sum_opt(values: Iterable[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


def per_question_speedups(records: Sequence[dict], method: str) -> list[float]:
    """(method tokens/s) / (ar tokens/s) for each record where both are measurable."""
    out = []
    for r in records:
        m, b = r["methods"].get(method), r["methods"].get(BASELINE)
        if m is None or b is None:
            continue
        tm, tb = _ratio(m["new_tokens"], m["time"]), _ratio(b["new_tokens"], b["time"])
        if tm and tb:
            out.append(tm / tb)
    return out


def summarize(records: Sequence[dict], method: str) -> dict:
    """tokens_per_s, speedup, tokens_per_step (and the sums behind them) of one method."""
    rows = [r["methods"][method] for r in records if method in r["methods"]]
    tokens = sum(x["new_tokens"] for x in rows)
    seconds = sum(x["time"] for x in rows)
    speedups = per_question_speedups(records, method)
    steps = _sum_opt(x.get("steps") for x in rows)
    step_tokens = _sum_opt(x.get("step_tokens") for x in rows)
    return {
        "tokens_per_s": _ratio(tokens, seconds) or 0.0,
        "speedup": sum(speedups) / len(speedups) if speedups else None,
        "tokens_per_step": _ratio(step_tokens or 0, steps) if steps else None,
        "n_questions": len(rows),
        "new_tokens": tokens,
        "time": seconds,
    }


def lossless_flag(records: Sequence[dict], method: str, methods: Sequence[str], greedy: bool):
    """True/False under greedy decoding for a method with a reference (see the module doc)."""
    if not greedy:
        return None
    if method == BASELINE:
        return True
    ref = reference_of(method, methods)
    if ref is None:
        return None
    flags = [r["methods"][method].get(f"same_as_{ref}") for r in records if method in r["methods"]]
    flags = [f for f in flags if f is not None]
    return all(flags) if flags else None


def same_as_reference(records: Sequence[dict], method: str, methods: Sequence[str]):
    """[questions whose tokens equal the reference's, questions compared], or None."""
    ref = BASELINE if method == BASELINE else reference_of(method, methods)
    if ref is None:
        return None
    flags = [r["methods"][method].get(f"same_as_{ref}") for r in records if method in r["methods"]]
    flags = [f for f in flags if f is not None]
    return [sum(flags), len(flags)] if flags else None


def _sum_phases(parts) -> dict | None:
    """Seconds per phase (weights, attention, drafting, other) summed over questions, with each
    phase's share of their total; None where no question measured them."""
    total: dict[str, float] = {}
    seen = False
    for p in parts:
        if p:
            seen = True
            for k, v in p.items():
                total[k] = total.get(k, 0.0) + v
    if not seen:
        return None
    whole = sum(total.values()) or 1.0
    return {"seconds": total, "share": {k: v / whole for k, v in total.items()}}


def aggregate(
    records: Sequence[dict], methods: Sequence[str], greedy: bool = True
) -> dict[str, dict]:
    """The report's ``methods`` section: per method overall figures plus ``per_category``."""
    cats = list(dict.fromkeys(r["category"] for r in records))
    out: dict[str, dict] = {}
    for m in methods:
        rows = [r["methods"][m] for r in records if m in r["methods"]]
        s = summarize(records, m)
        drafted = _sum_opt(x.get("drafted") for x in rows)
        accepted = _sum_opt(x.get("accepted") for x in rows)
        same_ar = [x.get("same_as_ar") for x in rows if x.get("same_as_ar") is not None]
        per_cat = {}
        for c in cats:
            rc = [r for r in records if r["category"] == c]
            sc = summarize(rc, m)
            if sc["n_questions"]:
                per_cat[c] = {
                    "tokens_per_s": sc["tokens_per_s"],
                    "speedup": sc["speedup"],
                    "tokens_per_step": sc["tokens_per_step"],
                    "n_questions": sc["n_questions"],
                }
        out[m] = {
            "tokens_per_s": s["tokens_per_s"],
            "speedup": s["speedup"],
            "tokens_per_step": s["tokens_per_step"],
            "acceptance_rate": _ratio(accepted or 0, drafted) if drafted else None,
            "lossless": lossless_flag(records, m, methods, greedy),
            "n_questions": s["n_questions"],
            "same_as_ar_fraction": sum(same_ar) / len(same_ar) if same_ar else None,
            "same_as_reference": same_as_reference(records, m, methods) if greedy else None,
            "new_tokens": s["new_tokens"],
            "time_s": s["time"],
            "accepted_hist": _sum_hist(x.get("accepted_hist") for x in rows),
            "phases": _sum_phases(x.get("phases") for x in rows),
            "per_category": per_cat,
        }
    return out


def build_report(
    records: Sequence[dict],
    methods: Sequence[str],
    *,
    model: str,
    dtype: str,
    device: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    repeats: int = 1,
    machine: dict | None = None,
    command: str = "",
    timestamp: str = "",
    extra: dict | None = None,
) -> dict:
    """The whole JSON report for the given records (see the module doc for the definitions)."""
    greedy = temperature == 0.0
    report = {
        "model": model,
        "dtype": dtype,
        "device": device,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "repeats": repeats,
        "baseline": BASELINE,
        "n_questions": len(records),
        "categories": list(dict.fromkeys(r["category"] for r in records)),
        "methods": aggregate(records, methods, greedy),
        "machine": machine or {},
        "command": command,
        "timestamp": timestamp,
        "definitions": {
            "tokens_per_s": "all new tokens / all seconds, prefill included",
            "speedup": "mean over questions of method tokens/s / ar tokens/s on that question",
            "tokens_per_step": "tokens emitted per target forward after the first (the prefill), "
            "bonus included",
            "acceptance_rate": "accepted draft tokens / drafted tokens",
            "lossless": "greedy: every question's tokens equal the reference's (ar; "
            "hf_generate for hf_prompt_lookup and hf_assisted); null where it does not apply",
        },
    }
    flags = [r.get("bitwise_exact") for r in records]
    # False when any question ran without exactness; None when not recorded (or no questions)
    report["bitwise_exact"] = (
        False if False in flags else (True if flags and all(f is True for f in flags) else None)
    )
    loads = [r["loadavg"] for r in records if r.get("loadavg") is not None]
    if loads:
        report["load_average_during"] = [min(loads), max(loads)]
    if extra:
        report.update(extra)
    return report
