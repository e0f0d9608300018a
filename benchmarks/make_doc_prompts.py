"""Write a question file (Spec-Bench's JSONL format) of code and documentation tasks built from
the docstrings of libraries installed with genrefine (numpy, tqdm, safetensors, gguf, torch):
prompts of our own that no drafter or rule was tuned on, for checking bench figures beside
Spec-Bench.

    python benchmarks/make_doc_prompts.py out/doc_prompts.jsonl [--n 26]

Deterministic: the same installed versions give the same file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json

SOURCES = [
    ("numpy", ["argsort", "concatenate", "linspace", "where", "unique", "cumsum", "clip", "histogram",
               "pad", "einsum"]),
    ("tqdm", ["tqdm", "trange"]),
    ("gguf", ["GGUFReader", "GGUFWriter"]),
    ("safetensors.torch", ["save_file", "load_file"]),
    ("torch", ["topk", "gather", "scatter", "multinomial", "cat", "where", "argmax", "softmax"]),
]
TASKS = [
    ("doc-summary", "Here is the documentation of `{name}`:\n\n{doc}\n\nSummarize in three sentences "
     "what it does, reusing the documentation's wording where it fits."),
    ("doc-example", "Here is the documentation of `{name}`:\n\n{doc}\n\nWrite a short Python example "
     "that uses it, with comments."),
    ("doc-rewrite", "Here is the documentation of `{name}`:\n\n{doc}\n\nRewrite the first paragraph "
     "as a bulleted list of its facts."),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=26)
    ap.add_argument("--max-chars", type=int, default=900)
    args = ap.parse_args()
    docs = []
    for module, names in SOURCES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in names:
            obj = getattr(mod, name, None)
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) > 200:
                docs.append((f"{module}.{name}", doc[: args.max_chars].rsplit("\n", 1)[0]))
    lines = []
    for i in range(min(args.n, len(docs) * len(TASKS))):
        name, doc = docs[i % len(docs)]
        cat, template = TASKS[(i // len(docs)) % len(TASKS)]
        lines.append({"question_id": f"doc-{i}", "category": cat,
                      "turns": [template.format(name=name, doc=doc)]})
    with open(args.out, "w") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    print(f"{len(lines)} prompts from {len(docs)} docstrings -> {args.out}")


if __name__ == "__main__":
    main()
