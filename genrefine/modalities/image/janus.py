"""Janus (transformers' ``JanusForConditionalGeneration``) as an image model of the engine.

    import genrefine
    gen = genrefine.load_image("path/to/Janus-Pro-1B")    # a directory with model_type "janus"
    out = gen.generate("a red fox in the snow", method="sjd", seed=0)
    out.images                                            # uint8 [1, 384, 384, 3]

Janus generates an image as a text prompt (``<bos>``, the text, ``<begin_of_image>``) followed by
``grid * grid`` VQ codes in raster order. Its language model reads text tokens through the text
embeddings and codes through ``generation_embeddings`` + ``generation_aligner``; the next code's
logits come from ``generation_head`` (not the text ``lm_head``). Classifier-free guidance runs the
same prompt with every token but the first and ``<begin_of_image>`` replaced by the pad token.

Ids on the engine's side (one id space for the prompt and the codes, as the image bundle's):
codes are ``0 .. C - 1`` (C: the VQ codebook size) and text token ``t`` is ``C + t``.
:class:`JanusImageModel` embeds each id by its range, so it needs no state about where the
prompt ends, and its logits are the codes' only (``vocab_size == C``).

It runs through transformers, so drafts are verified as chains only (``supports_trees`` False):
sjd, mc-sjd, lantern, gsd and jacobi draft chains and run; tree methods need the native runtime.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Sequence
from math import prod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, GenrefineError
from ...methods.base import MethodOptions
from ...models.hf import HFCache, check_chain_forward
from ...types import ModelOutput

IMAGE_START_TOKEN = "<begin_of_image>"  # Janus's tokenizer spelling of the image-start token


def is_janus_dir(path) -> bool:
    """Whether ``path`` is a directory holding a transformers config of model_type "janus"."""
    if path is None:
        return False
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "janus"
    except (OSError, ValueError):
        return False


class JanusImageModel:
    """The Model protocol over a loaded ``JanusForConditionalGeneration`` in image mode.

    Input ids: codes ``0 .. C - 1``, text token ``t`` as ``C + t`` (module docstring). Logits:
    ``generation_head`` over the codes, [m, C] float32. Cache: transformers' DynamicCache with
    rollback by cropping (:class:`~genrefine.models.hf.HFCache`). Chains only.
    """

    supports_trees = False
    bitwise_exact = False

    def __init__(self, hf_model, name: str = "janus") -> None:
        self.hf = hf_model.eval()
        inner = hf_model.model
        self.lm = inner.language_model
        self.text_embeddings = self.lm.get_input_embeddings()
        self.n_codes = int(inner.generation_embeddings.num_embeddings)
        self.n_text = int(self.text_embeddings.num_embeddings)
        tc = hf_model.config.text_config
        self.name = name
        self.vocab_size = self.n_codes
        self.num_layers = int(tc.num_hidden_layers)
        self.hidden_size = int(tc.hidden_size)
        self.max_context = int(getattr(tc, "max_position_embeddings", 4096))
        p = next(hf_model.parameters())
        self.device, self.dtype = p.device, p.dtype
        params = inspect.signature(type(self.lm).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def text_id(self, token: int) -> int:
        """The engine id of text token ``token``."""
        return self.n_codes + int(token)

    def embed(self, tokens: Tensor) -> Tensor:
        """[n] long engine ids -> [n, hidden] input embeddings (text or image, by id range)."""
        tokens = tokens.to(self.device)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_codes + self.n_text:
            raise GenrefineError(f"token ids must be in 0..{self.n_codes + self.n_text - 1}")
        is_text = tokens >= self.n_codes  # [n] bool
        x = torch.empty(tokens.shape[0], self.hidden_size, dtype=self.dtype, device=self.device)
        if bool(is_text.any()):
            x[is_text] = self.text_embeddings(tokens[is_text] - self.n_codes).to(self.dtype)
        if not bool(is_text.all()):
            x[~is_text] = self.hf.prepare_embeddings_for_image_generation(tokens[~is_text]).to(self.dtype)
        return x

    def new_cache(self, capacity: int | None = None) -> HFCache:
        return HFCache(min(capacity or self.max_context, self.max_context))

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        cache: HFCache,
        positions: Tensor | None = None,
        tree_mask: Tensor | None = None,
        logits_rows: Tensor | None = None,
        hidden_layers: Sequence[int] = (),
        layers: Sequence[int] | None = None,
        vocab_subset: Tensor | None = None,
    ) -> ModelOutput:
        """The Model protocol's forward, chains only: logits [m, C] float32 of the next code."""
        check_chain_forward(tree_mask, layers, vocab_subset, who="Janus")
        n = int(tokens.shape[0])
        start = cache.reserve(n)
        if positions is None:
            positions = torch.arange(start, start + n)
        out = self.lm(
            inputs_embeds=self.embed(tokens)[None],
            position_ids=positions.to(self.device)[None],
            use_cache=True,
            **{self._cache_kw: cache.inner},
            output_hidden_states=bool(hidden_layers),
        )
        cache.length = start + n
        h = out.last_hidden_state[0]  # [n, hidden]
        if logits_rows is not None:
            h = h.index_select(0, logits_rows.to(h.device))
        logits = self.hf.model.generation_head(h).float() if h.shape[0] else None  # [m, C]
        hidden = {layer: out.hidden_states[layer][0] for layer in hidden_layers}
        return ModelOutput(logits=logits, hidden=hidden)


def janus_unconditional(n_codes: int, keep: Sequence[int], pad: int) -> Callable[[Tensor], Tensor]:
    """The unconditional ids of a Janus prompt: every text id (``>= n_codes``) not in ``keep``
    (engine ids of BOS and the image-start token) becomes ``pad`` (an engine id); codes stay."""
    keep_t = torch.tensor(sorted(set(int(k) for k in keep)), dtype=torch.long)

    def uncond(tokens: Tensor) -> Tensor:  # [n] long -> [n] long
        drop = (tokens >= n_codes) & ~torch.isin(tokens, keep_t.to(tokens.device))
        return torch.where(drop, torch.full_like(tokens, pad), tokens)

    return uncond


def _special_id(tokenizer, generation_config, name: str, token: str | None = None) -> int | None:
    """A special token id from the generation config, else from the tokenizer."""
    v = getattr(generation_config, f"{name}_token_id", None) if generation_config is not None else None
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    if v is None:
        v = getattr(tokenizer, f"{name}_token_id", None)
    if v is None and token is not None:
        v = tokenizer.convert_tokens_to_ids(token)
        if v == getattr(tokenizer, "unk_token_id", None):
            v = None
    return None if v is None else int(v)


def _chat_template(path: Path, tokenizer) -> str | None:
    """The chat template: the tokenizer's, else the processor's file in the checkpoint."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except ValueError:
            return None
    return None


class HFImageGenerator:
    """A Janus checkpoint, ready to generate images from text prompts (module docstring).

    hf_model: a loaded ``JanusForConditionalGeneration``; tokenizer: its tokenizer; path: the
    checkpoint directory (for the chat template when the tokenizer has none).
    """

    def __init__(self, hf_model, tokenizer, path: str | Path, name: str | None = None) -> None:
        from ...models.guided import GuidedModel

        self.path = Path(path)
        self.name = name or f"janus:{self.path.name}"
        self.hf, self.tokenizer = hf_model.eval(), tokenizer
        self.base = JanusImageModel(hf_model, name=self.name)
        gc = getattr(hf_model, "generation_config", None)
        boi = ((getattr(gc, "generation_kwargs", None) or {}).get("boi_token_id") if gc is not None else None)
        if boi is None:
            boi = _special_id(tokenizer, None, "boi", IMAGE_START_TOKEN)
        self.bos = _special_id(tokenizer, gc, "bos")
        self.pad = _special_id(tokenizer, gc, "pad")
        missing = [n for n, v in (("BOS", self.bos), ("pad", self.pad), ("image-start", boi)) if v is None]
        if missing:
            raise ConfigError(
                f"{self.path} names no {', '.join(missing)} token id: set it in generation_config.json "
                f"(bos_token_id, pad_token_id, generation_kwargs.boi_token_id)"
            )
        self.boi = int(boi)
        self.template = _chat_template(self.path, tokenizer)
        vq = hf_model.model.vqmodel
        self.tokens_per_image = int(prod(vq.quantize.quant_state_dims))
        # Janus L2-normalizes a code's codebook vector before decoding it: that is its latent
        latents = F.normalize(vq.quantize.embedding.weight.detach().float(), dim=-1).cpu()  # [C, d]
        self.default_temperature = float(getattr(gc, "temperature", None) or 1.0) if gc is not None else 1.0
        self.default_top_k = 0  # Janus samples the full distribution
        scale = getattr(gc, "guidance_scale", None) if gc is not None else None
        self.default_cfg = float(scale) if scale is not None else 5.0
        b = self.base
        self.model = GuidedModel(
            b, n_codes=b.n_codes, scale=self.default_cfg, latents=latents,
            unconditional=janus_unconditional(
                b.n_codes, (b.text_id(self.bos), b.text_id(self.boi)), b.text_id(self.pad)),
        )
        self._methods: dict = {}

    def method(self, name: str, options: MethodOptions | None = None):
        """The built method for ``name`` (built once per options, reused across calls)."""
        from ...registry import build_method

        key = (name, options or MethodOptions())
        if key not in self._methods:
            self._methods[key] = build_method(name, self.model, options)
        return self._methods[key]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The engine ids of ``prompt``'s image-generation input: BOS, the text (through the
        chat template when the checkpoint has one, as Janus's examples do), the image-start
        token; text ids offset by the codebook size."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("a prompt must be a non-empty text")
        text = prompt
        if self.template:
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        while ids and ids[0] == self.bos:
            ids = ids[1:]
        return [self.base.text_id(t) for t in [self.bos, *ids, self.boi]]

    def decode(self, codes: Sequence[Sequence[int]]) -> np.ndarray:
        """Codes [N, grid*grid] -> uint8 RGB images [N, H, W, 3] (the VQ decoder's [-1, 1]
        output mapped to 0..255 as Janus's examples do)."""
        with torch.inference_mode():
            x = self.hf.decode_image_tokens(torch.tensor(codes, dtype=torch.long, device=self.base.device))
        x = ((x.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
        return x.cpu().numpy()

    def generate(
        self,
        prompts: str | Sequence[str],
        method: str = "ar",
        temperature: float | None = None,
        top_k: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        options: MethodOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ):
        """Generate one image per prompt; :meth:`ImageGenerator.generate
        <genrefine.modalities.image.api.ImageGenerator.generate>`'s arguments and result
        (images uint8 [N, H, W, 3], ``prompts`` set, ``classes`` empty)."""
        from .generation import MAX_IMAGES, ImageResult, generate_codes, sampling_settings

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("no prompt given: ask for at least one image")
        if len(prompts) > MAX_IMAGES:
            raise ConfigError(f"at most {MAX_IMAGES} images per call, got {len(prompts)}")
        ids = [self.prompt_ids(p) for p in prompts]
        temperature, top_k, cfg, seed = sampling_settings(self, temperature, top_k, cfg, seed)
        m = self.method(method, options)
        self.model.scale = cfg
        t0 = time.perf_counter()
        codes, stats = generate_codes(self.model, m, ids, self.tokens_per_image, temperature,
                                      top_k, seed, progress)
        images = self.decode(codes)
        return ImageResult(images, codes, [], stats, time.perf_counter() - t0, method=m.name,
                           prompts=prompts)


def load_janus(path: str | Path, dtype: str = "float32", device: str | None = None) -> HFImageGenerator:
    """Load a Janus checkpoint directory (model and tokenizer) as an :class:`HFImageGenerator`."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    from ...errors import ModelLoadError
    from ...models.loading import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not isinstance(dt, torch.dtype):
        raise ModelLoadError(f"--dtype {dtype} is for genrefine's own bundles: run Janus in float32 or bfloat16")
    try:
        hf = JanusForConditionalGeneration.from_pretrained(str(path), dtype=dt)
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"transformers could not load the Janus model at {path}: {first}") from e
    return HFImageGenerator(hf.to(dev), tok, path)
