"""The image bundle: the VQ tokenizer, the class-conditional transformer over its codes, the
quality classifier and the real images' feature statistics, in one folder.

Layout (written by :func:`save_bundle`, read by :func:`load_bundle`)::

    image.json               format, sizes, token ids, sampling defaults, how it was made
    vq.safetensors           VQTokenizer state dict (hyper-parameters in image.json "vq")
    classifier.safetensors   Classifier state dict (hyper-parameters in image.json "classifier")
    real_stats.safetensors   mu [F], sigma [F, F] (float64) of classifier features, n: held-out
                             real images never seen in training
    transformer/             a transformers LlamaForCausalLM (save_pretrained) and a word-level
                             tokenizer naming its ids, so load_model() opens it

Token ids of the transformer: codes ``0 .. C-1``; class ``c``: ``C + c``; the unconditional
(null) class: ``C + n_classes``. A prompt is the one class token; ``grid * grid`` codes follow
in raster order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...errors import ConfigError
from .. import read_bundle_meta
from .classifier import Classifier
from .vq import VQTokenizer

FORMAT = "genrefine-image-v1"
EMBEDDED_IMAGE_DIR = Path(__file__).resolve().parents[2] / "shipped" / "image-glyphs"
_FILES = ("vq.safetensors", "classifier.safetensors", "real_stats.safetensors", "transformer/config.json")


@dataclass
class ImageBundle:
    """A loaded bundle (see the module docstring)."""

    path: Path
    meta: dict  # image.json
    vq: VQTokenizer
    classifier: Classifier
    real_mu: Tensor  # [F] float64
    real_sigma: Tensor  # [F, F] float64
    transformer_dir: Path

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def n_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def grid(self) -> int:
        return int(self.meta["grid"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def null_token(self) -> int:
        return int(self.meta["null_token"])

    def class_token(self, c: int) -> int:
        """The prompt token of class ``c`` (0-based)."""
        if not 0 <= int(c) < self.n_classes:
            raise ConfigError(f"class {c} is out of range: this model has classes 0..{self.n_classes - 1}")
        return int(self.meta["class_token_offset"]) + int(c)

    def latents(self) -> Tensor:
        """[C, d] float32: the VQ codebook (code i's latent vector)."""
        return self.vq.codebook.detach().float().clone()


def image_meta(*, codebook_size: int, grid: int, image_size: int, classes, defaults: dict,
               vq: dict, classifier: dict, data: dict, training: dict) -> dict:
    """image.json's content, with the token ids derived from the sizes."""
    return {
        "format": FORMAT, "image_size": image_size, "grid": grid, "codebook_size": codebook_size,
        "classes": [str(c) for c in classes], "class_token_offset": codebook_size,
        "null_token": codebook_size + len(classes), "defaults": defaults, "vq": vq,
        "classifier": classifier, "data": data, "training": training,
    }


def token_tokenizer(codebook_size: int, n_classes: int):
    """A word-level tokenizer over the transformer's ids (``c0`` .. codes, ``class0`` ..,
    ``null``): it names the ids and lets the model loader open the folder; images never pass
    through text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [f"c{i}" for i in range(codebook_size)] + [f"class{i}" for i in range(n_classes)] + ["null"]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="null"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="null")


def save_bundle(out: str | Path, meta: dict, vq: VQTokenizer, classifier: Classifier,
                real_mu: Tensor, real_sigma: Tensor, n_real: int, transformer) -> Path:
    """Write a bundle into ``out`` (image.json last: its presence marks a complete bundle)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "image.json").unlink(missing_ok=True)
    save_file({k: v.detach().contiguous() for k, v in vq.state_dict().items()}, str(out / "vq.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in classifier.state_dict().items()},
              str(out / "classifier.safetensors"))
    save_file({"mu": real_mu.double().contiguous(), "sigma": real_sigma.double().contiguous(),
               "n": torch.tensor([int(n_real)])}, str(out / "real_stats.safetensors"))
    tdir = out / "transformer"
    transformer.save_pretrained(str(tdir), safe_serialization=True)
    token_tokenizer(int(meta["codebook_size"]), len(meta["classes"])).save_pretrained(str(tdir))
    (out / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ConfigError(f"cannot read {path} ({type(e).__name__}): retrain with "
                          "`genrefine train image --out DIR`") from None


def load_bundle(path: str | Path | None = None) -> ImageBundle:
    """Load the bundle in ``path`` (None: the embedded one, :data:`EMBEDDED_IMAGE_DIR`), on the
    CPU in float32, models in eval mode. A missing or malformed bundle is a ConfigError."""
    p = Path(path).expanduser() if path is not None else EMBEDDED_IMAGE_DIR
    hint = "make one with `genrefine train image --out DIR`"
    meta = read_bundle_meta(p, "image", FORMAT, _FILES, hint)
    try:
        vq = VQTokenizer.from_config(meta["vq"])
        clf = Classifier.from_config(meta["classifier"])
        int(meta["codebook_size"]), int(meta["grid"]), int(meta["null_token"]), len(meta["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{p / 'image.json'} lacks or has a bad {e}: {hint}") from None
    for net, name in ((vq, "vq.safetensors"), (clf, "classifier.safetensors")):
        try:
            net.load_state_dict(_read_tensors(p / name))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"{p / name} does not match image.json ({first}): {hint}") from None
        net.eval()
    stats = _read_tensors(p / "real_stats.safetensors")
    if "mu" not in stats or "sigma" not in stats:
        raise ConfigError(f"{p / 'real_stats.safetensors'} lacks mu or sigma: {hint}")
    if vq.codebook_size != int(meta["codebook_size"]):
        raise ConfigError(f"{p}: image.json's codebook_size differs from the VQ's: {hint}")
    return ImageBundle(p, meta, vq, clf, stats["mu"], stats["sigma"], p / "transformer")
