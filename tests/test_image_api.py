"""The image API, CLI and server route on a tiny image bundle (``train_image(tiny=True)``)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import genrefine
from genrefine.cli import main
from genrefine.errors import ConfigError

from tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, cache_dir):
    from genrefine.train.image import train_image

    out = tmp_path_factory.mktemp("image") / "bundle"
    train_image(out, tiny=True, progress=False)
    return out


@pytest.fixture(scope="module")
def gen(bundle_dir):
    return genrefine.load_image(str(bundle_dir))


def test_images_have_the_bundle_shape_and_seeds_repeat(gen) -> None:
    a = gen.generate([0, 1, 2], method="ar", seed=5)
    b = gen.generate([0, 1, 2], method="ar", seed=5)
    side = gen.bundle.image_size
    assert a.images.dtype == np.uint8 and a.images.shape == (3, side, side)
    assert a.codes == b.codes and all(len(c) == gen.tokens_per_image for c in a.codes)
    assert a.classes == [0, 1, 2]
    s = a.summary()
    assert s["images"] == 3 and s["steps_per_image"] == gen.tokens_per_image  # prefill + 63 steps
    c = gen.generate([0, 1, 2], method="ar", seed=6)
    assert c.codes != a.codes  # the seed is used


@pytest.mark.parametrize("method", ["sjd", "mc-sjd", "pld", "jacobi"])
def test_greedy_lossless_methods_give_ar_codes_under_guidance(gen, method) -> None:
    ref = gen.generate([0, 3, 5], method="ar", temperature=0, cfg=2.5, seed=0)
    out = gen.generate([0, 3, 5], method=method, temperature=0, cfg=2.5, seed=0)
    assert out.codes == ref.codes
    assert np.array_equal(out.images, ref.images)


def test_bad_classes_and_scales_are_one_line_errors(gen) -> None:
    n = len(gen.class_names)
    with pytest.raises(ConfigError, match="out of range"):
        gen.generate([n])
    with pytest.raises(ConfigError, match="unknown class"):
        gen.generate(["no such class"])
    with pytest.raises(ConfigError, match="cfg"):
        gen.generate([0], cfg=-1.0)
    with pytest.raises(ConfigError, match="at least one"):
        gen.generate([])
    assert gen.class_index(gen.class_names[1]) == 1


def test_cli_generate_writes_a_png_grid(bundle_dir, tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    rc = main(["image", "generate", "--model", str(bundle_dir), "--class", "2", "--n", "4",
               "--method", "sjd", "--out", str(out), "--no-progress"])
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert img.ndim == 2 and img.shape[0] > 2 * 32
    assert "4 images of class" in capsys.readouterr().out


def test_q8_0_weights_run_bitwise_exact_and_greedy_methods_give_their_ar(bundle_dir, tmp_path,
                                                                           capsys) -> None:
    """--dtype q8_0: the transformer on the integer kernels, where verification rows equal
    one-token decoding bit for bit, so greedy lossless methods give its own ar's codes."""
    q = genrefine.load_image(str(bundle_dir), dtype="q8_0")
    assert q.model.native_base.weights_format == "quantized:Q8_0" and q.model.bitwise_exact
    ref = q.generate([0, 3, 5], method="ar", temperature=0, cfg=2.5, seed=0)
    for method in ("sjd", "mc-sjd", "pld"):
        assert q.generate([0, 3, 5], method=method, temperature=0, cfg=2.5, seed=0).codes == ref.codes
    j = tmp_path / "b.json"
    assert main(["image", "bench", "--model", str(bundle_dir), "--dtype", "q8_0", "--methods",
                 "sjd", "--n-per-class", "1", "--json", str(j), "--no-progress"]) == 0
    rep = json.loads(j.read_text())
    assert rep["weights"] == "quantized:Q8_0" and "--dtype q8_0" in rep["command"]
    assert main(["image", "generate", "--model", str(bundle_dir), "--dtype", "nope", "--out",
                 str(tmp_path / "g.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype" in err and "Traceback" not in err


def test_q8_0_and_float_bundles_keep_separate_cost_tables(bundle_dir, gen) -> None:
    """The tree cut and auto read measured forward times keyed by the model: a q8_0 load must not
    reuse the float32 model's (same name) nor the float one the q8_0 one's."""
    from genrefine.costs import _target_key

    q = genrefine.load_image(str(bundle_dir), dtype="q8_0")
    assert _target_key(q.model) != _target_key(gen.model)
    assert "quantized:Q8_0" in _target_key(q.model) and "kernels=" in _target_key(q.model)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "nope"], "unknown method"),
    (["--n", "0"], "--n must be"),
    (["--out", "x.jpg"], ".png"),
    (["--class", "99"], "out of range"),
])
def test_cli_generate_rejects_bad_input(bundle_dir, tmp_path, capsys, argv, needle) -> None:
    base = ["image", "generate", "--model", str(bundle_dir), "--out", str(tmp_path / "g.png"),
            "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_bench_writes_json_report_and_plot(bundle_dir, tmp_path, capsys) -> None:
    j, r, p = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    rc = main(["image", "bench", "--model", str(bundle_dir), "--methods", "sjd,mc-sjd",
               "--n-per-class", "1", "--json", str(j), "--report", str(r), "--plot", str(p),
               "--no-progress"])
    assert rc == 0
    rep = json.loads(j.read_text())
    keys = {"images_per_s", "speedup", "steps_per_image", "tokens_per_step", "acceptance_rate",
            "lossless", "classifier_accuracy", "frechet_distance"}
    assert set(rep["methods"]) >= {"ar", "sjd", "mc-sjd", "ar (other seeds)"}
    for m in rep["methods"].values():
        assert keys <= set(m)
    assert rep["methods"]["ar"]["speedup"] == 1.0
    assert rep["methods"]["sjd"]["lossless"] is True
    assert set(rep["noise"]) >= {"classifier_accuracy", "frechet_distance"}
    assert "| sjd |" in r.read_text() and p.stat().st_size > 1000


@pytest.fixture(scope="module")
def client(gen, tmp_path_factory, cache_dir):
    from fastapi.testclient import TestClient

    from genrefine.server import ServerConfig, create_app

    text = genrefine.load(str(save_tiny_model_dir(tmp_path_factory.mktemp("t") / "m", "llama")),
                          dtype="float32", quiet=True)
    app = create_app(text, ServerConfig(method="ar"), warm=False, image=gen)
    with TestClient(app) as c:
        yield c


def test_image_route_returns_png_images_and_method_figures(client, gen) -> None:
    r = client.post("/v1/images/generations",
                    json={"prompt": gen.class_names[3], "n": 2, "method": "sjd", "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))))
    ref = gen.generate([3, 3], method="sjd", seed=1)
    assert np.array_equal(img, ref.images[0])
    assert body["genrefine"]["method"] == "sjd" and body["usage"]["images"] == 2


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "99"}, "out of range"),
    ({"prompt": "1", "n": 0}, "n"),
    ({"prompt": "1", "n": 17}, "n"),
    ({"prompt": "1", "method": "nope"}, "unknown method"),
    ({"prompt": "1", "size": "1024x1024"}, "makes"),
    ({"prompt": "1", "response_format": "url"}, "b64_json"),
    ({"prompt": "1", "path": "/etc/passwd"}, "unrecognized"),
    ({"prompt": 3}, "prompt"),
])
def test_image_route_rejects_bad_requests(client, body, needle) -> None:
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_image_route_without_an_image_model_says_so(tmp_path_factory, cache_dir) -> None:
    from fastapi.testclient import TestClient

    from genrefine.server import ServerConfig, create_app

    text = genrefine.load(str(save_tiny_model_dir(tmp_path_factory.mktemp("t2") / "m", "llama")),
                          dtype="float32", quiet=True)
    with TestClient(create_app(text, ServerConfig(method="ar"), warm=False)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "1"})
    assert r.status_code == 404 and "--image-model" in r.json()["error"]["message"]
