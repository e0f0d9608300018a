"""The speech bundle: the codec and the text-conditioned transformer over its codes, in one folder.

Layout (written by :func:`save_bundle`, read by :func:`load_bundle`)::

    speech.json              format, sizes, token ids, voices, rates, defaults, how it was made
    codec.safetensors        the codec's state dict (hyper-parameters in speech.json "codec")
    transformer/             a transformers LlamaForCausalLM (save_pretrained) and a word-level
                             tokenizer naming its ids, so load_model() opens it
    heads/drafter.safetensors   Medusa heads for the transformer (methods medusa, vadusa), when
                             trained

Token ids of the transformer: codes ``0 .. C-1``; end of audio ``C``; then the characters of
:data:`~genrefine.modalities.speech.data.ALPHABET`, the voices, the rates and the start token
(:class:`~genrefine.modalities.speech.tokens.TokenLayout`). A prompt is ``[voice, rate] + characters +
[start]``; codes follow, then the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ConfigError
from .. import read_bundle_meta
from .codec import Codec
from .data import ALPHABET, RATES, VOICES
from .tokens import TokenLayout

FORMAT = "genrefine-speech-v1"
EMBEDDED_SPEECH_DIR = Path(__file__).resolve().parents[2] / "shipped" / "speech-flite"
_FILES = ("codec.safetensors", "transformer/config.json")
HINT = "make one with `genrefine train speech --out DIR`"


@dataclass
class SpeechBundle:
    """A loaded bundle (see the module docstring)."""

    path: Path
    meta: dict  # speech.json
    codec: Codec
    transformer_dir: Path

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def end_token(self) -> int:
        return self.codebook_size

    @property
    def voices(self) -> list[str]:
        return list(self.meta["voices"])

    @property
    def rates(self) -> list[float]:
        return [float(r) for r in self.meta["rates"]]

    @property
    def sample_rate(self) -> int:
        return int(self.meta["sample_rate"])

    def layout(self):
        return TokenLayout(self.codebook_size, len(self.meta["alphabet"]), len(self.voices), len(self.rates))

    def voice_index(self, voice: str | None) -> int:
        v = self.meta["defaults"]["voice"] if voice is None else voice
        if v not in self.voices:
            raise ConfigError(f"unknown voice {v!r}: this model speaks with {', '.join(self.voices)}")
        return self.voices.index(v)

    def rate_index(self, rate: float | None) -> int:
        r = float(self.meta["defaults"]["rate"] if rate is None else rate)
        for i, x in enumerate(self.rates):
            if abs(x - r) < 1e-6:
                return i
        raise ConfigError(f"unsupported rate {r:g}: this model was trained at "
                          f"{', '.join(f'{x:g}' for x in self.rates)} (larger is slower)")


def speech_meta(*, codebook_size: int, defaults: dict, codec: dict, data: dict, training: dict) -> dict:
    """speech.json's content."""
    from .codec import HOP, N_FFT, N_MELS, SAMPLE_RATE

    return {
        "format": FORMAT, "sample_rate": SAMPLE_RATE, "codebook_size": codebook_size,
        "frames_per_second": SAMPLE_RATE / HOP, "features": {"n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS},
        "alphabet": ALPHABET, "voices": list(VOICES), "rates": list(RATES), "defaults": defaults,
        "codec": codec, "data": data, "training": training,
    }


def token_tokenizer(layout):
    """A word-level tokenizer naming the transformer's ids (``c0`` .., ``end``, ``ch_a`` ..,
    ``voice0`` .., ``rate0`` .., ``start``) so the model loader can open the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ([f"c{i}" for i in range(layout.codebook_size)] + ["end"]
             + [f"ch{i}" for i in range(layout.n_chars)] + [f"voice{i}" for i in range(layout.n_voices)]
             + [f"rate{i}" for i in range(layout.n_rates)] + ["start"])
    assert len(names) == layout.vocab_size
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="end"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="end")


def save_bundle(out: str | Path, meta: dict, codec: Codec, transformer, layout) -> Path:
    """Write a bundle into ``out`` (speech.json last: its presence marks a complete bundle)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speech.json").unlink(missing_ok=True)
    save_file({k: v.detach().contiguous() for k, v in codec.state_dict().items()}, str(out / "codec.safetensors"))
    tdir = out / "transformer"
    transformer.save_pretrained(str(tdir), safe_serialization=True)
    token_tokenizer(layout).save_pretrained(str(tdir))
    (out / "speech.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_bundle(path: str | Path | None = None) -> SpeechBundle:
    """Load the bundle in ``path`` (None: the embedded one, :data:`EMBEDDED_SPEECH_DIR`) on the
    CPU. A missing or malformed bundle is a ConfigError saying what to do."""
    from safetensors.torch import load_file

    p = Path(path).expanduser() if path is not None else EMBEDDED_SPEECH_DIR
    meta = read_bundle_meta(p, "speech", FORMAT, _FILES, HINT)
    try:
        C = int(meta["codebook_size"])
        cfg = meta["codec"]
        width, layers = int(cfg["width"]), int(cfg["layers"])
        meta["defaults"]["voice"], meta["defaults"]["rate"], meta["voices"], meta["rates"], meta["alphabet"]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{p / 'speech.json'} lacks or has a bad {e}: {HINT}") from None
    try:
        state = load_file(str(p / "codec.safetensors"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ConfigError(f"cannot read {p / 'codec.safetensors'} ({type(e).__name__}): {HINT}") from None
    book = state.get("decoder.codebook")
    if book is None or book.shape[0] != C:
        raise ConfigError(f"{p / 'codec.safetensors'} does not match speech.json's codebook_size: {HINT}")
    codec = Codec(torch.zeros_like(book), width, layers)
    try:
        codec.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{p / 'codec.safetensors'} does not match speech.json ({first}): {HINT}") from None
    codec.eval()
    return SpeechBundle(p, meta, codec, p / "transformer")

