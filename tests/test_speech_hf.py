"""MusicGen through transformers, frame-level speculation (genrefine.modalities.speech.hf).

Tiny random-weight models built here (nothing is downloaded)."""

from __future__ import annotations

import itertools

import pytest
import torch

from genrefine.errors import ConfigError
from genrefine.modalities.speech.hf import (
    HFSpeechGenerator,
    delay_pattern,
    greedy_accept,
    lookup_columns,
    speculative_columns,
    undelay,
)

transformers = pytest.importorskip("transformers")

K, V = 3, 6  # codebooks, codes per codebook (pad id = V)


def tiny_musicgen(seed: int = 0, vocab: int = V, codebooks: int = K):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    cfg = MusicgenDecoderConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        num_codebooks=codebooks, max_position_embeddings=128, pad_token_id=vocab,
        bos_token_id=vocab, decoder_start_token_id=vocab,
    )
    torch.manual_seed(seed)
    return MusicgenForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gen():
    return HFSpeechGenerator(tiny_musicgen())


def hf_greedy(hf, frames: int) -> torch.Tensor:
    """transformers' own greedy generate: [frames, K]."""
    k = hf.config.num_codebooks
    start = torch.full((k, 1), hf.config.pad_token_id)
    out = hf.generate(start, do_sample=False, max_length=frames + k, num_return_sequences=1)
    return out[0].T


def test_delay_pattern_round_trip():
    f = delay_pattern(4, 3, pad=9)  # [7, 3]
    assert f.shape == (7, 3)
    assert f[:, 0].tolist() == [9, -1, -1, -1, -1, 9, 9]
    assert f[:, 2].tolist() == [9, 9, 9, -1, -1, -1, -1]
    cols = torch.arange(21).reshape(7, 3)
    fr = undelay(cols, 4)
    assert fr[0].tolist() == [cols[1, 0], cols[2, 1], cols[3, 2]]


@pytest.mark.parametrize("method", ["ar", "pld", "jacobi"])
def test_greedy_matches_transformers_generate(gen, method):
    frames = 24
    ref = hf_greedy(gen.model.hf, frames)
    out = gen.generate(method=method, max_frames=frames, temperature=0.0, draft_len=4)
    assert out.codes.shape == (frames, K)
    assert torch.equal(out.codes, ref)
    assert out.stats.columns == frames + K - 1
    if method == "ar":
        assert out.stats.steps == frames + K - 1


def test_speculation_saves_forwards_on_repetitive_model():
    # a random tiny model settles into loops quickly: drafts over columns get accepted
    g = HFSpeechGenerator(tiny_musicgen(seed=1, vocab=3))
    ar = g.generate(method="ar", max_frames=40, temperature=0.0)
    for method in ("pld", "jacobi"):
        out = g.generate(method=method, max_frames=40, temperature=0.0)
        assert torch.equal(out.codes, ar.codes)
        assert out.stats.steps < ar.stats.steps, method
        assert out.stats.accepted > 0


def test_greedy_accept_every_codebook():
    choice = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert greedy_accept(choice, torch.tensor([[1, 2], [3, 4]])) == 2
    assert greedy_accept(choice, torch.tensor([[1, 2], [3, 0]])) == 1  # one codebook differs
    assert greedy_accept(choice, torch.tensor([[0, 2], [3, 4]])) == 0


def test_lookup_columns():
    cols = torch.tensor([[1, 1], [2, 2], [3, 3], [1, 1], [2, 2]])
    assert lookup_columns(cols, 3, 4).tolist() == [[3, 3], [1, 1], [2, 2]]
    assert lookup_columns(cols, 3, 1).tolist() == [[3, 3]]
    # a column matching in one codebook only is no match
    assert lookup_columns(torch.tensor([[1, 1], [2, 2], [1, 5]]), 2, 2).shape == (0, 2)


def _column_law(kernel, probs, draft, forced, n=20000):
    g = torch.Generator().manual_seed(0)
    counts: dict = {}
    for _ in range(n):
        _, out = kernel(probs, draft, forced, g)
        key = tuple(out[0].tolist())
        counts[key] = counts.get(key, 0) + 1
    return {k: c / n for k, c in counts.items()}


def _redraw_from_p(probs, draft, forced, g):
    """A planted bug: on rejection, redraw from p_k (not the residual)."""
    pd = probs[0].gather(-1, draft[0][:, None]).squeeze(-1)
    u = torch.rand(pd.shape, generator=g)
    drawn = torch.multinomial(probs[0], 1, generator=g).squeeze(-1)
    return 0, torch.where(u < pd, draft[0], drawn)[None]


@pytest.mark.parametrize("kernel,exact", [(speculative_columns, True), (_redraw_from_p, False)])
def test_column_sampling_law_is_product_of_codebooks(kernel, exact):
    # first emitted column must follow prod_k p_k exactly (per-codebook rule, module docstring)
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],
                          [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]])  # [d + 1 = 2, K = 2, V = 3]
    draft = torch.tensor([[0, 1]])
    forced = torch.full((2, 2), -1)
    law = _column_law(kernel, probs, draft, forced)
    tv = 0.5 * sum(abs(law.get((x, y), 0.0) - float(probs[0, 0, x] * probs[0, 1, y]))
                   for x, y in itertools.product(range(3), range(3)))
    assert (tv < 0.02) == exact, tv


def test_sampling_forced_codes_and_acceptance_rate():
    probs = torch.full((2, 2, 3), 1 / 3)
    draft = torch.tensor([[2, 9]])  # codebook 1 forced to pad 9
    forced = torch.tensor([[-1, 9], [-1, 9]])
    g = torch.Generator().manual_seed(1)
    acc = 0
    for _ in range(3000):
        a, out = speculative_columns(probs, draft, forced, g)
        assert out[:, 1].tolist() == [9] * (a + 1)
        acc += a
    assert abs(acc / 3000 - 1 / 3) < 0.05  # P(accept) = p_0(2), the forced codebook always accepts


def test_sampling_distribution_matches_ar_end_to_end():
    # two codebooks, two codes, two frames: 16 outcomes; exact law from the model by enumeration
    from genrefine.modalities.speech.hf import Conditioning, decode_columns
    from genrefine.sampling import logits_to_probs
    from genrefine.types import SamplingParams

    g = HFSpeechGenerator(tiny_musicgen(seed=3, vocab=2, codebooks=2))
    m, frames = g.model, 2
    params = SamplingParams(temperature=1.0, seed=0)
    forced = delay_pattern(frames, 2, m.pad)
    exact: dict = {}
    free = [(t, k) for t in range(1, frames + 2) for k in range(2) if forced[t, k] == -1]
    for vals in itertools.product(range(2), repeat=len(free)):
        cols = forced.clone()
        for (t, k), v in zip(free, vals):
            cols[t, k] = v
        logits = m.forward(cols[:-1], m.new_cache())  # [L - 1, K, V]
        p = logits_to_probs(logits, params)
        prob = 1.0
        for (t, k), v in zip(free, vals):
            prob *= float(p[t - 1, k, v])
        key = tuple(undelay(cols, frames).flatten().tolist())
        exact[key] = exact.get(key, 0.0) + prob
    n = 1500
    counts: dict = {}
    for s in range(n):
        out = g.generate(method="jacobi", max_frames=frames, temperature=1.0, seed=s, draft_len=3)
        key = tuple(out.codes.flatten().tolist())
        counts[key] = counts.get(key, 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())
    assert abs(sum(exact.values()) - 1) < 1e-5
    assert tv < 0.08, tv


def test_seeded_sampling_repeats(gen):
    a = gen.generate(method="pld", max_frames=12, temperature=1.0, seed=7)
    b = gen.generate(method="pld", max_frames=12, temperature=1.0, seed=7)
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("method", ["sps", "medusa", "nope"])
def test_other_methods_refused(gen, method):
    with pytest.raises(ConfigError, match="ar, pld, jacobi"):
        gen.generate(method=method, max_frames=4)


def test_text_prompt_needs_text_encoder(gen):
    with pytest.raises(ConfigError, match="no text encoder"):
        gen.generate([1, 2, 3], max_frames=4)


def tiny_conditional_musicgen():
    """A text-conditioned MusicGen (T5 encoder, EnCodec codec) small enough for the fast suite."""
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5Config)

    dec = MusicgenDecoderConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        num_codebooks=2, max_position_embeddings=64, pad_token_id=8, bos_token_id=8,
        decoder_start_token_id=8,
    )
    t5 = T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    codec = EncodecConfig(codebook_size=8, num_filters=2, hidden_size=8, upsampling_ratios=[2, 2],
                          codebook_dim=8, target_bandwidths=[2.0], sampling_rate=400,
                          num_lstm_layers=1, chunk_length_s=None)
    cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=dec.to_dict())
    torch.manual_seed(0)
    hf = MusicgenForConditionalGeneration(cfg).eval()
    hf.generation_config.decoder_start_token_id = 8
    hf.generation_config.pad_token_id = 8
    return hf


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("method", ["ar", "pld", "jacobi"])
def test_text_conditioned_greedy_matches_transformers_audio(method, guidance):
    # guidance 3 runs the batched conditional + null rows; this tiny model's text effect is too
    # small to change an argmax, so it does not tell a wrong guidance mix from a right one
    hf = tiny_conditional_musicgen()
    prompt, frames = [3, 4, 5, 1], 8
    ref = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_length=frames + 2,
                      num_return_sequences=1, guidance_scale=guidance)  # audio [1, 1, samples]
    g = HFSpeechGenerator(hf)
    out = g.generate(prompt, method=method, max_frames=frames, temperature=0.0, guidance_scale=guidance)
    assert out.codes.shape == (frames, 2)
    assert torch.equal(g.decode(out.codes), ref[0, 0])
