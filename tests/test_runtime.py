"""The model runtimes against transformers: native logits of every family (full, incremental,
chunked, past the sliding window), tree forwards against chains, the cache's rollback and keep,
hidden states, layer subsets, reduced vocabularies, bfloat16, the transformers adapter, configs.
"""

from __future__ import annotations

import functools

import pytest
import torch

from genrefine.errors import GenrefineError
from genrefine.models.cache import KVCache
from genrefine.models.config import ModelConfig, UnsupportedArchitecture, from_hf_config
from genrefine.models.hf import HFModel
from genrefine.models.runtime import NativeModel
from genrefine.verify import build_tree
from tiny import FAMILIES, tiny_hf_config, tiny_hf_model, quantized_native

ATOL = 1e-5
WINDOW = 6  # tiny_hf_config's sliding window
LONG = 24  # well past the window


@functools.lru_cache(maxsize=None)
def native(family: str, dtype: torch.dtype = torch.float32) -> NativeModel:
    return NativeModel.from_hf(tiny_hf_model(family), dtype=dtype)


def tokens(n: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)  # [n]


@torch.no_grad()
def hf_logits(family: str, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits for a whole sequence: [n, vocab]."""
    return tiny_hf_model(family)(input_ids=ids[None]).logits[0].float()


def chain_logits(model, prefix: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """Logits of ``chain`` run incrementally after ``prefix`` on a fresh cache: [len(chain), V]."""
    cache = model.new_cache(64)
    model.forward(prefix, cache, logits_rows=torch.zeros(0, dtype=torch.long))
    return model.forward(chain, cache).logits


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err} > {atol}"


# --------------------------------------------------------------------------- logits vs transformers
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [5, LONG])
def test_full_forward_matches_transformers(family: str, n: int) -> None:
    ids = tokens(n, seed=n)
    model = native(family)
    cache = model.new_cache(64)
    out = model.forward(ids, cache)
    assert cache.length == n
    close(out.logits, hf_logits(family, ids))
    assert out.logits.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_matches_transformers(family: str) -> None:
    ids = tokens(LONG, seed=1)
    model = native(family)
    cache = model.new_cache(LONG)
    rows = [model.forward(ids[i : i + 1], cache).logits for i in range(LONG)]
    assert cache.length == LONG
    close(torch.cat(rows), hf_logits(family, ids))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix_len,k", [(3, 4), (10, 5), (17, 7)])
def test_chunked_forward_equals_full(family: str, prefix_len: int, k: int) -> None:
    ids = tokens(prefix_len + k, seed=prefix_len)
    model = native(family)
    full = model.forward(ids, model.new_cache(64)).logits
    chunked = chain_logits(model, ids[:prefix_len], ids[prefix_len:])
    close(chunked, full[prefix_len:])


def test_cache_capacity_and_context() -> None:
    model = native("llama")
    assert model.new_cache().capacity == model.max_context == 256
    assert model.new_cache(10_000).capacity == model.max_context
    cache = model.new_cache(4)
    with pytest.raises(ValueError, match="capacity"):
        model.forward(tokens(5), cache)
    assert cache.length == 0


# --------------------------------------------------------------------------- trees
TREE_PARENTS = [-1, -1, 0, 0, 1, 2, 2, 5, 3, -1, 7]


def _tree_vs_chains(family: str, prefix_len: int, parents: list[int]) -> None:
    model = native(family)
    n = len(parents)
    ids = tokens(prefix_len + 1 + n, seed=prefix_len + n)
    prefix, root, nodes = ids[:prefix_len], ids[prefix_len : prefix_len + 1], ids[prefix_len + 1 :]
    info = build_tree(parents)
    cache = model.new_cache(64)
    model.forward(prefix, cache)
    positions = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
    out = model.forward(
        torch.cat([root, nodes]), cache, positions=positions, tree_mask=info.mask_with_root
    )
    assert cache.length == prefix_len + 1 + n
    chains = model.new_cache(64)
    model.forward(prefix, chains, logits_rows=torch.zeros(0, dtype=torch.long))
    close(out.logits[0], model.forward(root, chains).logits[0])
    for i in range(n):
        path = info.mask[i].nonzero().flatten()  # root-to-node
        want = model.forward(nodes[path], chains, logits_rows=torch.tensor([path.numel() - 1]))
        chains.rollback(path.numel())
        close(out.logits[i + 1], want.logits[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_forward_equals_chains(family: str) -> None:
    _tree_vs_chains(family, 4, TREE_PARENTS)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "gemma2"])
def test_tree_forward_past_the_window(family: str) -> None:
    # prefix past the window, and a tree deeper than the window
    _tree_vs_chains(family, 20, TREE_PARENTS)
    _tree_vs_chains(family, 9, [-1, 0, 1, 2, 3, 4, 5, 6, -1, 8, 2, 10, 11, 12, 13, 14])


# --------------------------------------------------------------------------- rollback and keep
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_rollback_restores_state(family: str) -> None:
    model = native(family)
    prefix, junk, other = tokens(LONG, 1), tokens(5, 2), tokens(4, 3)
    cache = model.new_cache(64)
    model.forward(prefix, cache)
    model.forward(junk, cache)
    cache.rollback(5)
    assert cache.length == LONG
    got = model.forward(other, cache).logits
    close(got, chain_logits(model, prefix, other), atol=0.0)
    # rolling back everything gives a cache as good as new
    cache.rollback(cache.length)
    close(model.forward(other, cache).logits, hf_logits(family, other))


def test_rollback_rejects_invalid() -> None:
    model = native("llama")
    cache = model.new_cache(16)
    model.forward(tokens(3), cache)
    for bad in (-1, 4):
        with pytest.raises(ValueError):
            cache.rollback(bad)
    assert cache.length == 3
    cache.rollback(0)
    assert cache.length == 3
    with pytest.raises(ValueError):
        cache.keep(1, torch.tensor([0, 1, 2]))  # offsets past the cached entries
    with pytest.raises(ValueError):
        cache.keep(0, torch.tensor([0, 5]))  # offset 5 points past the cached entries
    assert cache.length == 3


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2"])
def test_keep_a_tree_path_equals_the_chain(family: str) -> None:
    model = native(family)
    info = build_tree(TREE_PARENTS)
    prefix_len = 12
    n = len(TREE_PARENTS)
    ids = tokens(prefix_len + 1 + n + 2, seed=7)
    prefix, root = ids[:prefix_len], ids[prefix_len : prefix_len + 1]
    nodes, nxt = ids[prefix_len + 1 : prefix_len + 1 + n], ids[-2:]
    for node in (10, 4, 8, 9):  # 10 = path [0, 2, 5, 7, 10]: not a prefix of the node order
        path = info.mask[node].nonzero().flatten()
        cache = model.new_cache(64)
        model.forward(prefix, cache)
        start = cache.length
        positions = start + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
        model.forward(
            torch.cat([root, nodes]), cache, positions=positions, tree_mask=info.mask_with_root
        )
        cache.keep(start, torch.cat([torch.zeros(1, dtype=torch.long), path + 1]))
        assert cache.length == start + 1 + path.numel()
        got = model.forward(nxt, cache).logits
        want = chain_logits(model, prefix, torch.cat([root, nodes[path], nxt]))[-2:]
        close(got, want)


def test_kvcache_keep_moves_rows() -> None:
    cache = KVCache(2, 1, 1, 10, torch.float32)
    for layer in cache.keys + cache.values:
        layer[0, :, 0] = torch.arange(10.0)
    cache.length = 8
    cache.keep(3, torch.tensor([0, 2, 4]))
    assert cache.length == 6
    for layer in cache.keys + cache.values:
        assert layer[0, :6, 0].tolist() == [0, 1, 2, 3, 5, 7]
    cache.keep(2, torch.tensor([0, 1]))  # a prefix: just a rollback
    assert cache.length == 4
    cache.keep(4, torch.zeros(0, dtype=torch.long))
    assert cache.length == 4
    cache.reset()
    assert cache.length == 0


# --------------------------------------------------------------------------- hidden, layers, heads
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_hidden_layers_match_transformers(family: str) -> None:
    model = native(family)
    ids = tokens(10, seed=4)
    L = model.num_layers
    out = model.forward(ids, model.new_cache(32), hidden_layers=(0, 2, L))
    assert set(out.hidden) == {0, 2, L}
    with torch.no_grad():
        ref = tiny_hf_model(family)(input_ids=ids[None], output_hidden_states=True)
    assert len(ref.hidden_states) == L + 1
    for layer in (0, 2, L):
        close(out.hidden[layer], ref.hidden_states[layer][0], atol=1e-4)
    # the final hidden state (already normed) projects straight to the logits
    close(torch.nn.functional.linear(out.hidden[L], model.lm_head), ref.logits[0], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_layer_subset(family: str) -> None:
    model = native(family)
    ids = tokens(12, seed=5)
    full = model.forward(ids, model.new_cache(32), hidden_layers=(2,))
    # the first two layers only: the logits of the residual after layer 2
    sub = model.forward(ids, model.new_cache(32), layers=[0, 1], hidden_layers=(1, 2))
    close(sub.hidden[2], full.hidden[2], atol=0.0)
    close(sub.logits, model.project(full.hidden[2]), atol=0.0)
    # a subset with gaps runs, incrementally too, and agrees with its own full-sequence run
    layers = [0, 2, 3]
    whole = model.forward(ids, model.new_cache(32), layers=layers).logits
    cache = model.new_cache(32)
    model.forward(ids[:7], cache, layers=layers)
    rest = model.forward(ids[7:], cache, layers=layers).logits
    close(rest, whole[7:])
    assert not torch.allclose(whole, model.forward(ids, model.new_cache(32)).logits)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_logits_rows_and_vocab_subset(family: str) -> None:
    model = native(family)
    ids = tokens(9, seed=6)
    full = model.forward(ids, model.new_cache(16)).logits  # [9, V]
    rows = torch.tensor([8, 2, 5])
    out = model.forward(ids, model.new_cache(16), logits_rows=rows)
    close(out.logits, full[rows])
    none = model.forward(ids, model.new_cache(16), logits_rows=torch.zeros(0, dtype=torch.long))
    assert none.logits is None
    vocab = torch.tensor([5, 0, 96, 40, 41])
    for subset in (model.reduced_head(vocab), vocab):
        got = model.forward(ids, model.new_cache(16), logits_rows=rows, vocab_subset=subset)
        close(got.logits, full[rows][:, vocab])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bfloat16_is_close_to_float32(family: str) -> None:
    m32, m16 = native(family), native(family, torch.bfloat16)
    assert m16.dtype == torch.bfloat16 and m16.embed.dtype == torch.bfloat16
    ids = tokens(LONG, seed=8)
    ref = m32.forward(ids, m32.new_cache(32)).logits
    cache = m16.new_cache(32)
    assert cache.keys[0].dtype == torch.bfloat16
    got = torch.cat([m16.forward(ids[:20], cache).logits, m16.forward(ids[20:], cache).logits])
    assert got.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 0.1 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


# --------------------------------------------------------------------------- transformers adapter
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_hf_adapter_incremental_and_rollback(family: str) -> None:
    model = HFModel(tiny_hf_model(family))
    assert not model.supports_trees and model.vocab_size == 97 and model.num_layers == 4
    ids = tokens(LONG, seed=9)
    ref = hf_logits(family, ids)
    cache = model.new_cache(64)
    first = model.forward(ids[:10], cache, logits_rows=torch.tensor([9]))
    close(first.logits, ref[9:10])
    rows = [model.forward(ids[i : i + 1], cache).logits for i in range(10, 16)]
    close(torch.cat(rows), ref[10:16])
    # draft junk, roll it back, continue: as if the junk never happened
    model.forward(tokens(5, seed=10), cache)
    cache.rollback(5)
    assert cache.length == 16
    close(model.forward(ids[16:], cache).logits, ref[16:])
    # keep() of a chain prefix is a rollback; anything else is refused
    model.forward(tokens(3, seed=11), cache)
    cache.keep(LONG, torch.tensor([0, 1]))
    assert cache.length == LONG + 2
    with pytest.raises(GenrefineError):
        cache.keep(LONG, torch.tensor([1]))
    with pytest.raises(ValueError):
        cache.rollback(cache.length + 1)
    out = model.forward(ids[:2], model.new_cache(8), hidden_layers=(0, model.num_layers))
    assert set(out.hidden) == {0, model.num_layers}


def test_hf_adapter_refuses_trees_and_native_only_options() -> None:
    model = HFModel(tiny_hf_model("llama"))
    cache = model.new_cache(16)
    info = build_tree([-1, -1])
    with pytest.raises(GenrefineError):
        model.forward(tokens(3), cache, tree_mask=info.mask_with_root)
    with pytest.raises(GenrefineError):
        model.forward(tokens(3), cache, layers=[0])
    with pytest.raises(GenrefineError):
        model.forward(tokens(3), cache, vocab_subset=torch.tensor([1, 2]))
    assert cache.length == 0


# --------------------------------------------------------------------------- config variants
def _variant_config(name: str):
    """Configs beyond tests.tiny's: rotary scalings, biases, Qwen's per-layer windows."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    if name == "llama3_rope":
        rope = dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        )
        return AutoConfig.for_model("llama", head_dim=8, rope_parameters=rope, **common)
    if name == "yarn_rope":
        rope = dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16
        )
        return AutoConfig.for_model("qwen2", rope_parameters=rope, **common)
    if name == "biases":
        return AutoConfig.for_model(
            "llama", head_dim=8, attention_bias=True, mlp_bias=True, **common
        )
    if name == "qwen3_windows":
        return AutoConfig.for_model(
            "qwen3", head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=1,
            **common,
        )
    if name == "gemma3_linear_rope":
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        }
        return AutoConfig.for_model(
            "gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters=rope, **common,
        )
    raise ValueError(name)


@pytest.mark.parametrize(
    "name", ["llama3_rope", "yarn_rope", "biases", "qwen3_windows", "gemma3_linear_rope"]
)
def test_config_variants_match_transformers(name: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = _variant_config(name)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2 if p.dim() >= 2 else 0.1)
    model = NativeModel.from_hf(hf)
    ids = tokens(40, seed=12)
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    cache = model.new_cache(64)
    got = [model.forward(ids[:30], cache).logits]
    got += [model.forward(ids[i : i + 1], cache).logits for i in range(30, 40)]
    close(torch.cat(got), ref)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("family", FAMILIES)
def test_model_config_json_round_trip(family: str) -> None:
    cfg = from_hf_config(tiny_hf_config(family))
    assert cfg.model_type == family
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert len(cfg.layer_windows) == len(cfg.layer_rope) == cfg.num_layers
    if family in ("mistral", "gemma2"):
        assert WINDOW in cfg.layer_windows


def test_unsupported_architecture() -> None:
    from transformers import AutoConfig

    with pytest.raises(UnsupportedArchitecture):
        from_hf_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(UnsupportedArchitecture):
        from_hf_config(
            AutoConfig.for_model("llama", hidden_act="gelu", hidden_size=16, num_attention_heads=2)
        )


# --------------------------------------------------------------------------- bitwise exactness
def _rows_unlike_decoding(m, g, trials: int, rows_for) -> list[tuple[int, int]]:
    """Random chain verifications on ``m`` (a prompt of 1..119 tokens, then ``rows_for(trial)``
    new tokens, drawn from ``g``): the (trial, row) pairs whose logits differ from one-token
    decoding of the same tokens."""
    from genrefine.engine import prefill

    bad = []
    for trial in range(trials):
        L = int(torch.randint(1, 120, (1,), generator=g))
        n = rows_for(trial)
        prompt = torch.randint(3, 97, (L,), generator=g)
        tokens = torch.randint(3, 97, (n,), generator=g)
        verify, decode = m.new_cache(256), m.new_cache(256)
        prefill(m, verify, prompt)
        prefill(m, decode, prompt)
        rows = m.forward(tokens, verify).logits  # [n, V]
        for r in range(n):
            if not torch.equal(rows[r], m.forward(tokens[r : r + 1], decode).logits[0]):
                bad.append((trial, r))
    return bad


@pytest.mark.parametrize("block", [64, 4])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_verification_rows_equal_sequential_decoding_bit_for_bit(
    family, block, tmp_path, monkeypatch
):
    """With batch-invariant matmuls (probed) and blocked attention, a forward over a chain or a
    tree gives each row exactly the logits of one-token decoding: greedy verification can never
    flip a near-tie that plain decoding would not. Small blocks put the tree across blocks."""
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    model = NativeModel.from_hf(tiny_hf_model(family), dtype=torch.bfloat16)
    if not model.bitwise_exact:
        pytest.skip("this machine's bfloat16 matmuls could not be made batch-invariant")
    model.attn_block = block
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 97, (LONG,), generator=g)  # past the sliding window
    seq = torch.randint(3, 97, (9,), generator=g)
    cache = model.new_cache(64)
    model.forward(prefix, cache, exact=False)
    single = torch.cat([model.forward(seq[i : i + 1], cache).logits for i in range(9)])
    cache.rollback(9)
    assert torch.equal(model.forward(seq, cache).logits, single)
    cache.rollback(9)
    # a tree whose second branch is the sequence: root -> [x, y] and root -> seq[1:4]
    parents = torch.tensor([-1, 0, -1, 2, 3])
    info = build_tree(parents)
    toks = torch.cat([seq[:1], torch.tensor([5, 6]), seq[1:4]])
    pos = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
    out = model.forward(toks, cache, positions=pos, tree_mask=info.mask_with_root).logits
    assert torch.equal(out[[0, 3, 4, 5]], single[:4])


def test_bf16_chain_verification_rows_equal_one_token_decoding(tmp_path, monkeypatch) -> None:
    """Random chain verifications (1..64 rows) on a tiny bf16 Llama, each row compared bit for
    bit with one-token decoding of the same tokens. The matmul probe draws its inputs from the
    model's own activations and from many random rows, every row count 1..64; with one random
    input per shape it passed splits under which 4 of these rows differed."""

    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))  # probe afresh
    m = NativeModel.from_hf(tiny_hf_model("llama"), dtype=torch.bfloat16)
    if not m.bitwise_exact:
        pytest.skip("this machine's bfloat16 matmuls could not be made batch-invariant")
    g = torch.Generator().manual_seed(0)
    # root + draft: 2..64 rows
    bad = _rows_unlike_decoding(m, g, 60, lambda trial: int(torch.randint(1, 64, (1,), generator=g)) + 1)
    assert not bad


# --------------------------------------------------------------------------- quantized weights
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_quantized_rows_equal_one_token_decoding_bit_for_bit(family, tmp_path, monkeypatch) -> None:
    """On quantized weights (three formats, mixed in the fused projections) the matmuls are
    batch-invariant by construction, with no probe: random chains of 1..64 rows and a tree give
    every row exactly the logits of one-token decoding."""

    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    m = quantized_native(tiny_hf_model(family))
    assert m.quantized and m.bitwise_exact and not m._splits
    g = torch.Generator().manual_seed(0)
    bad = _rows_unlike_decoding(
        m, g, 24, lambda trial: 64 if trial == 0 else int(torch.randint(1, 65, (1,), generator=g))
    )
    assert not bad
    # a tree whose second branch is a chain: root -> [x, y] and root -> seq[1:4]
    seq = torch.randint(3, 97, (4,), generator=g)
    cache = m.new_cache(256)
    m.forward(torch.randint(3, 97, (LONG,), generator=g), cache, exact=False)
    single = torch.cat([m.forward(seq[i : i + 1], cache).logits for i in range(4)])
    cache.rollback(4)
    info = build_tree(torch.tensor([-1, 0, -1, 2, 3]))
    toks = torch.cat([seq[:1], torch.tensor([5, 6]), seq[1:4]])
    pos = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
    out = m.forward(toks, cache, positions=pos, tree_mask=info.mask_with_root).logits
    assert torch.equal(out[[0, 3, 4, 5]], single)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gemma2", "qwen2"])
def test_one_call_layers_give_the_op_by_op_bits(family, tmp_path, monkeypatch) -> None:
    """The fused C++ layers against the runtime's op-by-op path on the same quantized weights:
    every layer in one call (kernels.run_layer_stack, a whole forward) and one call per layer
    (kernels.fused_layer, when a forward returns a middle layer's hidden state): prefill, a
    chain and a tree give the same logits and the same cache, bit for bit, and the bench's phase
    timing still sees matmuls and attention. Models the C++ kernels do not cover keep the
    op-by-op path: biases (qwen2), heads of 8 (this llama)."""
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    m = quantized_native(tiny_hf_model(family))
    assert m.fused_layers == (family not in ("qwen2", "llama"))
    if not m.fused_layers:
        return
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 97, (LONG,), generator=g)
    chain = torch.randint(3, 97, (7,), generator=g)
    info = build_tree(torch.tensor([-1, 0, 0, 1, 2, 4]))
    tree_toks = torch.randint(3, 97, (6,), generator=g)

    def run(fused: bool, per_layer: bool):
        m.fused_layers = fused
        hidden = (1,) if per_layer else ()
        cache = m.new_cache(256)
        m.forward(prompt, cache, exact=False)
        a = m.forward(chain[:1], cache, hidden_layers=hidden).logits
        b = m.forward(chain[1:], cache, hidden_layers=hidden).logits
        pos = cache.length + info.depth
        t = m.forward(tree_toks, cache, positions=pos, tree_mask=info.mask, hidden_layers=hidden).logits
        return a, b, t, torch.stack(cache.keys), torch.stack(cache.values)

    plain = run(False, False)
    for fused in (run(True, False), run(True, True)):
        for x, y in zip(fused, plain):
            assert torch.equal(x, y)
    m.fused_layers = True
    for hidden in ((), (1,)):
        m.phase_seconds = {}
        cache = m.new_cache(64)
        m.forward(prompt[:3], cache, hidden_layers=hidden)
        assert m.phase_seconds["weights"] > 0 and m.phase_seconds["attention"] > 0
    m.phase_seconds = None


def test_quantized_model_is_close_to_float32() -> None:
    """Quantization error, not a bug: logits stay near the float model's, and the weights
    dequantize to within one quantization step of the float ones."""
    hf = tiny_hf_model("llama")
    q, f = quantized_native(hf, ("q8_0",)), NativeModel.from_hf(hf)
    toks = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(1))
    a = q.forward(toks, q.new_cache(32)).logits
    b = f.forward(toks, f.new_cache(32)).logits
    assert float((a - b).abs().max()) < 0.1 * float(b.abs().max())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_float32_rows_take_the_one_call_norm_and_rotary_kernels(family, monkeypatch) -> None:
    """Float32 models on the CPU run RMSNorm and the rotary embedding through the C++ one-call
    kernels where the extension builds; the logits stay those of the op-by-op path up to float
    rounding, and the rotary kernel gives that path's bits."""
    import genrefine.models.runtime as rt
    from genrefine.kernels import load_extension

    m = native(family)
    if not load_extension():
        assert not m.row_kernels  # the op-by-op path, as before
        return
    assert m.row_kernels
    calls = {"rmsnorm": 0, "rope": 0}
    for name in calls:
        real = getattr(rt, name)

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        monkeypatch.setattr(rt, name, counted)
    ids = tokens(9)
    got = m.forward(ids, m.new_cache(16)).logits
    assert calls["rmsnorm"] > 0 and calls["rope"] > 0
    x = torch.randn(2, 5, m.config.head_dim)
    cos, sin = torch.randn(5, m.config.head_dim), torch.randn(5, m.config.head_dim)
    fast = m._rope(x, cos, sin)
    monkeypatch.setattr(m, "row_kernels", False)  # the shared cached model gets its kernels back
    ref = m.forward(ids, m.new_cache(16)).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, m._rope(x, cos, sin))
