"""Janus (transformers) as an image model: a tiny random-weight checkpoint built in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import genrefine
from genrefine.cli import main
from genrefine.errors import ConfigError
from genrefine.modalities.image.janus import HFImageGenerator, JanusImageModel

from tiny import byte_tokenizer

CODES = 64  # the VQ codebook
GRID = 4  # codes per side: 16 codes per image
SIDE = 16  # pixels per side after the VQ decoder (two 2x upsamplings of 4)


def save_tiny_janus(path, seed: int = 0):
    """A tiny JanusForConditionalGeneration with a byte tokenizer (+ <begin_of_image>), saved."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<begin_of_image>"]})
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=GRID * 8,
                  patch_size=8, projection_dim=32, num_image_tokens=GRID * GRID, mlp_ratio=2.0)
    vq = dict(embed_dim=8, num_embeddings=CODES, latent_channels=32, base_channels=32,
              channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=32,
              image_token_embed_dim=32, num_hidden_layers=2)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(
        JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=boi - 1))
    # random init gives near-uniform logits; sharpen them so greedy decoding is meaningful
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("language_model" in name or "generation_" in name):
                p.normal_(0.0, 0.2)
    model.generation_config.generation_kwargs = {"boi_token_id": boi}
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return save_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny-janus")


@pytest.fixture(scope="module")
def gen(janus_dir):
    return genrefine.load_image(str(janus_dir))


PROMPT = "a red fox"


def test_load_image_gives_the_janus_generator(gen, janus_dir) -> None:
    assert isinstance(gen, HFImageGenerator)
    assert gen.tokens_per_image == GRID * GRID
    assert gen.model.vocab_size == CODES and gen.model.supports_trees is False
    assert gen.model.token_latents.shape == (CODES, 8)
    assert genrefine.load_image(str(janus_dir)).model.scale == 5.0  # Janus's default guidance


def test_prompt_layout_and_unconditional_ids(gen) -> None:
    ids = gen.prompt_ids(PROMPT)
    text = gen.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids == [CODES + t for t in [gen.bos, *text, gen.boi]]
    u = gen.model.unconditional(torch.tensor(ids + [5, 7]))
    pad = CODES + gen.pad
    assert u.tolist() == [CODES + gen.bos] + [pad] * len(text) + [CODES + gen.boi, 5, 7]


def test_the_checkpoints_chat_template_wraps_the_prompt(gen, janus_dir) -> None:
    import copy

    tok = copy.deepcopy(gen.tokenizer)
    tok.chat_template = ("{% for m in messages %}<|User|>: {{ m['content'][0]['text'] }}\n\n"
                         "{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}")
    chat = HFImageGenerator(gen.hf, tok, janus_dir)
    text = tok(f"<|User|>: {PROMPT}\n\n<|Assistant|>:", add_special_tokens=False)["input_ids"]
    assert chat.prompt_ids(PROMPT) == [CODES + t for t in [gen.bos, *text, gen.boi]]


def test_adapter_logits_equal_a_direct_hf_computation(gen) -> None:
    hf = gen.hf
    model = gen.base
    assert isinstance(model, JanusImageModel)
    text = torch.tensor([gen.bos, *gen.tokenizer(PROMPT, add_special_tokens=False)["input_ids"], gen.boi])
    codes = torch.tensor([3, 17, 42, 0, 63])
    with torch.no_grad():
        emb = torch.cat([hf.get_input_embeddings()(text),
                         hf.prepare_embeddings_for_image_generation(codes)])
        h = hf.model.language_model(inputs_embeds=emb[None]).last_hidden_state[0]
        ref = hf.model.generation_head(h)  # [L + 5, C]
    cache = model.new_cache(64)
    ids = torch.tensor(gen.prompt_ids(PROMPT))
    a = model.forward(ids, cache).logits
    b = model.forward(codes[:2], cache).logits  # the rest one chunk at a time, as decoding does
    c = model.forward(codes[2:], cache).logits
    got = torch.cat([a, b, c])
    assert got.shape == (len(text) + 5, CODES) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    cache.rollback(3)  # rolled back and redone: the same logits
    torch.testing.assert_close(model.forward(codes[2:], cache).logits, ref[-3:], rtol=1e-4, atol=1e-4)


def test_guided_logits_follow_janus_cfg(gen) -> None:
    """u + s * (c - u), u from the prompt padded as Janus's generate pads it."""
    hf = gen.hf
    ids = gen.prompt_ids(PROMPT)
    gen.model.scale = 3.0
    cache = gen.model.new_cache(64)
    got = gen.model.forward(torch.tensor(ids), cache, logits_rows=torch.tensor([len(ids) - 1])).logits
    text = torch.tensor([i - CODES for i in ids])
    uncond = torch.where((text != gen.bos) & (text != gen.boi), gen.pad, text)
    with torch.no_grad():
        lm = hf.model.language_model
        c = hf.model.generation_head(lm(inputs_embeds=hf.get_input_embeddings()(text)[None]).last_hidden_state[0, -1])
        u = hf.model.generation_head(lm(inputs_embeds=hf.get_input_embeddings()(uncond)[None]).last_hidden_state[0, -1])
    gen.model.scale = gen.default_cfg
    torch.testing.assert_close(got[0], u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("method", ["sjd", "mc-sjd", "jacobi"])
def test_greedy_lossless_methods_give_ar_codes(gen, method, cfg) -> None:
    prompts = [PROMPT, "a blue bird over a lake"]
    ref = gen.generate(prompts, method="ar", temperature=0, cfg=cfg, seed=0)
    out = gen.generate(prompts, method=method, temperature=0, cfg=cfg, seed=0)
    assert out.codes == ref.codes
    assert len(set(map(tuple, ref.codes[0:1] + ref.codes[1:2]))) == 2  # the prompts matter
    assert np.array_equal(out.images, ref.images)


def test_sampling_repeats_with_a_seed_and_images_are_rgb(gen) -> None:
    a = gen.generate([PROMPT, PROMPT], method="sjd", seed=3)
    b = gen.generate([PROMPT, PROMPT], method="sjd", seed=3)
    assert a.codes == b.codes and a.codes[0] != a.codes[1]  # image i uses seed + i
    assert a.images.dtype == np.uint8 and a.images.shape == (2, SIDE, SIDE, 3)
    assert a.prompts == [PROMPT, PROMPT] and a.classes == []
    assert a.summary()["images"] == 2


@pytest.mark.parametrize("method", ["lantern", "gsd"])
def test_latent_methods_run(gen, method) -> None:
    out = gen.generate(PROMPT, method=method, seed=1)
    assert len(out.codes[0]) == GRID * GRID and all(0 <= c < CODES for c in out.codes[0])
    assert out.images.shape == (1, SIDE, SIDE, 3)


def test_bad_prompts_are_one_line_errors(gen) -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        gen.generate("  ")
    with pytest.raises(ConfigError, match="at least one"):
        gen.generate([])
    with pytest.raises(ConfigError, match="cfg"):
        gen.generate(PROMPT, cfg=-1.0)


def test_cli_generate_with_a_prompt_writes_an_rgb_png(janus_dir, tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    rc = main(["image", "generate", "--model", str(janus_dir), "--prompt", PROMPT, "--n", "4",
               "--method", "sjd", "--out", str(out), "--no-progress"])
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * (SIDE + 1) + 1, 2 * (SIDE + 1) + 1, 3)
    assert "4 images" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from genrefine.train.image import train_image

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENREFINE_CACHE", str(tmp_path_factory.mktemp("genrefine-cache")))
        out = tmp_path_factory.mktemp("image") / "bundle"
        train_image(out, tiny=True, progress=False)
        yield out


@pytest.mark.parametrize("which,argv,needle", [
    ("janus", ["--class", "3"], "--prompt"),
    ("janus", [], "--prompt"),
    ("bundle", ["--prompt", "a fox"], "--class"),
])
def test_cli_prompt_and_class_mismatches_are_one_line_errors(
        request, tmp_path, capsys, which, argv, needle) -> None:
    d = request.getfixturevalue("janus_dir" if which == "janus" else "bundle_dir")
    capsys.readouterr()  # what building the fixture printed
    rc = main(["image", "generate", "--model", str(d), "--out", str(tmp_path / "g.png"),
               "--no-progress", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bench_refuses_a_janus_model(janus_dir, capsys) -> None:
    assert main(["image", "bench", "--model", str(janus_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bench" in err and "Traceback" not in err


def test_serve_refuses_a_janus_image_model(janus_dir, capsys) -> None:
    """The image route takes class names; a Janus model is refused at start, not at a request."""
    capsys.readouterr()
    assert main(["serve", "--image-model", str(janus_dir)]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "Traceback" not in err


def test_guided_model_needs_classes_or_an_unconditional_function(gen) -> None:
    from genrefine.models.guided import GuidedModel

    with pytest.raises(ConfigError, match="unconditional"):
        GuidedModel(gen.base, n_codes=CODES, scale=2.0)


def test_q8_0_is_refused_for_janus_in_one_line(janus_dir, tmp_path, capsys) -> None:
    """--dtype q8_0 rounds genrefine's own bundles; Janus runs through transformers."""
    capsys.readouterr()
    rc = main(["image", "generate", "--model", str(janus_dir), "--prompt", "a cat", "--dtype", "q8_0",
               "--out", str(tmp_path / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "genrefine's own bundles" in err and "Traceback" not in err
