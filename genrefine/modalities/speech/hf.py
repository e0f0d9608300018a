"""MusicGen (transformers) as a real multi-codebook audio model: speculative decoding over frames.

    from genrefine.modalities.speech.hf import HFSpeechGenerator
    gen = HFSpeechGenerator(MusicgenForCausalLM(...))        # or load_hf_speech("path/to/musicgen")
    out = gen.generate(method="pld", max_frames=256, temperature=0.0)
    out.codes                                                 # long [frames, K]
    out.stats.tokens_per_step                                 # decoder columns per target forward

Terms
-----
MusicGen emits ``K`` codebooks per audio frame. Its decoder reads, at each position, one code per
codebook (the K embeddings are summed) and predicts the next position's K codes with K independent
heads over the same hidden state. The codebooks are *delayed* (transformers'
``build_delay_pattern_mask``): codebook ``k`` of audio frame ``f`` sits in decoder **column**
``f + 1 + k``; column 0 is all pad (the start token), and codebook ``k`` is forced to pad in columns
``t <= k`` and ``t >= F + 1 + k`` (F: frames asked for), so ``F + K`` columns give F frames. Forced
codes are never predicted: whatever the heads say there is replaced by the pad id, exactly as
transformers' generate does (``apply_delay_pattern_mask``).

Design
------
- **Unit of speculation: a column** (K codes; the decoder consumes one per position). A draft is a
  chain of ``d`` columns; the target runs once over ``[last column] + draft`` (``d + 1``
  positions) through transformers' cache, which is rolled back by cropping (chains only, as the
  other transformers adapters in :mod:`genrefine.models.hf`).
- **Drafters, training-free**: ``pld`` (prompt lookup over columns: the longest recent n-gram of
  whole columns, ``max_ngram`` .. 1, that occurred earlier; the columns that followed it) and
  ``jacobi`` (a block of guessed columns refined by fixed-point iteration: after each step the
  guesses are the target's argmax columns beyond the accepted ones). ``ar`` drafts nothing. Forced
  (delay-pattern) codes in a draft are overwritten with pad before verification.
- **Acceptance: a column is accepted when every codebook accepts.** Greedy: the draft column
  equals the target's argmax column (forced codes applied); the first column that differs is
  replaced by the target's column, so the output is token-identical to plain greedy decoding
  (and to transformers' ``generate(do_sample=False)``).

Sampling (exact)
----------------
Let ``p_t = P(. | prefix)`` be the target's processed distribution (temperature, top-k, top-p
per codebook) over the next column. MusicGen's heads are **conditionally independent given the
prefix**: its generate samples each codebook's row of logits separately, so the column's law is
the product ``p_t(x) = prod_k p_k(x_k)`` (classifier-free guidance mixes logits per codebook and
keeps this). The drafters here are deterministic given the past (``q = delta_d``, ``d`` a column
fixed before this step's random numbers are drawn). Per codebook ``k``, independently: accept
``d_k`` with probability ``p_k(d_k)``; otherwise draw from the residual ``p_k`` with ``d_k``
removed, renormalized. Forced codebooks always take the pad.

*Claim: the emitted column is distributed exactly as* ``p_t`` *, and the step goes on to the next
drafted column exactly when the emitted column equals the draft.* Proof: for codebook ``k`` the
output is ``d_k`` with probability ``p_k(d_k)``, and ``x != d_k`` with probability
``(1 - p_k(d_k)) * p_k(x) / (1 - p_k(d_k)) = p_k(x)``: its law is ``p_k``. The codebooks use
independent random numbers, so the column's law is ``prod_k p_k = p_t``. The residual never
yields ``d_k``, so the output equals ``d`` iff every codebook accepted, which is the continuation
rule. Then, as for a single token, each emitted column is an exact draw from ``p_t`` given the
emitted prefix and the draft of the next column is a function of that prefix and of earlier
randomness only, so the whole sequence has the law of plain sampling. The probability of
accepting a column is ``prod_k p_k(d_k) = p_t(d)``, the largest possible for a point draft (the
joint rule ``min(1, p_t(d) / q(d))`` gives the same). Jacobi guesses under sampling are the
target's argmax (deterministic given earlier logits), so the claim covers them.
``tests/test_speech_hf.py`` checks the column kernel's law by sampling against ``prod_k p_k``
and shows that the rule "on rejection, redraw from ``p_k``" fails the same test.

Scope: mono MusicGen (``audio_channels == 1``): ``MusicgenForCausalLM`` (unconditional) and
``MusicgenForConditionalGeneration`` (a text prompt through its text encoder, with classifier-free
guidance as transformers does it). Audio prompts and stereo checkpoints are refused with a
:class:`~genrefine.errors.ConfigError`, as are methods other than ``ar``, ``pld`` and ``jacobi``
(trained drafters and tree methods need a model the project trains, and trees the native
runtime).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...errors import ConfigError
from ...models.hf import HFCache
from ...sampling import logits_to_probs, make_generator
from ...types import SamplingParams

SPEECH_METHODS = ("ar", "pld", "jacobi")  # the methods that apply to frames of codebooks


# --- pure kernels -----------------------------------------------------------------------------


def delay_pattern(n_frames: int, n_codebooks: int, pad: int) -> Tensor:
    """The forced codes of ``n_frames`` frames: [n_frames + K, K] long, -1 where the model
    predicts, ``pad`` where the delay pattern forces the pad (module docstring)."""
    if n_frames < 1:
        raise ConfigError(f"max_frames must be >= 1, got {n_frames}")
    K = n_codebooks
    t = torch.arange(n_frames + K)[:, None]  # [L, 1]
    k = torch.arange(K)[None, :]  # [1, K]
    forced = (t <= k) | (t >= n_frames + 1 + k)  # [L, K]
    return torch.where(forced, torch.full_like(forced, pad, dtype=torch.long), torch.full_like(forced, -1, dtype=torch.long))


def apply_forced(cols: Tensor, forced: Tensor) -> Tensor:
    """cols [n, K] with the delay pattern's forced codes (forced [n, K], -1 = free) put in."""
    return torch.where(forced == -1, cols, forced)


def undelay(cols: Tensor, n_frames: int) -> Tensor:
    """Decoder columns [n_frames + K, K] -> audio frames [n_frames, K] (codebook k of frame f is
    column f + 1 + k)."""
    K = cols.shape[1]
    f = torch.arange(n_frames)[:, None] + 1 + torch.arange(K)[None, :]  # [F, K]
    return cols.gather(0, f)


def lookup_columns(cols: Tensor, max_ngram: int, k: int) -> Tensor:
    """Prompt lookup over whole columns: for n = max_ngram .. 1, the latest earlier occurrence of
    the last n columns of ``cols`` ([m, K]) that has a successor; the (up to ``k``) columns after
    it. [d, K] long, d = 0 when nothing matches."""
    m = cols.shape[0]
    for n in range(min(max_ngram, m - 1), 0, -1):
        tail = cols[m - n :]  # [n, K]
        win = cols[: m - 1].unfold(0, n, 1)  # [m - n, K, n]: win[j] = cols[j : j + n].T
        hit = (win == tail.T[None]).all(-1).all(-1)  # [m - n]: starts j with a successor j + n
        idx = hit.nonzero()
        if idx.numel():
            j = int(idx[-1])
            return cols[j + n : j + n + k]
    return cols[:0]


def greedy_accept(choice: Tensor, draft: Tensor) -> int:
    """Drafted columns accepted greedily: the longest prefix of ``draft`` [d, K] equal to the
    target's columns ``choice`` [d + 1, K] in every codebook."""
    d = draft.shape[0]
    if d == 0:
        return 0
    same = (choice[:d] == draft).all(-1)  # [d]
    return int(same.long().cumprod(0).sum())


def speculative_columns(
    probs: Tensor,  # [d + 1, K, V] float32: the target's processed distribution at each row
    draft: Tensor,  # [d, K] long: drafted columns (free codes in 0..V-1, forced ones = pad)
    forced: Tensor,  # [d + 1, K] long: -1 free, else the forced id
    generator: torch.Generator | None,
) -> tuple[int, Tensor]:
    """Per-codebook speculative sampling of point drafts (module docstring, "Sampling"): the
    number of accepted columns ``a`` and the emitted columns [a + 1, K] (the accepted draft
    columns, then the first rejected column corrected or, when all are accepted, a fresh one)."""
    d, K, V = draft.shape[0], probs.shape[1], probs.shape[2]
    free = forced == -1  # [d + 1, K]
    if d:
        pd = probs[:d].gather(-1, draft.clamp(0, V - 1)[..., None]).squeeze(-1)  # [d, K]
        u = torch.rand(d, K, generator=generator, device=probs.device)
        acc = (u < pd) | ~free[:d]  # [d, K]
        a = int(acc.all(-1).long().cumprod(0).sum())
    else:
        acc, a = None, 0
    row = probs[a].clone()  # [K, V]
    if a < d:
        rejected = ~acc[a]  # [K]
        removed = row.scatter(-1, draft[a].clamp(0, V - 1)[:, None], 0.0)  # [K, V]
        ok = removed.sum(-1, keepdim=True) > 0  # p_k(d_k) == 1 is never rejected; guard rounding
        row = torch.where(rejected[:, None] & ok, removed, row)
    drawn = torch.multinomial(row / row.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)  # [K]
    if a < d:
        drawn = torch.where(acc[a], draft[a], drawn)
    out = torch.cat([draft[:a], apply_forced(drawn, forced[a])[None]])  # [a + 1, K]
    return a, out


# --- the model and its cache ----------------------------------------------------------------


@dataclass
class Conditioning:
    """What the decoder cross-attends to: the text encoder's states (conditional MusicGen)."""

    states: Tensor | None = None  # [B, S, H] (B = 2 with guidance: conditional, null)
    mask: Tensor | None = None  # [B, S] long
    guidance_scale: float = 1.0


class MusicgenFrames:
    """A loaded mono MusicGen decoder that scores columns: ``forward(cols [n, K]) -> logits
    [n, K, V]``, through transformers' cache (:class:`~genrefine.models.hf.HFCache`, rolled back
    by cropping). ``hf_model``: ``MusicgenForCausalLM`` or ``MusicgenForConditionalGeneration``."""

    def __init__(self, hf_model) -> None:
        self.hf = hf_model.eval()
        self.lm = getattr(hf_model, "decoder", hf_model)  # the MusicgenForCausalLM
        cfg = self.lm.config
        if int(getattr(cfg, "audio_channels", 1)) != 1:
            raise ConfigError("only mono MusicGen checkpoints are supported (audio_channels 1)")
        self.num_codebooks = int(cfg.num_codebooks)
        self.vocab_size = int(cfg.vocab_size)
        gc = getattr(hf_model, "generation_config", None)
        pad = getattr(gc, "decoder_start_token_id", None) if gc is not None else None
        if pad is None:
            pad = getattr(cfg, "decoder_start_token_id", None)
        if pad is None:
            pad = cfg.pad_token_id
        self.pad = int(pad)  # the start/pad id (vocab_size in released checkpoints)
        self.max_context = int(cfg.max_position_embeddings)
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        params = inspect.signature(type(self.lm).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, capacity: int | None = None) -> HFCache:
        """An encoder-decoder cache (cross-attention states kept, self-attention rolled back)."""
        from transformers import DynamicCache, EncoderDecoderCache

        cache = HFCache(min(capacity or self.max_context, self.max_context))
        cache.inner = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return cache

    @torch.inference_mode()
    def encode_text(self, input_ids: Sequence[int], guidance_scale: float) -> Conditioning:
        """The text encoder's states for a prompt, as transformers' generate prepares them
        (a zeroed, masked copy beside them when guidance_scale > 1)."""
        if self.lm is self.hf:
            raise ConfigError("this MusicGen has no text encoder: generate without a prompt")
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)  # [1, S]
        mask = torch.ones_like(ids)
        states = self.hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if guidance_scale > 1:
            states = torch.cat([states, torch.zeros_like(states)])
            mask = torch.cat([mask, torch.zeros_like(mask)])
        enc, dec = self.hf.text_encoder.config, self.lm.config
        if enc.hidden_size != dec.hidden_size and dec.cross_attention_hidden_size is None:
            states = self.hf.enc_to_dec_proj(states)
        states = states * mask[..., None]
        return Conditioning(states, mask, guidance_scale)

    @torch.inference_mode()
    def forward(self, cols: Tensor, cache: HFCache, cond: Conditioning | None = None) -> Tensor:
        """cols [n, K] long (pad id allowed) appended after cache.length -> logits [n, K, V]
        float32 of the next column at each row (guidance mixed in)."""
        cond = cond or Conditioning()
        n = int(cols.shape[0])
        start = cache.reserve(n)
        guided = cond.guidance_scale > 1
        ids = cols.T.to(self.device)  # [K, n]
        if guided:
            ids = ids.repeat(2, 1)  # [2K, n]: conditional rows, then null rows
        out = self.lm(
            input_ids=ids,
            encoder_hidden_states=cond.states,
            encoder_attention_mask=cond.mask,
            use_cache=True,
            **{self._cache_kw: cache.inner},
        )
        cache.length = start + n
        logits = out.logits.float().reshape(-1, self.num_codebooks, n, self.vocab_size)  # [B, K, n, V]
        if guided:
            logits = logits[1] + (logits[0] - logits[1]) * cond.guidance_scale
        else:
            logits = logits[0]
        return logits.permute(1, 0, 2)  # [n, K, V]


# --- drafters ---------------------------------------------------------------------------------


class _Lookup:
    """``pld`` over columns (:func:`lookup_columns`)."""

    def __init__(self, k: int, max_ngram: int) -> None:
        self.k, self.max_ngram = k, max_ngram

    def propose(self, cols: Tensor, budget: int) -> Tensor:  # cols [m, K] -> [d, K]
        return lookup_columns(cols, self.max_ngram, min(budget, self.k))

    def observe(self, argmax: Tensor, a: int) -> None:
        pass


class _Jacobi:
    """``jacobi`` over columns: guesses [block, K], start as copies of the last column; after a
    step, the target's argmax columns beyond the accepted ones, the last one repeated."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.guesses: Tensor | None = None

    def propose(self, cols: Tensor, budget: int) -> Tensor:
        if self.guesses is None:
            self.guesses = cols[-1:].repeat(self.block, 1)
        return self.guesses[: min(budget, self.block)]

    def observe(self, argmax: Tensor, a: int) -> None:  # argmax [d + 1, K]
        carried = argmax[a + 1 :][: self.block]
        if carried.shape[0] == 0:
            carried = argmax[-1:]
        fill = carried[-1:].repeat(self.block - carried.shape[0], 1)
        self.guesses = torch.cat([carried, fill])


# --- the generator ----------------------------------------------------------------------------


@dataclass
class FrameStats:
    """What one generation did: target forwards, columns decided, drafted and accepted columns."""

    method: str
    steps: int = 0  # target forwards (the first one reads the start column)
    columns: int = 0  # decoder columns decided (frames + K - 1)
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    accept_hist: list[int] = field(default_factory=list)  # accepted columns per step

    @property
    def tokens_per_step(self) -> float:
        """Columns (K codes each) decided per target forward."""
        return self.columns / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


@dataclass
class SpeechCodes:
    """The codes of one generation and its stats."""

    codes: Tensor  # [frames, K] long, the audio frames (delay pattern undone)
    stats: FrameStats
    method: str


class HFSpeechGenerator:
    """A MusicGen checkpoint (module docstring) that generates audio codes with ``ar``, ``pld`` or
    ``jacobi``; ``processor``: its text tokenizer/processor (for text prompts), optional."""

    def __init__(self, hf_model, processor=None, name: str = "musicgen") -> None:
        self.model = MusicgenFrames(hf_model)
        self.processor = processor
        self.name = name
        gc = getattr(hf_model, "generation_config", None)
        sample = bool(getattr(gc, "do_sample", False)) if gc is not None else False
        self.default_temperature = float(getattr(gc, "temperature", None) or 1.0) if sample else 0.0
        self.default_top_k = int(getattr(gc, "top_k", None) or 0) if sample else 0
        scale = getattr(gc, "guidance_scale", None) if gc is not None else None
        self.default_guidance = float(scale) if scale is not None else 1.0

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """The text encoder's ids of ``prompt`` (a text through the processor, or ids as given)."""
        if isinstance(prompt, str):
            if self.processor is None:
                raise ConfigError("no tokenizer for this model: pass the prompt as token ids")
            tok = getattr(self.processor, "tokenizer", self.processor)
            return list(tok(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        method: str = "ar",
        max_frames: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        guidance_scale: float | None = None,
        draft_len: int = 8,
        max_ngram: int = 3,
    ) -> SpeechCodes:
        """Generate ``max_frames`` frames of codes (MusicGen has no end token) with ``method``.

        Greedy (temperature 0) is token-identical to transformers' ``generate(do_sample=False)``
        for every method; under sampling every method draws from the same distribution as ``ar``.
        """
        if method not in SPEECH_METHODS:
            raise ConfigError(
                f"method {method!r} does not apply to MusicGen frames here: use one of {', '.join(SPEECH_METHODS)}"
            )
        if draft_len < 1 or max_ngram < 1:
            raise ConfigError("draft_len and max_ngram must be >= 1")
        m = self.model
        if max_frames + m.num_codebooks > m.max_context:
            raise ConfigError(f"max_frames must be at most {m.max_context - m.num_codebooks} for this model")
        temperature = self.default_temperature if temperature is None else float(temperature)
        top_k = self.default_top_k if top_k is None else int(top_k)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        if prompt is None:
            cond = Conditioning()
        else:
            cond = m.encode_text(self.prompt_ids(prompt), scale)
        drafter = None
        if method == "pld":
            drafter = _Lookup(draft_len, max_ngram)
        elif method == "jacobi":
            drafter = _Jacobi(draft_len)
        t0 = time.perf_counter()
        cols, stats = decode_columns(m, cond, drafter, max_frames, params, method)
        stats.seconds = time.perf_counter() - t0
        return SpeechCodes(undelay(cols, max_frames), stats, method)

    def decode(self, codes: Tensor) -> Tensor:
        """Frames [F, K] -> audio float32 [samples] through the checkpoint's EnCodec (conditional
        MusicGen only)."""
        enc = getattr(self.model.hf, "audio_encoder", None)
        if enc is None:
            raise ConfigError("this MusicGen has no audio codec: only codes can be generated")
        with torch.inference_mode():
            x = codes.T[None, None].to(self.model.device)  # [1, 1, K, F]
            audio = enc.decode(x, [None]).audio_values  # [1, channels, samples]
        return audio[0, 0].float().cpu()


def decode_columns(m: MusicgenFrames, cond: Conditioning, drafter, n_frames: int,
                   params: SamplingParams, method: str) -> tuple[Tensor, FrameStats]:
    """The frame-level speculative loop: columns [n_frames + K, K] long and the stats."""
    K, V = m.num_codebooks, m.vocab_size
    forced = delay_pattern(n_frames, K, m.pad)  # [L, K]
    L = forced.shape[0]
    cols = torch.full((L, K), m.pad, dtype=torch.long)
    n = 1  # columns decided; column 0 is the start column
    cache = m.new_cache(L)
    gen = None if params.greedy else make_generator(params)
    stats = FrameStats(method)
    while n < L:
        budget = L - 1 - n
        draft = drafter.propose(cols[:n], budget) if drafter is not None and budget > 0 else cols[:0]
        d = int(draft.shape[0])
        f = forced[n : n + d + 1]  # [d + 1, K]
        free = f[:d] == -1
        draft = torch.where(free & (draft >= V), torch.zeros_like(draft), draft)  # pads guessed where codes go
        draft = apply_forced(draft, f[:d])
        logits = m.forward(torch.cat([cols[n - 1 : n], draft]), cache, cond).cpu()  # [d + 1, K, V]
        argmax = apply_forced(logits.argmax(-1), f)  # [d + 1, K]
        if params.greedy:
            a = greedy_accept(argmax, draft)
            out = argmax[: a + 1]
        else:
            a, out = speculative_columns(logits_to_probs(logits, params), draft, f, gen)
        cols[n : n + a + 1] = out
        cache.rollback(d - a)
        if drafter is not None:
            drafter.observe(argmax, a)
        stats.steps += 1
        stats.drafted += d
        stats.accepted += a
        stats.accept_hist.append(a)
        n += a + 1
    stats.columns = L - 1
    return cols, stats


def is_musicgen_dir(path) -> bool:
    """Whether ``path`` holds a transformers config of model_type "musicgen"."""
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") in ("musicgen", "musicgen_decoder")
    except (OSError, ValueError):
        return False


def load_hf_speech(path: str | Path, dtype: str = "float32", device: str | None = None) -> HFSpeechGenerator:
    """Load a MusicGen checkpoint directory (and its processor when it has one)."""
    from ...errors import ModelLoadError
    from ...models.loading import resolve_device, resolve_dtype

    if not is_musicgen_dir(path):
        raise ModelLoadError(f"{path} holds no MusicGen checkpoint (config.json with model_type musicgen)")
    from transformers import AutoProcessor, MusicgenForCausalLM, MusicgenForConditionalGeneration

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    cls = MusicgenForConditionalGeneration if kind == "musicgen" else MusicgenForCausalLM
    try:
        hf = cls.from_pretrained(str(path), dtype=dt)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"transformers could not load the MusicGen model at {path}: {first}") from e
    try:
        proc = AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        proc = None
    return HFSpeechGenerator(hf.to(dev), proc, name=f"musicgen:{Path(path).name}")
