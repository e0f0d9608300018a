"""The embedded image model's pieces: glyph data, VQ tokenizer, classifier, quality metrics,
the bundle on disk, the trainer (tiny sizes) and the shipped bundle."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from genrefine.errors import ConfigError
from genrefine.modalities.image.bundle import EMBEDDED_IMAGE_DIR, load_bundle, save_bundle
from genrefine.modalities.image.data import CLASSES, font_paths, render_glyphs
from genrefine.modalities.image.quality import feature_stats, frechet_distance, image_quality
from genrefine.train.image import TINY, choose_defaults, sample_codes, train_image


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "tiny"
    train_image(out, tiny=True, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_bundle(tiny_dir)


def _hf(bundle):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(bundle.transformer_dir), dtype=torch.float32).eval()


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------ data
def test_render_glyphs_deterministic_balanced():
    x, y = render_glyphs(3, seed=5)
    x2, y2 = render_glyphs(3, seed=5)
    assert x.shape == (30, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y, minlength=10).tolist() == [3] * 10
    assert all(int(img.max()) > 100 for img in x)  # every glyph drew something
    x3, _ = render_glyphs(3, seed=6)
    assert not torch.equal(x, x3)


def test_fonts_exclude_symbol_fonts():
    names = [p.rsplit("/", 1)[-1] for p in font_paths()]
    assert len(names) >= 10
    assert not any(s in n for n in names for s in ("cmex10", "cmsy10", "LastResort", "Sym"))


def test_render_glyphs_rejects_bad_count():
    with pytest.raises(ConfigError, match="n_per_class"):
        render_glyphs(0, seed=0)


# ------------------------------------------------------------------------------ quality
def test_frechet_identical_is_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_one_dimensional_formula():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    m1, s1, m2, s2 = 0.3, 2.0, -1.2, 0.5
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    got = frechet_distance(t([m1]), t([[s1 * s1]]), t([m2]), t([[s2 * s2]]))
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-9)


def test_frechet_diagonal_and_symmetric():
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    want = float((mu1 - mu2).pow(2).sum() + (v1.sqrt() - v2.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(want, rel=1e-9)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g) * 2 + 1
    sa, sb = feature_stats(a), feature_stats(b)
    assert frechet_distance(*sa, *sb) == pytest.approx(frechet_distance(*sb, *sa), rel=1e-7)
    assert frechet_distance(*sa, *sb) > 1.0


def test_feature_stats_matches_definition():
    f = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, sigma = feature_stats(f)
    assert mu.dtype == torch.float64 and torch.allclose(mu, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert torch.allclose(sigma, torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64))


def test_choose_defaults_prefers_small_cfg_within_slack():
    res = [{"top_k": 32, "cfg": 1.0, "accuracy": 0.70}, {"top_k": 32, "cfg": 2.0, "accuracy": 0.95},
           {"top_k": 128, "cfg": 2.0, "accuracy": 0.94}, {"top_k": 128, "cfg": 3.0, "accuracy": 0.96}]
    assert choose_defaults(res) == {"temperature": 1.0, "top_k": 128, "cfg": 2.0}


# ------------------------------------------------------------------------------ tiny bundle
def test_tiny_bundle_fields(tiny):
    C = TINY.codebook_size
    assert tiny.codebook_size == C and tiny.n_classes == len(CLASSES) and tiny.grid == 8
    assert tiny.class_token(3) == C + 3 and tiny.null_token == C + 10
    assert tiny.latents().shape == (C, TINY.vq_dim) and tiny.latents().dtype == torch.float32
    with pytest.raises(ConfigError, match="class 10"):
        tiny.class_token(10)
    assert set(tiny.meta["defaults"]) == {"temperature", "top_k", "cfg"}
    assert not (tiny.path / "checkpoints").exists()  # removed once the bundle is complete


def test_vq_encode_decode_shapes(tiny):
    x, _ = render_glyphs(1, seed=9)
    codes = tiny.vq.encode(x)
    assert codes.shape == (10, 64) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < tiny.codebook_size
    img = tiny.vq.decode(codes)
    assert img.shape == (10, 32, 32) and img.dtype == torch.uint8
    with pytest.raises(ValueError, match="code ids"):
        tiny.vq.decode(torch.full((1, 64), tiny.codebook_size))


def test_image_quality_fields(tiny):
    x, y = render_glyphs(1, seed=3)
    q = image_quality(tiny, x, y)
    assert set(q) == {"classifier_accuracy", "frechet_distance"}
    assert 0.0 <= q["classifier_accuracy"] <= 1.0 and q["frechet_distance"] >= 0.0


def test_bundle_save_load_bit_for_bit(tiny, tmp_path):
    out = save_bundle(tmp_path / "copy", tiny.meta, tiny.vq, tiny.classifier, tiny.real_mu, tiny.real_sigma,
                      int(_tensors(tiny.path / "real_stats.safetensors")["n"]), _hf(tiny))
    again = load_bundle(out)
    assert again.meta == tiny.meta
    for a, b in ((tiny.vq, again.vq), (tiny.classifier, again.classifier)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(again.real_mu, tiny.real_mu) and torch.equal(again.real_sigma, tiny.real_sigma)
    assert again.real_sigma.dtype == torch.float64
    ta, tb = _tensors(tiny.transformer_dir / "model.safetensors"), _tensors(out / "transformer" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, match", [
    ("nodir", "no image model folder"),
    ("nojson", "no image.json"),
    ("badjson", "cannot read"),
    ("format", "not a genrefine-image-v1"),
    ("novq", "lacks vq.safetensors"),
    ("corrupt", "cannot read"),
    ("mismatch", "does not match image.json"),
    ("nokey", "lacks or has a bad"),
])
def test_load_bundle_errors(tiny_dir, tmp_path, damage, match):
    d = _copy(tiny_dir, tmp_path / "b")
    meta = json.loads((d / "image.json").read_text())
    if damage == "nodir":
        d = tmp_path / "missing"
    elif damage == "nojson":
        (d / "image.json").unlink()
    elif damage == "badjson":
        (d / "image.json").write_text("{not json")
    elif damage == "format":
        (d / "image.json").write_text(json.dumps({**meta, "format": "other"}))
    elif damage == "novq":
        (d / "vq.safetensors").unlink()
    elif damage == "corrupt":
        (d / "classifier.safetensors").write_bytes(b"garbage")
    elif damage == "mismatch":
        (d / "image.json").write_text(json.dumps({**meta, "vq": {**meta["vq"], "dim": meta["vq"]["dim"] + 1}}))
    elif damage == "nokey":
        (d / "image.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "classifier"}))
    with pytest.raises(ConfigError, match=match):
        load_bundle(d)


def test_transformer_runs_on_native_runtime(tiny, tmp_path, monkeypatch):
    from genrefine.models.loading import load_model
    from genrefine.models.runtime import NativeModel

    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(tiny.transformer_dir, dtype="float32", quiet=True)
    assert isinstance(model, NativeModel)
    assert model.vocab_size == tiny.codebook_size + tiny.n_classes + 1
    g = torch.Generator().manual_seed(0)
    seq = torch.cat([torch.tensor([tiny.class_token(4)]), torch.randint(tiny.codebook_size, (20,), generator=g)])
    ref = _hf(tiny)(input_ids=seq[None]).logits[0].float()
    cache = model.new_cache(64)
    got = model.forward(seq[:12], cache).logits  # a prefix, then the rest through the cache
    got = torch.cat([got, model.forward(seq[12:], cache).logits])
    assert got.shape == ref.shape
    assert torch.allclose(got, ref.detach(), atol=1e-4, rtol=1e-4)


def test_sample_codes_greedy_matches_full_forward(tiny):
    hf = _hf(tiny)
    C, null = tiny.codebook_size, tiny.null_token
    classes = torch.tensor([1, 7])
    for cfg in (1.0, 2.5):
        got = sample_codes(hf, classes, codebook_size=C, null_token=null, n_codes=6, temperature=0.0, cfg=cfg)
        seq = torch.cat([C + classes[:, None], torch.empty(2, 0, dtype=torch.long)], 1)
        with torch.no_grad():
            for _ in range(6):
                c = hf(input_ids=seq).logits[:, -1, :C]
                u = hf(input_ids=torch.cat([torch.full((2, 1), null), seq[:, 1:]], 1)).logits[:, -1, :C]
                seq = torch.cat([seq, (u + cfg * (c - u)).argmax(-1, keepdim=True)], 1)
        assert torch.equal(got, seq[:, 1:]), cfg


def test_sample_codes_top_k_and_seed(tiny):
    hf = _hf(tiny)
    kw = dict(codebook_size=tiny.codebook_size, null_token=tiny.null_token, n_codes=8, top_k=1)
    top1 = sample_codes(hf, torch.tensor([2, 3]), generator=torch.Generator().manual_seed(0), **kw)
    greedy = sample_codes(hf, torch.tensor([2, 3]), **{**kw, "top_k": 0}, temperature=0.0)
    assert torch.equal(top1, greedy)
    kw["top_k"] = 0
    a = sample_codes(hf, torch.tensor([2, 3]), generator=torch.Generator().manual_seed(4), **kw)
    b = sample_codes(hf, torch.tensor([2, 3]), generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)


def test_train_resume_equals_uninterrupted(tiny_dir, tmp_path):
    out = tmp_path / "resumed"
    res = train_image(out, tiny=True, progress=False, stop_after=2)
    assert not res.complete and (out / "checkpoints" / "transformer" / "checkpoint.safetensors").is_file()
    assert not (out / "image.json").exists()
    train_image(out, tiny=True, progress=False)
    for name in ("vq.safetensors", "classifier.safetensors", "real_stats.safetensors", "transformer/model.safetensors"):
        a, b = _tensors(tiny_dir / name), _tensors(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_train_image_bad_input(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train_image(f, tiny=True, progress=False)
    with pytest.raises(ConfigError, match="--seed"):
        train_image(tmp_path / "o", tiny=True, seed=-1, progress=False)


def test_cli_train_image(tmp_path, capsys):
    from genrefine.cli import main

    out = tmp_path / "cli"
    assert main(["train", "image", "--out", str(out), "--tiny", "--no-progress", "--seed", "3"]) == 0
    assert load_bundle(out).meta["training"]["seed"] == 3
    assert "saved the image model" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["train", "image", "--out", str(tmp_path / "f"), "--tiny", "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ shipped
@pytest.fixture(scope="module")
def shipped():
    return load_bundle()


def test_shipped_bundle_files(shipped):
    assert shipped.path == EMBEDDED_IMAGE_DIR
    assert shipped.codebook_size >= 256 and shipped.grid * shipped.grid >= 64 and shipped.n_classes == 10
    names = {p.name for p in EMBEDDED_IMAGE_DIR.rglob("*") if p.is_file()}
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert "checkpoints" not in {p.name for p in EMBEDDED_IMAGE_DIR.iterdir()}
    d = shipped.meta["defaults"]
    assert d["temperature"] == 1.0 and d["top_k"] >= 1 and d["cfg"] >= 1.0


def test_shipped_classifier_and_vq_on_fresh_images(shipped):
    x, y = render_glyphs(20, seed=12345)  # neither the training nor the held-out seed
    assert float((shipped.classifier.predict(x) == y).float().mean()) >= 0.95
    codes = shipped.vq.encode(x)
    recon = shipped.vq.decode(codes)
    assert float((shipped.classifier.predict(recon) == y).float().mean()) >= 0.9
    # reconstructions are close to the images, and encoding one again changes it little (codes
    # of blank regions are interchangeable, so compare pixels, not ids); grey levels of 255
    assert float((recon.float() - x.float()).abs().mean()) < 8
    again = shipped.vq.decode(shipped.vq.encode(recon))
    assert float((again.float() - recon.float()).abs().mean()) < 4
    q = image_quality(shipped, x, y)
    assert q["classifier_accuracy"] >= 0.95 and math.isfinite(q["frechet_distance"])
