"""The speech API: ``genrefine.load_speech()`` and the :class:`SpeechGenerator` it returns.

    import genrefine
    tts = genrefine.load_speech()                       # the embedded flite-trained model
    out = tts.generate("hello there", method="pcg", seed=0)
    out.audio, out.sample_rate                          # float32 [T], 16000
    out.summary()["steps_per_second_of_audio"]

An utterance is a prompt (voice, rate, the text's characters, start) followed by codec codes, one
per 16 ms frame, until the end token; the bundle's codec turns the codes into audio. Generation
runs on the same engine as text: the transformer is wrapped in
:class:`~genrefine.models.guided.GuidedModel` (no guidance; it cuts the logits to the codes and the
end token and carries the code embeddings PCG groups by), so every method of ``genrefine
methods`` that fits a plain model runs here, with the same lossless guarantees.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...engine import Engine, Stats
from ...errors import ConfigError
from ...methods.base import MethodOptions
from ...registry import METHODS, build_method
from ...types import SamplingParams
from .data import normalize_text

MAX_UTTERANCES = 256  # more in one call is a mistake (the server and the CLI share this limit)
MAX_CHARS = 200  # characters of one text, after normalization
FRAMES_PER_CHAR = 9  # the frame budget of a text: generous for the slowest rate
MIN_FRAMES = 64


@dataclass
class SpeechResult:
    """Utterances generated in one call, with what each generation did."""

    audios: list[np.ndarray]  # float32 [T] each, at sample_rate
    sample_rate: int
    texts: list[str]  # normalized texts, one per utterance
    codes: list[list[int]]  # codec codes of each utterance (the end token removed)
    stats: list[Stats]
    seconds: float  # wall clock of the whole call, decoding to audio included
    method: str = ""
    finished: list[bool] = field(default_factory=list)  # whether each ended with the end token
    frames_per_second: float = 62.5

    @property
    def audio(self) -> np.ndarray:
        """The first utterance's samples (the one, for a single text)."""
        return self.audios[0]

    def summary(self) -> dict:
        """Aggregates: target forwards per second of audio, tokens per step, acceptance, speed."""
        n = len(self.stats)
        steps = sum(s.steps + 1 for s in self.stats)  # the prefill is a target forward too
        decode_steps = sum(s.steps for s in self.stats)
        # the end token is the model's output too (the engine stops on it without emitting it)
        decode_tokens = sum(s.decode_tokens for s in self.stats) + sum(1 for f in self.finished if f)
        drafted = sum(s.drafted for s in self.stats)
        accepted = sum(s.accepted for s in self.stats)
        audio_s = sum(len(c) for c in self.codes) / self.frames_per_second
        gen_s = sum(s.time_total for s in self.stats)
        return {
            "method": self.method,
            "utterances": n,
            "audio_seconds": audio_s,
            "seconds": self.seconds,
            "generation_seconds": gen_s,
            "real_time_factor": audio_s / self.seconds if self.seconds > 0 else 0.0,
            "steps_per_second_of_audio": steps / audio_s if audio_s > 0 else 0.0,
            "tokens_per_step": decode_tokens / decode_steps if decode_steps else 1.0,
            "acceptance_rate": accepted / drafted if drafted else None,
            "drafted": drafted,
            "accepted": accepted,
            "steps": decode_steps,
            "decode_tokens": decode_tokens,
            "unfinished": sum(1 for f in self.finished if not f),
        }


class SpeechGenerator:
    """A loaded speech bundle (codec and transformer), ready to generate."""

    def __init__(self, bundle, model, name: str | None = None) -> None:
        self.bundle = bundle
        self.model = model  # a GuidedModel (scale 1) over the native transformer
        self.layout = bundle.layout()
        self.name = name or f"speech:{bundle.path.name}"
        d = bundle.meta.get("defaults", {})
        self.default_temperature = float(d.get("temperature", 1.0))
        self.default_top_k = int(d.get("top_k", 0))
        self._methods: dict = {}

    @property
    def sample_rate(self) -> int:
        return self.bundle.sample_rate

    @property
    def voices(self) -> list[str]:
        return self.bundle.voices

    def method(self, name: str, options: MethodOptions | None = None):
        """The built method for ``name`` (built once per options, reused across calls)."""
        opts = options or MethodOptions()
        kind = getattr(METHODS.get(name), "drafter_kind", None)
        if opts.drafter is None and kind and (self.bundle.path / kind / "drafter.safetensors").is_file():
            opts = dataclasses.replace(opts, drafter=str(self.bundle.path / kind))  # the bundle's own
        spec = METHODS.get(name)
        if (opts.draft_model is None
                and (getattr(spec, "needs_draft_model", False) or getattr(spec, "uses_draft_model", False))
                and (self.bundle.path / "draft" / "config.json").is_file()):
            opts = dataclasses.replace(opts, draft_model=str(self.bundle.path / "draft"))
        key = (name, opts)
        if key not in self._methods:
            self._methods[key] = build_method(name, self.model, opts)
        return self._methods[key]

    def prompt(self, text: str, voice: str | None = None, rate: float | None = None) -> list[int]:
        """The transformer's prompt ids for ``text`` (normalized; a ConfigError for what the
        model cannot read)."""
        t = normalize_text(text)
        if len(t) > MAX_CHARS:
            raise ConfigError(f"the text is {len(t)} characters long: at most {MAX_CHARS} per utterance "
                              "(split it into sentences)")
        return self.layout.prompt(t, self.bundle.voice_index(voice), self.bundle.rate_index(rate))

    def max_frames(self, text: str) -> int:
        return MIN_FRAMES + FRAMES_PER_CHAR * len(normalize_text(text))

    def generate(
        self,
        texts: str | Sequence[str],
        method: str = "ar",
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        voice: str | None = None,
        rate: float | None = None,
        options: MethodOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SpeechResult:
        """Speak each text (a string or a list of them).

        temperature, top_k: None takes the bundle's defaults (temperature 0 is greedy: every
        lossless method then returns ``ar``'s codes). seed: utterance ``i`` uses ``seed + i``, so
        a call is reproducible and methods can be compared on the same seeds; None draws fresh
        seeds. voice, rate: one of the bundle's voices and rates (None: its defaults).
        progress: called with 1 after each utterance."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ConfigError("no text given: give at least one sentence to speak")
        if len(texts) > MAX_UTTERANCES:
            raise ConfigError(f"at most {MAX_UTTERANCES} utterances per call, got {len(texts)}")
        prompts = [self.prompt(t, voice, rate) for t in texts]
        temperature = self.default_temperature if temperature is None else float(temperature)
        top_k = self.default_top_k if top_k is None else int(top_k)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        SamplingParams(temperature=temperature, top_k=top_k, seed=seed)  # validates
        m = self.method(method, options)
        end = frozenset({self.layout.end})
        t0 = time.perf_counter()
        all_codes, stats, finished, audios = [], [], [], []
        for i, (text, prompt) in enumerate(zip(texts, prompts)):
            params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed + i)
            st = Stats(m.name)
            out: list[int] = []
            engine = Engine(self.model, m)
            for chunk in engine.generate(prompt, self.max_frames(text), params, end, st):
                out.extend(chunk)
            done = engine.finish_reason == "stop"  # the end token (the engine does not emit it)
            codes = [c for c in out if c != self.layout.end]
            all_codes.append(codes)
            stats.append(st)
            finished.append(done)
            audios.append(self.bundle.codec.decode(codes, seed=seed + i))
            if progress is not None:
                progress(1)
        seconds = time.perf_counter() - t0
        return SpeechResult(audios, self.sample_rate, [normalize_text(t) for t in texts], all_codes, stats,
                            seconds, method=m.name, finished=finished,
                            frames_per_second=float(self.bundle.meta["frames_per_second"]))


def load_speech(path: str | None = None, dtype: str = "float32", quiet: bool = True) -> SpeechGenerator:
    """Load a speech bundle (default: the embedded flite-trained model) and return a
    :class:`SpeechGenerator`. path: a bundle directory written by ``genrefine train speech``.
    dtype: the transformer's weights, "float32" (as trained) or "q8_0" (rounded to Q8_0 when
    loaded and run on the exact integer kernels: faster on the CPU, a slightly different model)."""
    from ...models.guided import GuidedModel
    from ...models.loading import load_model
    from .bundle import load_bundle

    bundle = load_bundle(path)
    base, _ = load_model(str(bundle.transformer_dir), dtype=dtype, quiet=quiet)
    n = bundle.codebook_size + 1  # the codes and the end token
    latents = base.embed[:n].detach().float().clone()
    model = GuidedModel(base, n_codes=n, unconditional=lambda t: t, scale=1.0, latents=latents)
    return SpeechGenerator(bundle, model)
