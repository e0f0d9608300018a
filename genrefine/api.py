"""The Python API: ``genrefine.load()`` and the :class:`Generator` it returns.

    import genrefine
    gen = genrefine.load()                       # embedded Gemma 3 270M
    out = gen.generate("Once upon a time", max_new_tokens=64, method="pld")
    out.text, out.token_ids, out.stats.tokens_per_step, out.stats.tokens_per_s
    for piece in gen.stream("...", max_new_tokens=64):
        print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .engine import Engine, Stats
from .errors import ConfigError
from .methods.base import MethodOptions
from .registry import build_method
from .text import TextTracker
from .types import SamplingParams


@dataclass
class GenerationResult:
    """One finished generation."""

    text: str
    token_ids: list[int]  # new tokens only (EOS not included); after a stop string, those of `text`
    stats: Stats
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_ids: list[int]


class TextStream:
    """Iterates over text pieces as tokens are accepted; ``result`` is set once it is exhausted."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class Generator:
    """A loaded model and tokenizer, ready to generate with any method."""

    def __init__(self, model, tokenizer, name: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model, "name", "model")
        eos = set()
        for attr in ("eos_token_id",):
            v = getattr(tokenizer, attr, None)
            if v is not None:
                eos.add(int(v))
        # chat-tuned Gemma ends turns with <end_of_turn>; stop there too when it exists
        for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(tok) if hasattr(tokenizer, "convert_tokens_to_ids") else None
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid >= 0:
                eos.add(tid)
        self.eos_ids = frozenset(eos)
        # built methods, reused across calls: drafters that learn (suffix decoding, auto's
        # acceptance estimates) keep what they learned, and datastores load once
        self._methods: dict = {}

    def method(self, name: str, options: MethodOptions | None = None):
        """The built :class:`~genrefine.methods.Method` for ``name`` (built once per options)."""
        key = (name, options or MethodOptions())
        if key not in self._methods:
            self._methods[key] = build_method(name, self.model, options, tokenizer=self.tokenizer)
        return self._methods[key]

    # ------------------------------------------------------------------ text <-> tokens
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (with the tokenizer's BOS); a list of ids passes through."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ConfigError("the prompt is empty: give some text to continue")
            return list(self.tokenizer(prompt).input_ids)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token id")
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids for chat messages: the tokenizer's chat template, else plain concatenation."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if hasattr(ids, "keys"):  # a BatchEncoding (transformers 5 returns one by default)
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        text = "".join(f"{m['content']}\n\n" for m in messages)
        return self.encode(text)

    # ------------------------------------------------------------------ generation
    def _check(self, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")

    def stream_tokens(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        method: str = "ar",
        stop: Sequence[str] | str | None = None,
        options: MethodOptions | None = None,
    ) -> TextStream:
        """Like :meth:`stream`; also the lower level the CLI, bench and server use.

        ``method`` may also be a built :class:`~genrefine.methods.Method` (``genrefine batch``
        builds one per sampled line, so no drafter state carries over from other lines)."""
        self._check(max_new_tokens)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        m = self.method(method, options) if isinstance(method, str) else method
        prompt_ids = self.encode(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stats = Stats(m.name)
        engine = Engine(self.model, m)
        token_iter = engine.generate(prompt_ids, max_new_tokens, params, self.eos_ids, stats)
        stream = TextStream(iter(()))

        def pieces() -> Iterator[str]:
            text = TextTracker(self.tokenizer, stops)
            for chunk in token_iter:
                piece = text.add(chunk)
                if piece:
                    yield piece
                if text.stopped:
                    token_iter.close()
                    break
            piece = text.finish()
            if piece:
                yield piece
            stream.result = GenerationResult(
                text=text.text,
                token_ids=list(text.token_ids),
                stats=stats,
                finish_reason="stop" if text.stopped else engine.finish_reason or "length",
                prompt_ids=prompt_ids,
            )

        stream._pieces = pieces()
        return stream

    def stream(self, prompt: str | Sequence[int], **kwargs) -> TextStream:
        """Yield text as it is accepted. Arguments as for :meth:`generate`."""
        return self.stream_tokens(prompt, **kwargs)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        method: str = "ar",
        stop: Sequence[str] | str | None = None,
        options: MethodOptions | None = None,
    ) -> GenerationResult:
        """Generate a continuation of ``prompt`` (text, or token ids used as they are).

        temperature 0 is greedy; top_k 0 and top_p 1 are off. ``method`` names a preset from
        ``genrefine methods``; every lossless method returns what ``ar`` returns under greedy.
        ``stop``: the text ends just before the first stop string found (streamed text that
        could begin one is held back until it cannot, so no part of it is ever yielded).
        """
        s = self.stream_tokens(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, method, stop, options
        )
        for _ in s:
            pass
        assert s.result is not None
        return s.result


def load(
    model: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quiet: bool = False,
    backend: str | None = None,
) -> Generator:
    """Load a model (default: the embedded Gemma 3 270M) and return a :class:`Generator`.

    model: a local Hugging Face directory or a .gguf file. dtype: "auto" (bfloat16, measured
    fastest here), "float32", "bfloat16", "float16". device: "auto", "cpu", "cuda".
    backend: "native" (default), "hf", "llama.cpp" (GGUF files, the ``genrefine[llamacpp]``
    extra) or "auto" (the faster of native and llama.cpp here, measured once).
    """
    from .models.loading import load_model

    m, tok = load_model(model, dtype=dtype, device=device, quiet=quiet, backend=backend)
    return Generator(m, tok)
