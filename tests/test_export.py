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
EAGLE_ENGINE = SHIPPED / "gemma-3-270m" / "eagle-engine"


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


def eagle_drafter(model, out, style: str = "genrefine", seed: int = 0):
    """An EAGLE drafter with random weights (norm weights too) for ``model``, saved like `train`
    saves it."""
    net = EagleNet(model.hidden_size, heads=2, kv_heads=1, head_dim=8, inner=16, style=style)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((1.0 if p.dim() == 1 else 0.0) + torch.randn(p.shape, generator=g) * 0.3)
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
            assert "attn_norm" in msg and "out_norm" in msg and "norm_e" in msg
            assert "--eagle-style engine" in msg
        else:
            assert "eagle3" in msg
    # the engine style passes for eagle; speculators stays refused (vLLM reads EAGLE-3 there)
    d = eagle_drafter(native("llama"), tmp_path / "engine", style="engine")
    if fmt == "eagle":
        assert read_for_export(d, fmt).kind == "eagle"
    else:
        with pytest.raises(ConfigError, match="eagle3"):
            read_for_export(d, fmt)


# What vLLM's EAGLE-1 loader expects (vllm/model_executor/models/llama_eagle.py, EagleLlamaForCausalLM
# and its LlamaModel; vllm/model_executor/models/llama.py, LlamaDecoderLayer/LlamaAttention/
# LlamaMLP; vllm/transformers_utils/configs/eagle.py, EAGLEConfig): architectures
# [X] becomes [f"Eagle{X}"]; the drafter's parameters are model.embed_tokens [vocab, H] (skipped
# by load_weights and replaced by the target's when pipeline parallelism is off), model.fc
# [H, 2H] (no bias), and per layer i the fused self_attn.qkv_proj [(heads + 2 kv) * head_dim, H]
# (q, k, v shards), self_attn.o_proj [H, heads * head_dim], post_attention_layernorm [H],
# mlp.gate_up_proj [2 * intermediate, H] (shards 0, 1) and mlp.down_proj [H, intermediate];
# layer 0's input_layernorm is nn.Identity (no parameter). load_weights prefixes "model." to every
# name without "lm_head" and maps .q_proj/.k_proj/.v_proj -> .qkv_proj and .gate_proj/.up_proj ->
# .gate_up_proj; the drafter has no lm_head of its own (the target's is shared), so an lm_head
# tensor would find no module. SGLang's LlamaForCausalLMEagle (python/sglang/srt/models/
# llama_eagle.py; architectures names it) loads the same names through LlamaForCausalLM's
# load_weights (the same stacked mapping, "model." prefixed, lm_head names skipped: the
# target's embedding and head are set on it), but its fc = nn.Linear(2H, H) has a bias, which
# it keeps at its random initialisation unless the checkpoint holds fc.bias.
def vllm_eagle_params(config: dict, sglang: bool = False) -> dict[str, tuple[int, ...]]:
    H, D = config["hidden_size"], config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads, kv, inner = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    want = {"model.embed_tokens.weight": (config["vocab_size"], H), "model.fc.weight": (H, 2 * H)}
    if sglang:
        want["model.fc.bias"] = (H,)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        want[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * D, H)
        want[p + "self_attn.o_proj.weight"] = (H, heads * D)
        if i > 0:
            want[p + "input_layernorm.weight"] = (H,)
        want[p + "post_attention_layernorm.weight"] = (H,)
        want[p + "mlp.gate_up_proj.weight"] = (2 * inner, H)
        want[p + "mlp.down_proj.weight"] = (H, inner)
    return want


def vllm_eagle_load(config: dict, tensors: dict, sglang: bool = False) -> dict[str, dict]:
    """vLLM's (SGLang's) load_weights over ``tensors``: parameter -> {shard: shape}; raises where
    vLLM would (a name it has no parameter for)."""
    params = vllm_eagle_params(config, sglang)
    H, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    D, inner = config["head_dim"], config["intermediate_size"]
    shard_rows = {"q": heads * D, "k": kv * D, "v": kv * D, 0: inner, 1: inner}
    stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"),
               (".qkv_proj", ".v_proj", "v"), (".gate_up_proj", ".gate_proj", 0),
               (".gate_up_proj", ".up_proj", 1)]
    loaded: dict[str, dict] = {}
    for name, w in tensors.items():
        name = name if "lm_head" in name else "model." + name
        for param, shard, sid in stacked:
            if shard in name:
                name = name.replace(shard, param)
                assert name in params, name
                assert tuple(w.shape) == (shard_rows[sid], H), (name, sid, tuple(w.shape))
                loaded.setdefault(name, {})[sid] = tuple(w.shape)
                break
        else:
            if "embed_tokens." in name:
                continue
            assert name in params, f"vLLM's EAGLE drafter has no parameter {name}"
            assert tuple(w.shape) == params[name], (name, tuple(w.shape), params[name])
            loaded.setdefault(name, {})[None] = tuple(w.shape)
    return loaded


def vllm_eagle_forward(config: dict, t: dict, embeds, hidden, positions):
    """vLLM's EAGLE-1 drafter as its source computes it (llama_eagle.py LlamaModel.forward over
    llama.py's LlamaDecoderLayer with layer 0's input norm the identity), in float32:
    embeds, hidden [T, H], positions [T]; causal attention over the T rows. Returns [T, H]."""
    T, H = hidden.shape
    heads, kv, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    w = {k: v.float() for k, v in t.items()}
    p = "layers.0."

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # neox style (is_neox_style=True for Llama): rotate halves
        inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
        ang = positions.float()[:, None] * inv[None]  # [T, D/2]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = torch.cat([embeds, hidden], -1) @ w["fc.weight"].T + w.get("fc.bias", 0.0)
    residual = x  # residual None on the first layer: residual = x, then input_layernorm(x) = x
    q = rope((x @ w[p + "self_attn.q_proj.weight"].T).view(T, heads, D))
    k = rope((x @ w[p + "self_attn.k_proj.weight"].T).view(T, kv, D))
    v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, kv, D)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * D ** -0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    att = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, heads * D)
    x = att @ w[p + "self_attn.o_proj.weight"].T
    residual = x + residual  # post_attention_layernorm(x, residual): fused add, then norm
    x = rms(residual, w[p + "post_attention_layernorm.weight"])
    x = (F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return x + residual  # the model returns hidden_states + residual, no final norm


@pytest.mark.parametrize("fmt", ["eagle", "sglang-eagle"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_eagle_export_matches_the_engines_loader_computes_the_same_and_round_trips(tmp_path, family, fmt):
    m = native(family)
    sglang = fmt == "sglang-eagle"
    d = eagle_drafter(m, tmp_path / "d", style="engine")
    out = export_drafter(d, fmt, tmp_path / "out", m)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    if sglang:
        assert config["architectures"] == ["LlamaForCausalLMEagle"]
    else:  # EAGLEConfig: f"Eagle{arch}"
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert [f"Eagle{a}" for a in config["architectures"]] == ["EagleLlamaForCausalLM"]
    assert config["num_hidden_layers"] == 1 and config["hidden_act"] == "silu"
    assert (config["hidden_size"], config["vocab_size"]) == (m.hidden_size, m.vocab_size)
    assert config["max_position_embeddings"] == m.max_context
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    assert config["intermediate_size"] == 16 and config["tie_word_embeddings"] is False
    t = load_file(str(out / "model.safetensors"))
    loaded = vllm_eagle_load(config, t, sglang)
    # every parameter the engine has is loaded (all shards), except the shared embedding
    want = set(vllm_eagle_params(config, sglang)) - {"model.embed_tokens.weight"}
    assert set(loaded) == want
    if sglang:
        assert not t["fc.bias"].any()
    else:
        with pytest.raises(AssertionError, match="no parameter model.fc.bias"):
            vllm_eagle_load(config, {**t, "fc.bias": torch.zeros(m.hidden_size)})
    p = "model.layers.0."
    assert set(loaded[p + "self_attn.qkv_proj.weight"]) == {"q", "k", "v"}
    assert set(loaded[p + "mlp.gate_up_proj.weight"]) == {0, 1}
    # round trip: the network comes back bit for bit
    stored = read_drafter(d)
    back = load_exported(out)
    assert back.net.style == "engine"
    got = back.net.state_dict()
    assert got.keys() == {k[4:] for k in stored.tensors if k.startswith("net.")}
    for k, v in got.items():
        assert torch.equal(v, stored.tensors["net." + k]), k
    # vLLM's computation (as its source reads) gives genrefine's drafted features, fed the
    # target's unscaled embedding rows (the engine calls the target's embedding module)
    net = EagleNet(**{k: v for k, v in stored.config.items() if k != "topk"}).float()
    net.load_state_dict({k[4:]: v.float() for k, v in stored.tensors.items() if k.startswith("net.")})
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, m.vocab_size, (6,), generator=g)
    hidden = torch.randn(6, m.hidden_size, generator=g)
    pos = torch.arange(3, 9)
    e = net.embed(m, ids).float()
    ours, _, _ = net(hidden[None], e[None], pos)
    ref = vllm_eagle_forward(config, t, F.embedding(ids, m.embed.float()), hidden, pos)
    assert torch.allclose(ours[0], ref, atol=1e-4, rtol=1e-4), (ours[0] - ref).abs().max()
    # the scaled embedding (what genrefine's own style reads) would not match on Gemma
    if family == "gemma3_text":
        scaled, _, _ = net(hidden[None], m.embed_tokens(ids).float()[None], pos)
        assert not torch.allclose(scaled[0], ref, atol=1e-3)


@pytest.mark.parametrize("fmt", ["eagle", "sglang-eagle"])
def test_eagle_export_of_the_shipped_engine_style_drafter(tmp_path, fmt):
    """The shipped engine-style EAGLE drafter for Gemma 3 270M, at its real shapes: every tensor
    goes where the engine's loader puts it, and it reads back bit for bit."""
    from genrefine.diskcache import save_tensors
    from genrefine.export import eagle_files

    stored = read_drafter(EAGLE_ENGINE)
    assert stored.config["style"] == "engine"
    config, tensors = eagle_files(stored, 262144, 32768, fmt)
    assert (config["hidden_size"], config["num_attention_heads"], config["head_dim"]) == (640, 4, 64)
    sglang = fmt == "sglang-eagle"
    loaded = vllm_eagle_load(config, tensors, sglang)
    assert set(loaded) == set(vllm_eagle_params(config, sglang)) - {"model.embed_tokens.weight"}
    save_tensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = load_exported(tmp_path).net.state_dict()
    assert back.keys() == {k[4:] for k in stored.tensors if k.startswith("net.")}
    for k, v in back.items():
        assert torch.equal(v, stored.tensors["net." + k]), k


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
    engine = eagle_drafter(m, tmp_path / "engine", style="engine")
    assert main(["export", "--drafter", str(engine), "--format", "eagle", "--out",
                 str(tmp_path / "eagle-out"), "--model", str(model_dir)]) == 0
    assert load_exported(tmp_path / "eagle-out").net.style == "engine"
    capsys.readouterr()
    bad = [
        ["--drafter", str(tmp_path / "missing"), "--format", "medusa"],
        ["--drafter", str(engine), "--format", "speculators"],
        ["--drafter", str(d), "--format", "onnx"],
        ["--drafter", str(EAGLE), "--format", "medusa"],
        ["--drafter", str(EAGLE), "--format", "eagle"],
    ]
    for args in bad:
        assert main(["export", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("genrefine: error: ") and "\n" not in err, err
    assert not (tmp_path / "x").exists()
