"""The target's own answers as training text (self-distillation data).

Drafters are asked, at run time, to predict what the target will say next in its replies. Text
the target wrote itself, in the chat format it answers in, is the closest training material to
that: the prompts here are built from the default corpus (never from benchmark questions), one of
a few fixed instructions applied to a standard library object's name or docstring, and the target
answers each greedily. Many answers are decoded together, one batched forward per step
(:func:`genrefine.models.batched.forward_batch`), so a few hundred answers take minutes on a CPU.
The transcripts (prompt and answer, with the template's markers) are cached on disk.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..diskcache import cache_root
from ..errors import ConfigError
from ..models.protocol import weights_key
from .corpus import _stdlib_docstrings

INSTRUCTIONS = (
    "Explain what `{name}` does in Python, with a short example.",
    "Summarize the following documentation in a few sentences.\n\n{doc}",
    "Rewrite this documentation as a friendly tutorial paragraph.\n\n{doc}",
    "Write three questions a student might ask about `{name}`, and answer them.",
)
_DOC_CHARS = 1200  # docstrings longer than this are cut in prompts


def prompts(tokenizer, n: int, max_tokens: int | None = None) -> list[list[int]]:
    """``n`` chat prompts (token ids) in a fixed order: instruction ``i % 4`` on docstring ``i``
    of a fixed stride through the standard library's docstrings. Prompts over ``max_tokens``
    tokens are skipped (the next docstring is tried)."""
    docs = _stdlib_docstrings()
    if not docs:
        raise ConfigError("no standard library docstrings found to build prompts from")
    stride = max(1, len(docs) // max(n, 1))
    out: list[list[int]] = []
    for i in range(len(docs)):
        if len(out) == n:
            break
        name, doc = docs[(i * stride + i // len(docs)) % len(docs)]
        text = INSTRUCTIONS[i % len(INSTRUCTIONS)].format(name=name, doc=doc[:_DOC_CHARS])
        ids = chat_ids(tokenizer, text)
        if max_tokens is None or len(ids) <= max_tokens:
            out.append(ids)
    return out


def chat_ids(tokenizer, text: str) -> list[int]:
    """One user turn as the generator's chat prompts are built (``Generator.chat_prompt``): the
    chat template when the tokenizer has one, else the text and a blank line."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True,
            return_dict=False,
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(text + "\n\n")["input_ids"]]


@torch.inference_mode()
def generate_batched(model, prompt_ids: list[list[int]], max_new: int, eos: set[int],
                     batch: int = 16, progress: bool = True) -> list[list[int]]:
    """Greedy answers to many prompts, ``batch`` sequences per forward. Returns the new ids of
    each (EOS left out)."""
    from tqdm.auto import tqdm

    from ..models.batched import BatchItem, forward_batch

    answers: list[list[int]] = [[] for _ in prompt_ids]
    bar = tqdm(total=len(prompt_ids), desc="self-generating", unit="answer", disable=not progress,
               dynamic_ncols=True)
    for s in range(0, len(prompt_ids), batch):
        group = list(range(s, min(s + batch, len(prompt_ids))))
        caches, last = {}, {}
        for i in group:
            p = torch.tensor(prompt_ids[i])
            caches[i] = model.new_cache(len(p) + max_new + 1)
            logits = model.forward(p, caches[i], logits_rows=torch.tensor([len(p) - 1])).logits
            last[i] = int(logits[-1].argmax())
        live = [i for i in group if last[i] not in eos]
        for i in group:
            if last[i] not in eos:
                answers[i].append(last[i])
        while live:
            live = [i for i in live if len(answers[i]) < max_new]
            if not live:
                break
            items = [BatchItem(torch.tensor([last[i]]), caches[i]) for i in live]
            rows = forward_batch(model, items, "always")
            nxt = []
            for i, r in zip(live, rows):
                t = int(r[-1].argmax())
                last[i] = t
                if t in eos:
                    continue
                answers[i].append(t)
                nxt.append(i)
            live = nxt
        bar.update(len(group))
    bar.close()
    return answers


def self_generated_texts(model, tokenizer, eos: set[int], n: int, max_new: int = 192,
                         progress: bool = True) -> list[str]:
    """``n`` transcripts (prompt + the target's greedy answer, decoded), cached on disk."""
    key = hashlib.sha256(
        json.dumps([getattr(model, "name", "model"), weights_key(model), n, max_new,
                    INSTRUCTIONS]).encode()
    ).hexdigest()[:16]
    path = cache_root() / "train" / f"selfgen-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    ps = prompts(tokenizer, n, model.max_context - max_new - 1)
    answers = generate_batched(model, ps, max_new, eos, progress=progress)
    texts = [tokenizer.decode(p + a) for p, a in zip(ps, answers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts
