"""``--dtype q8_0``: a float checkpoint's projections rounded to Q8_0 when loaded and run on the
exact integer kernels (genrefine.kernels), and the errors around it."""

from __future__ import annotations

import pytest
import torch

import genrefine
from genrefine.errors import ModelLoadError
from genrefine.models.loading import load_model
from genrefine.models.quant import QuantWeight

from tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cache_dir):
    return save_tiny_model_dir(tmp_path_factory.mktemp("q8") / "tiny-llama", "llama")


def test_q8_0_rounds_the_projections_and_keeps_the_embedding_float(model_dir) -> None:
    q, _ = load_model(str(model_dir), dtype="q8_0", quiet=True)
    f, _ = load_model(str(model_dir), dtype="float32", quiet=True)
    assert q.weights_format == "quantized:Q8_0" and f.weights_format == "float32"
    assert isinstance(q.lm_head, QuantWeight)
    assert all(isinstance(w, QuantWeight) for lw in q.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down))
    assert torch.is_tensor(q.embed) and torch.equal(q.embed, f.embed)  # looked up, not multiplied
    tokens = torch.arange(3, 40)
    lq = q.forward(tokens, q.new_cache(64)).logits
    lf = f.forward(tokens, f.new_cache(64)).logits
    # close to the float model (a scale per 32 weights, int8 activations) but not the same
    rel = float((lq - lf).norm() / lf.norm())
    assert 0 < rel < 0.05, rel


def test_q8_0_greedy_methods_equal_its_own_ar(model_dir) -> None:
    gen = genrefine.load(str(model_dir), dtype="q8_0", quiet=True)
    ref = gen.generate("hello hello hello", max_new_tokens=40, method="ar").token_ids
    for method in ("pld", "jacobi"):
        assert gen.generate("hello hello hello", max_new_tokens=40, method=method).token_ids == ref, method


def test_q8_0_says_what_to_do_where_it_does_not_apply(model_dir, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="native backend"):
        load_model(str(model_dir), dtype="q8_0", backend="hf", quiet=True)
    with pytest.raises(ModelLoadError, match="--dtype gguf"):
        load_model(None, dtype="q8_0", quiet=True)  # the embedded GGUF file
    with pytest.raises(ModelLoadError, match="native runtime"):
        load_model(str(save_tiny_model_dir(tmp_path / "gpt2", "gpt2")), dtype="q8_0", quiet=True)


def test_q8_0_needs_input_sizes_in_blocks_of_32(tmp_path, cache_dir) -> None:
    from transformers import AutoModelForCausalLM

    from tiny import byte_tokenizer, tiny_hf_config

    cfg = tiny_hf_config("llama", vocab=len(byte_tokenizer()))
    cfg.hidden_size, cfg.head_dim = 48, 12  # 48 inputs: one block of 32 and a piece
    d = tmp_path / "odd"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d))
    byte_tokenizer().save_pretrained(str(d))
    with pytest.raises(ModelLoadError, match="multiples of 32"):
        load_model(str(d), dtype="q8_0", quiet=True)
    load_model(str(d), dtype="float32", quiet=True)  # the same checkpoint loads as floats
