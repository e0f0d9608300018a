"""Tiny random-weight models of every natively supported family, built in the test process."""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2")


def tiny_hf_config(family: str, vocab: int = 97, window: int = 6, layers: int = 4):
    """A transformers config small enough to build in milliseconds."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return AutoConfig.for_model("llama", head_dim=8, tie_word_embeddings=False, **common)
    if family == "mistral":
        return AutoConfig.for_model("mistral", head_dim=8, sliding_window=window, **common)
    if family == "qwen2":
        return AutoConfig.for_model(
            "qwen2",
            tie_word_embeddings=True,
            use_sliding_window=False,
            **common,
        )
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", head_dim=16, tie_word_embeddings=False, **common)
    if family == "gemma3_text":
        types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        return AutoConfig.for_model(
            "gemma3_text",
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=window,
            layer_types=types[:layers],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            **common,
        )
    if family == "gemma2":
        return AutoConfig.for_model(
            "gemma2",
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=window,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            **common,
        )
    raise ValueError(family)


@functools.lru_cache(maxsize=None)
def tiny_hf_model(family: str, seed: int = 0, vocab: int = 97):
    """A transformers model with random weights (cached per family within a test session)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, vocab=vocab)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init gives near-uniform logits; sharpen them so greedy decoding is meaningful
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def byte_tokenizer(offset: int = 0):
    """A byte-level tokenizer (256 byte tokens + <pad> <bos> <eos>), built offline.

    ``offset``: that many unused tokens between the special tokens and the bytes (another
    byte-level vocabulary: the same bytes under other ids).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for i in range(offset):
        vocab[f"<unused{i}>"] = len(vocab)
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


CHARS = "\n" + "".join(chr(c) for c in range(0x20, 0x7D))  # newline, space .. "|": 94 characters


def char_tokenizer(order_seed: int | None = None, chars: str = CHARS):
    """One token per character (ids 3.. after <pad> <bos> <eos>; 97 ids for :data:`CHARS`), in
    the order of ``chars`` or shuffled by ``order_seed`` (another vocabulary, the same text).
    Characters outside ``chars`` are dropped when encoding."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    order = list(chars)
    if order_seed is not None:
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(order_seed))
        order = [order[i] for i in perm.tolist()]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in order:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def reindexed(hf_model, src_tokenizer, dst_tokenizer):
    """A copy of ``hf_model`` whose embedding and output rows follow ``dst_tokenizer``'s ids:
    the same model for another vocabulary of the same tokens (``dst`` id j gets the row of the
    ``src`` id of j's token)."""
    import copy

    src, dst = src_tokenizer.get_vocab(), dst_tokenizer.get_vocab()
    assert set(src) == set(dst) and len(src) == hf_model.config.vocab_size
    rows = torch.empty(len(dst), dtype=torch.long)
    for token, j in dst.items():
        rows[j] = src[token]
    out = copy.deepcopy(hf_model)
    with torch.no_grad():
        emb = out.get_input_embeddings().weight
        emb.copy_(hf_model.get_input_embeddings().weight[rows])
        head = out.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head.copy_(hf_model.get_output_embeddings().weight[rows])
    return out.eval()


class ShallowModel:
    """The first ``k`` layers of a native model (with its final norm and head) as a model of its
    own, with caches of its own: what ``genrefine draft-model shrink`` writes, without a file."""

    def __init__(self, model, k: int) -> None:
        self.model, self.layers = model, list(range(k))
        for attr in ("vocab_size", "max_context", "hidden_size", "device", "dtype"):
            setattr(self, attr, getattr(model, attr))
        self.num_layers = k
        self.name = f"{getattr(model, 'name', 'model')}[:{k}]"

    def new_cache(self, capacity=None):
        return self.model.new_cache(capacity)

    def forward(self, tokens, cache, **kw):
        return self.model.forward(tokens, cache, layers=self.layers, **kw)

    def reduced_head(self, ids):
        return self.model.reduced_head(ids)


def save_tiny_model_dir(path, family: str = "llama", seed: int = 0):
    """Write a tiny random model + byte tokenizer as a Hugging Face directory; returns path."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    if family == "gpt2":  # an architecture without a native runtime
        from transformers import GPT2Config

        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=1, eos_token_id=2,
        )
    else:
        cfg = tiny_hf_config(family, vocab=len(tok))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


_DRAFTERS: dict = {}


def tiny_drafter(model, kind: str) -> str:
    """A drafter folder of ``kind`` (heads or eagle) for ``model`` (a tiny native model with 97
    ids), trained for 2 steps on random text: what methods that need a trained drafter load in
    tests that only check losslessness. Cached per model and kind for the session."""
    import tempfile

    from genrefine.train.loop import TrainConfig
    from genrefine.train.run import DrafterSpec, run_training

    key = (id(model), kind)
    if key not in _DRAFTERS:
        g = torch.Generator().manual_seed(0)
        texts = ["".join(CHARS[int(i)] for i in torch.randint(0, len(CHARS), (400,), generator=g))
                 for _ in range(4)]
        out = tempfile.mkdtemp(prefix=f"genrefine-tiny-{kind}-")
        spec = DrafterSpec(kind=kind, seq_len=32, max_tokens=1600, tree_nodes=6)
        cfg = TrainConfig(steps=2, warmup=1, batch=2)
        run_training(model, char_tokenizer(), texts, spec, cfg, out, progress=False, eval_prompts=0)
        _DRAFTERS[key] = out
    return _DRAFTERS[key]


def without_exact_rows(family: str, dtype: torch.dtype = torch.bfloat16):
    """The tiny native model of ``family`` as a machine whose invariance probe fails would build
    it: ``bitwise_exact`` is False (the fallback of every bitwise test)."""
    import pytest

    import genrefine.models.runtime as runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "probe_attention", lambda *args, **kwargs: False)
        m = runtime.NativeModel.from_hf(tiny_hf_model(family), dtype=dtype)
    assert not m.bitwise_exact
    return m


def quantized_native(hf_model, formats=("q8_0", "q4_k", "q6_k")):
    """The native runtime on a tiny transformers model's weights quantized (genrefine.models.quant),
    cycling through ``formats`` so that fused projections hold several formats."""
    from genrefine.models.config import from_hf_config, rope_tables
    from genrefine.models.quant import quantize_linears
    from genrefine.models.runtime import NativeModel

    cfg = from_hf_config(hf_model.config)
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    q = quantize_linears(sd, formats)
    rope = rope_tables(hf_model.config, cfg.layer_rope)
    return NativeModel.from_state_dict(cfg, sd, rope, torch.float32, quantized=q)
