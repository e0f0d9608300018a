"""``genrefine export``: drafters in the formats engines load (checked against what their loaders
expect, as published), read back bit for bit; EAGLE formats refused with the reason; the CLI.

No engine is installed here: each engine's expectations are written down below from its source.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from genrefine.cli import main
from genrefine.errors import ConfigError
from genrefine.export import (
    export_drafter,
    ids_from_vocab_maps,
    load_exported,
    medusa_files,
    read_for_export,
    vocab_maps,
)
from genrefine.methods.eagle import EagleNet
from genrefine.methods.parts.heads import HeadsNet, output_logits
from genrefine.methods.parts.store import SHIPPED, read_drafter, save_drafter
from genrefine.models.runtime import NativeModel
from tiny import save_tiny_model_dir, tiny_hf_model

HEADS, EAGLE = SHIPPED / "gemma-3-270m" / "heads", SHIPPED / "gemma-3-270m" / "eagle"


@functools.lru_cache(maxsize=None)
def native(family: str) -> NativeModel:
    m = NativeModel.from_hf(tiny_hf_model(family))
    m.name = f"tiny-{family}"
    return m


def heads_drafter(model, out, num_heads: int = 3, vocab: int | None = 40, seed: int = 0):
    """A heads drafter with random (not zero) weights for ``model``, saved like `train` saves."""
    g = torch.Generator().manual_seed(seed)
    H = model.hidden_size
    net = HeadsNet(H, num_heads)
    with torch.no_grad():
        net.weight.copy_(torch.randn(net.weight.shape, generator=g) * 0.3)
        net.bias.copy_(torch.randn(net.bias.shape, generator=g) * 0.3)
    n = model.vocab_size if vocab is None else vocab
    ids = torch.randperm(model.vocab_size, generator=g)[:n] if vocab else torch.arange(n)
    tensors = {"heads.weight": net.weight.data, "heads.bias": net.bias.data}
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    tensors["vocab_ids"] = ids.to(torch.int32)
    save_drafter(out, "heads", model, {"num_heads": num_heads, "topk": 2, "lm_window": 4,
                                       "tree": [[0], [1], [0, 0]]}, tensors)
    return out


def eagle_drafter(model, out):
    net = EagleNet(model.hidden_size, heads=2, kv_heads=1, head_dim=8, inner=16)
    tensors = {f"net.{k}": v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    tensors["vocab_ids"] = torch.arange(model.vocab_size, dtype=torch.int32)
    save_drafter(out, "eagle", model, {**net.config(), "topk": 4}, tensors)
    return out


# What vLLM's Medusa loader expects (vllm/model_executor/models/medusa.py: Medusa.__init__,
# ResidualBlock, Medusa.load_weights; vllm/transformers_utils/configs/medusa.py: MedusaConfig):
# config fields hidden_size, vocab_size, num_heads, num_hidden_layers, truncated_vocab_size;
# parameters blocks.{i}.layers.{j}.weight [H, H] (nn.Linear, bias when medusa_fc_bias);
# original_lm_head -> one lm_head loaded from "lm_heads.0.weight", [truncated_vocab_size, H];
# "token_map" kept only when truncated_vocab_size < vocab_size, and load_weights asserts
# truncated_vocab_size == vocab_size or a token_map was loaded.
def vllm_medusa_expected(config: dict) -> dict[str, tuple[int, ...]]:
    H, K, L = config["hidden_size"], config["num_heads"], config["num_hidden_layers"]
    want = {}
    for i in range(K):
        for j in range(L):
            want[f"blocks.{i}.layers.{j}.weight"] = (H, H)
            if config.get("medusa_fc_bias", False):
                want[f"blocks.{i}.layers.{j}.bias"] = (H,)
    if config.get("original_lm_head", False):
        want["lm_heads.0.weight"] = (config["truncated_vocab_size"], H)
    else:
        for i in range(K):
            want[f"lm_heads.{i}.weight"] = (config["truncated_vocab_size"], H)
    if config["truncated_vocab_size"] < config["vocab_size"]:
        want["token_map"] = (config["truncated_vocab_size"],)
    return want


def vllm_medusa_tokens(config: dict, t: dict, h: torch.Tensor) -> torch.Tensor:
    """vLLM Medusa's proposal from hidden state h [H], as its source computes it: per head,
    x + silu(layer(x)) per layer, logits onto lm_head, scattered to token_map, argmax: [K]."""
    out = []
    for i in range(config["num_heads"]):
        x = h.float()
        for j in range(config["num_hidden_layers"]):
            x = x + F.silu(F.linear(x, t[f"blocks.{i}.layers.{j}.weight"].float(),
                                    t[f"blocks.{i}.layers.{j}.bias"].float()))
        logits = x @ t["lm_heads.0.weight"].float().T
        if "token_map" in t:
            full = torch.full((config["vocab_size"],), -torch.inf)
            full[t["token_map"]] = logits
            logits = full
        out.append(int(logits.argmax()))
    return torch.tensor(out)


@pytest.mark.parametrize("vocab", [40, None], ids=["reduced-vocab", "full-vocab"])
def test_medusa_export_matches_vllm_loader_and_round_trips(tmp_path, vocab):
    m = native("llama")
    d = heads_drafter(m, tmp_path / "d", vocab=vocab)
    out = export_drafter(d, "medusa", tmp_path / "out", m)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert (config["hidden_size"], config["vocab_size"], config["num_heads"]) == (32, 97, 3)
    assert config["num_hidden_layers"] == 1
    assert config["truncated_vocab_size"] == (vocab or 97)
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is True
    t = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == vllm_medusa_expected(config)
    if vocab:
        assert t["token_map"].dtype == torch.int64  # an index tensor for logits[..., token_map]
    # round trip: the heads and the vocabulary come back bit for bit
    stored = read_drafter(d)
    back = load_exported(out)
    assert torch.equal(back.net.weight, stored.tensors["heads.weight"])
    assert torch.equal(back.net.bias, stored.tensors["heads.bias"])
    ids = stored.tensors["vocab_ids"].long()
    if vocab:
        assert torch.equal(back.vocab_ids, ids)
    else:
        assert torch.equal(back.vocab_ids, torch.arange(97))
    assert torch.equal(back.rows, m.lm_head[back.vocab_ids].to(torch.bfloat16))
    # and vLLM's computation (as its source reads) proposes genrefine's top-1 of every head
    net = HeadsNet(32, 3)
    net.load_state_dict({"weight": stored.tensors["heads.weight"].float(),
                         "bias": stored.tensors["heads.bias"].float()})
    rows = m.lm_head[ids].to(torch.bfloat16).float()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        h = torch.randn(32, generator=g)
        ours = ids[output_logits(m, net(h), rows).argmax(-1)]
        assert torch.equal(vllm_medusa_tokens(config, t, h), ours)


def test_medusa_export_of_the_shipped_heads_round_trips(tmp_path):
    """The shipped Gemma 3 270M heads, with stand-in output rows (the real ones need the model)."""
    stored = read_drafter(HEADS)
    v = int(stored.tensors["vocab_ids"].numel())
    rows = torch.randn(v, 640, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    config, tensors = medusa_files(stored, rows, 262144)
    assert config["truncated_vocab_size"] == v < config["vocab_size"]
    assert {k: tuple(x.shape) for k, x in tensors.items()} == vllm_medusa_expected(config)
    from genrefine.diskcache import save_tensors

    save_tensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = load_exported(tmp_path)
    assert torch.equal(back.net.weight, stored.tensors["heads.weight"])
    assert torch.equal(back.net.bias, stored.tensors["heads.bias"])
    assert torch.equal(back.vocab_ids, stored.tensors["vocab_ids"].long())
    assert torch.equal(back.rows, rows)


@pytest.mark.parametrize("fmt", ["eagle", "speculators"])
def test_eagle_formats_refuse_genrefines_eagle_with_the_reason(tmp_path, fmt):
    for d in (EAGLE, eagle_drafter(native("llama"), tmp_path / "e")):
        with pytest.raises(ConfigError) as e:
            read_for_export(d, fmt)
        msg = str(e.value)
        assert "refusing" in msg
        if fmt == "eagle":
            assert "attn_norm" in msg and "out_norm" in msg
        else:
            assert "eagle3" in msg


def test_a_format_refuses_another_kind_of_drafter(tmp_path):
    with pytest.raises(ConfigError, match="takes a 'heads' drafter"):
        read_for_export(EAGLE, "medusa")
    with pytest.raises(ConfigError, match="--format medusa"):
        read_for_export(HEADS, "eagle")
    with pytest.raises(ConfigError, match="unknown export format"):
        read_for_export(HEADS, "gguf")


def test_medusa_export_refuses_another_target(tmp_path):
    d = heads_drafter(native("llama"), tmp_path / "d")
    with pytest.raises(ConfigError, match="trained for model"):
        export_drafter(d, "medusa", tmp_path / "out", native("gemma3_text"))


# EAGLE-3's convention (vLLM llama_eagle3.py, Eagle3LlamaForCausalLM.compute_logits:
# targets = arange(draft_vocab_size) + draft_id_to_target_id); t2d a [vocab] bool mask.
def test_vocab_maps_follow_eagle3s_convention():
    ids = torch.tensor([5, 0, 9, 2])
    d2t, t2d = vocab_maps(ids, 12)
    assert d2t.dtype == torch.long and t2d.dtype == torch.bool and t2d.shape == (12,)
    assert torch.equal(torch.arange(4) + d2t, ids)
    assert t2d.nonzero().flatten().tolist() == [0, 2, 5, 9]
    assert torch.equal(ids_from_vocab_maps(d2t), ids)
    with pytest.raises(ConfigError):
        vocab_maps(torch.tensor([1, 1]), 12)
    with pytest.raises(ConfigError):
        vocab_maps(torch.tensor([12]), 12)


def test_cli_export(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    from genrefine.api import load

    m = load(str(model_dir), dtype="float32", device="cpu", quiet=True).model
    d = heads_drafter(m, tmp_path / "d")
    out = tmp_path / "out"
    assert main(["export", "--drafter", str(d), "--format", "medusa", "--out", str(out),
                 "--model", str(model_dir)]) == 0
    back = load_exported(out)
    assert torch.equal(back.net.weight, read_drafter(d).tensors["heads.weight"])
    assert torch.equal(back.rows, m.lm_head[back.vocab_ids].to(torch.bfloat16))
    capsys.readouterr()
    bad = [
        ["--drafter", str(tmp_path / "missing"), "--format", "medusa"],
        ["--drafter", str(d), "--format", "onnx"],
        ["--drafter", str(EAGLE), "--format", "medusa"],
        ["--drafter", str(EAGLE), "--format", "eagle"],
    ]
    for args in bad:
        assert main(["export", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("genrefine: error: ") and "\n" not in err, err
    assert not (tmp_path / "x").exists()
