"""The speech modality's own pieces: text, data, codec, the tiny trained bundle, the API, the CLI
and the server route (issue 20). Methods' correctness: tests/test_speech_methods.py; the
recognizer and quality measures: tests/test_speech_quality.py."""

from __future__ import annotations

import io
import json
import shutil
import wave

import numpy as np
import pytest
import torch

from genrefine.errors import ConfigError
from genrefine.modalities.speech import codec as codec_mod
from genrefine.modalities.speech.data import ALPHABET, normalize_text, split_sentences
from genrefine.modalities.speech.quality import read_wav, write_wav
from genrefine.train.speech import layout_for, pad_batch, speech_sequences

from tiny import save_tiny_model_dir

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="Debian's flite is not installed (apt-get install flite; .ci/run does)")


# ------------------------------------------------------------------------------ text and data
def test_normalize_text_lowercases_and_drops_punctuation():
    assert normalize_text("  Hello, World!  It's-fine. ") == "hello world it's fine"


@pytest.mark.parametrize("bad", ["room 101", "caf\u00e9", ""])
def test_normalize_text_refuses_what_the_model_cannot_read(bad):
    with pytest.raises(ConfigError):
        normalize_text(bad)


def test_sentences_are_plain_words_and_split_by_hash():
    train, held = split_sentences()
    assert len(train) > 10_000 and len(held) > 200
    assert not set(train) & set(held)
    for s in train[:500] + held[:100]:
        assert set(s) <= set(ALPHABET) and 3 <= len(s.split()) <= 9


def test_wav_round_trip(tmp_path):
    x = (0.5 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    write_wav(tmp_path / "a.wav", x, 16000)
    y, sr = read_wav(tmp_path / "a.wav")
    assert sr == 16000 and np.abs(x - y).max() < 1e-4


# ------------------------------------------------------------------------------ codec
def test_log_mel_shape_and_griffin_lim_length():
    t = np.arange(16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    f = codec_mod.log_mel(x)
    assert f.shape == (16000 // codec_mod.HOP + 1, codec_mod.N_MELS)
    y = codec_mod.griffin_lim(f, iters=8)
    assert abs(len(y) - len(x)) <= codec_mod.N_FFT and np.abs(y).max() <= 1.0
    # the tone's band dominates the resynthesized audio's spectrum too
    g = codec_mod.log_mel(y)
    assert int(g.mean(0).argmax()) == int(f.mean(0).argmax())


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_griffin_lim_on_a_few_frames(frames):
    y = codec_mod.griffin_lim(torch.full((frames, codec_mod.N_MELS), -3.0), iters=2)
    assert len(y) == frames * codec_mod.HOP


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    c = codec_mod.kmeans(x, 3, 10, seed=1)
    d = torch.cdist(centres, c).min(1).values
    assert float(d.max()) < 0.2


def test_codec_encode_is_nearest_centroid_and_decoder_starts_at_centroids():
    book = torch.randn(8, codec_mod.N_MELS)
    codec = codec_mod.Codec(book, width=8, layers=1)
    feats = book[[3, 1, 7]] + 0.01
    assert codec.encode_features(feats).tolist() == [3, 1, 7]
    # a fresh decoder's correction is zero (its output layer starts at zero)
    assert torch.allclose(codec.decode_features([3, 1, 7]), book[[3, 1, 7]])
    assert codec.decode([]).shape == (0,)


# ------------------------------------------------------------------------------ token layout
def test_layout_and_training_pairs():
    lay = layout_for(16)
    p = lay.prompt("ab", voice=1, rate=2)
    assert p[0] == lay.voice_offset + 1 and p[1] == lay.rate_offset + 2 and p[-1] == lay.start
    assert lay.vocab_size == lay.start + 1 and lay.end == 16
    seqs = speech_sequences(lay, ["ab", "c"], [0, 1], [1, 1], [torch.tensor([1, 2, 3]), torch.tensor([5])])
    inp, tgt = pad_batch(seqs, lay)
    # targets are the codes and the end only; the prompt is given
    assert tgt[0][tgt[0] != -100].tolist() == [1, 2, 3, lay.end]
    assert tgt[1][tgt[1] != -100].tolist() == [5, lay.end]
    assert inp[0, 0] == lay.voice_offset


# ------------------------------------------------------------------------------ the tiny bundle
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    if shutil.which("flite") is None:
        pytest.skip("Debian's flite is not installed (apt-get install flite; .ci/run does)")
    from genrefine.train.speech import train_speech

    out = tmp_path_factory.mktemp("speech") / "bundle"
    res = train_speech(out, tiny=True, progress=False)
    assert res.complete
    return out


@pytest.fixture(scope="module")
def tts(tiny_bundle):
    from genrefine.modalities.speech.api import load_speech

    return load_speech(str(tiny_bundle))


@needs_flite
def test_flite_synthesis_is_16k_speech():
    from genrefine.modalities.speech.data import synthesize

    a = synthesize("hello there", "slt", 1.0)
    b = synthesize("hello there", "slt", 1.15)
    assert a.dtype == np.float32 and 0.3 * 16000 < len(a) < 3 * 16000
    assert len(b) > len(a)  # a larger duration stretch is slower speech


def test_tiny_training_writes_a_complete_bundle(tiny_bundle):
    meta = json.loads((tiny_bundle / "speech.json").read_text())
    assert meta["format"] == "genrefine-speech-v1" and meta["sample_rate"] == 16000
    for f in ("codec.safetensors", "transformer/model.safetensors", "heads/drafter.safetensors",
              "eagle/drafter.safetensors", "draft/model.safetensors"):
        assert (tiny_bundle / f).is_file(), f
    assert not (tiny_bundle / "checkpoints").exists()
    d = meta["training"]["drafters"]
    assert d["heads"]["greedy_same_as_ar"] and d["eagle"]["greedy_same_as_ar"] and d["draft"]["greedy_same_as_ar"]


def test_resumed_training_matches_an_uninterrupted_one(tmp_path, tiny_bundle):
    from safetensors.torch import load_file

    from genrefine.train.speech import train_speech

    out = tmp_path / "b"
    r1 = train_speech(out, tiny=True, progress=False, stop_after=1)
    assert not r1.complete and not (out / "speech.json").exists()
    r2 = train_speech(out, tiny=True, progress=False)
    assert r2.complete
    a = load_file(str(out / "transformer" / "model.safetensors"))
    b = load_file(str(tiny_bundle / "transformer" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["pld", "jacobi", "sjd", "mc-sjd", "medusa", "eagle", "sps", "vadusa", "pcg"])
def test_methods_speak_ar_codes_greedily(tts, method):
    """The lossless methods always, and the lossy ones at temperature 0 (plain greedy
    verification), with the bundle's own drafters found without options."""
    texts = ["hello there", "a quiet afternoon"]
    ref = tts.generate(texts, method="ar", temperature=0, seed=0)
    got = tts.generate(texts, method=method, temperature=0, seed=0)
    assert got.codes == ref.codes
    assert got.summary()["steps_per_second_of_audio"] <= ref.summary()["steps_per_second_of_audio"] + 1e-9


def test_pcg_drafts_with_the_bundles_draft_model(tts):
    from genrefine.registry import build_method

    assert tts.method("pcg").drafters[0].name == "draft-model"  # the bundle's, found without options
    # without a draft model it falls back to the training-free Jacobi drafter
    assert build_method("pcg", tts.model).drafters[0].name == "pcg"


def test_generate_returns_audio_and_stats(tts):
    r = tts.generate("good morning", method="mc-sjd", seed=3)
    s = r.summary()
    assert r.sample_rate == 16000 and r.audio.dtype == np.float32
    assert len(r.codes[0]) <= tts.max_frames("good morning")
    assert all(0 <= c < tts.bundle.codebook_size for c in r.codes[0])
    assert s["utterances"] == 1 and s["tokens_per_step"] >= 1.0
    # finished means the end token came: then the codes stop short of the frame budget
    assert r.finished[0] == (len(r.codes[0]) < tts.max_frames("good morning"))
    # same seed, same utterance; the seed is per utterance
    assert tts.generate("good morning", method="mc-sjd", seed=3).codes == r.codes
    two = tts.generate(["x y z", "good morning"], method="mc-sjd", seed=2)
    assert two.codes[1] == r.codes[0]


@pytest.mark.parametrize("kw,msg", [({"voice": "nobody"}, "unknown voice"), ({"rate": 2.0}, "unsupported rate"),
                                    ({"texts": "call 911"}, "letters only"), ({"texts": []}, "no text")])
def test_generate_refuses_bad_input(tts, kw, msg):
    kw = {"texts": "hello", **kw}
    with pytest.raises(ConfigError, match=msg):
        tts.generate(**kw)


def test_load_bundle_errors(tmp_path):
    from genrefine.modalities.speech.bundle import load_bundle

    with pytest.raises(ConfigError, match="train speech"):
        load_bundle(tmp_path / "none")
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="no speech.json"):
        load_bundle(tmp_path / "x")
    (tmp_path / "x" / "speech.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(ConfigError, match="not a genrefine-speech-v1"):
        load_bundle(tmp_path / "x")


# ------------------------------------------------------------------------------ CLI and server
def test_cli_speech_generate_writes_a_wav(tiny_bundle, tmp_path, capsys):
    from genrefine.cli import main

    out = tmp_path / "hello.wav"
    assert main(["speech", "generate", "hello there", "--model", str(tiny_bundle), "--method", "pld",
                 "--out", str(out), "--seed", "1"]) == 0
    with wave.open(str(out)) as w:
        assert w.getframerate() == 16000 and w.getnframes() > 0
    assert "target forwards per second of audio" in capsys.readouterr().out


def test_cli_speech_user_errors_are_one_line(tiny_bundle, tmp_path, capsys):
    from genrefine.cli import main

    assert main(["speech", "generate", "hi", "--model", str(tiny_bundle), "--out", str(tmp_path / "x.mp3")]) == 2
    assert main(["speech", "generate", "hi", "--model", str(tiny_bundle), "--method", "nope",
                 "--out", str(tmp_path / "x.wav")]) == 2
    assert main(["speech", "generate", "hi", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ".wav" in err and "unknown method" in err


@pytest.fixture(scope="module")
def tiny_text_generator(tmp_path_factory, cache_dir):
    import genrefine

    return genrefine.load(str(save_tiny_model_dir(tmp_path_factory.mktemp("t") / "m", "llama")),
                          dtype="float32", quiet=True)


def test_server_speech_route(tts, tiny_text_generator):
    from fastapi.testclient import TestClient

    from genrefine.server import ServerConfig, create_app

    with TestClient(create_app(tiny_text_generator, ServerConfig(method="ar"), warm=False, speech=tts)) as c:
        r = c.post("/v1/audio/speech", json={"input": "hello there", "voice": "alloy", "method": "pld", "seed": 1})
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(r.content)) as w:
            assert w.getframerate() == 16000 and w.getnframes() > 0
        assert float(r.headers["x-genrefine-tokens-per-step"]) >= 1.0
        for body, param in (({"input": "room 101"}, "input"), ({"input": "hi", "voice": "bob"}, "voice"),
                            ({"input": "hi", "method": "nope"}, "method"),
                            ({"input": "hi", "file": "/etc/passwd"}, None)):
            r = c.post("/v1/audio/speech", json=body)
            assert r.status_code == 400, body
            if param:
                assert r.json()["error"]["param"] == param


def test_server_without_speech_model_says_so(tiny_text_generator):
    from fastapi.testclient import TestClient

    from genrefine.server import ServerConfig, create_app

    with TestClient(create_app(tiny_text_generator, ServerConfig(method="ar"), warm=False)) as c:
        r = c.post("/v1/audio/speech", json={"input": "hello"})
        assert r.status_code == 404 and "--speech-model" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ bench
def test_speech_bench_report(tiny_bundle, tmp_path, capsys):
    from genrefine.cli import main

    j, r, p = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    assert main(["speech", "bench", "--model", str(tiny_bundle), "--methods", "mc-sjd,pcg", "--n", "2",
                 "--json", str(j), "--report", str(r), "--plot", str(p), "--no-progress"]) == 0
    rep = json.loads(j.read_text())
    assert set(rep["methods"]) == {"ar", "mc-sjd", "pcg"}
    for name, row in rep["methods"].items():
        for k in ("speedup", "steps_per_second_of_audio", "tokens_per_step", "acceptance_rate", "lossless",
                  "wer", "cer", "spectral_distance", "forward_reduction"):
            assert k in row, (name, k)
    assert rep["methods"]["ar"]["speedup"] == 1.0 and rep["methods"]["ar"]["spectral_distance"] == 0.0
    assert rep["methods"]["mc-sjd"]["lossless"] and not rep["methods"]["pcg"]["lossless"]
    assert {"wer", "cer", "spectral_distance"} <= set(rep["noise"]) and "wer" in rep["recognizer_floor"]
    assert 0 <= rep["codec_floor"]["cer"] <= 2
    assert len(rep["texts"]) == 2 and "speech bench --methods mc-sjd,pcg --n 2" in rep["command"]
    assert "| `pcg` | no |" in r.read_text() and p.stat().st_size > 1000


@needs_flite
def test_q8_0_weights_speak_their_own_ar_codes_greedily(tiny_bundle, tmp_path):
    """--dtype q8_0: the transformer on the exact integer kernels; the heads (vadusa) and the draft
    model (sps, pcg) still draft, and greedy output is its own ar's."""
    from genrefine.cli import main
    from genrefine.modalities.speech.api import load_speech

    q = load_speech(str(tiny_bundle), dtype="q8_0")
    assert q.model.native_base.weights_format == "quantized:Q8_0"
    texts = ["hello there", "a quiet afternoon"]
    ref = q.generate(texts, method="ar", temperature=0, seed=0)
    for method in ("medusa", "vadusa", "sps", "pcg"):
        assert q.generate(texts, method=method, temperature=0, seed=0).codes == ref.codes, method
    j = tmp_path / "b.json"
    assert main(["speech", "bench", "--model", str(tiny_bundle), "--dtype", "q8_0", "--methods", "vadusa",
                 "--n", "1", "--no-tree-cut", "--json", str(j), "--no-progress"]) == 0
    rep = json.loads(j.read_text())
    assert rep["weights"] == "quantized:Q8_0" and "--no-tree-cut" in rep["command"]


def test_speech_bench_greedy_counts_same_codes(tts):
    from genrefine.modalities.speech.bench import run_speech_bench

    class Deaf:  # the recognizer is not what this test is about
        def transcribe(self, audio, sample_rate=16000):
            return "x"

    rep = run_speech_bench(tts, ["sps", "vadusa"], 2, temperature=0, recognizer=Deaf(), floor=False)
    assert rep["same_codes_as_ar"] == {"ar": 2, "sps": 2, "vadusa": 2}


# ------------------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def shipped():
    from genrefine.modalities.speech.api import load_speech

    return load_speech()


def test_shipped_bundle_files(shipped):
    from genrefine.modalities.speech.bundle import EMBEDDED_SPEECH_DIR

    assert shipped.bundle.path == EMBEDDED_SPEECH_DIR
    names = {p.name for p in EMBEDDED_SPEECH_DIR.rglob("*") if p.is_file()}
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert "checkpoints" not in {p.name for p in EMBEDDED_SPEECH_DIR.iterdir()}
    meta = shipped.bundle.meta
    assert meta["codebook_size"] == 512 and meta["voices"] == ["slt", "rms", "awb"]
    searched = {r["temperature"]: r["wer"] for r in meta["training"]["defaults_search"]["results"]}
    assert searched[meta["defaults"]["temperature"]] == min(searched.values())
    for kind in ("heads", "eagle", "draft"):
        assert meta["training"]["drafters"][kind]["greedy_same_as_ar"]


@pytest.fixture(scope="module")
def shipped_ar(shipped):
    """Two held-out sentences and the shipped model's greedy ``ar`` result on them, decoded once
    for every method compared with it."""
    from genrefine.modalities.speech.bench import bench_texts

    texts = bench_texts(2, seed=5)
    return texts, shipped.generate(texts, method="ar", temperature=0, seed=0)


@pytest.mark.parametrize("method", ["medusa", "eagle", "sps", "mc-sjd", "vadusa", "pcg"])
def test_shipped_methods_speak_ar_codes_greedily(shipped, shipped_ar, method):
    texts, ref = shipped_ar
    got = shipped.generate(texts, method=method, temperature=0, seed=0)
    assert got.codes == ref.codes and all(ref.finished)


def test_shipped_model_is_intelligible_greedily(shipped):
    """The recognizer reads the shipped model's greedy speech of held-out sentences much better
    than chance (a model that babbles or ignores its text gives a CER near 1)."""
    from genrefine.modalities.speech.asr import Recognizer
    from genrefine.modalities.speech.bench import bench_texts
    from genrefine.modalities.speech.quality import error_rates

    texts = bench_texts(6, seed=7)
    res = shipped.generate(texts, method="ar", temperature=0, seed=0)
    rec = Recognizer()
    rates = error_rates(texts, [rec.transcribe(a) for a in res.audios])
    assert rates["cer"] < 0.75, rates


def test_speech_no_tree_cut_reaches_the_method_options():
    from genrefine.cli import _parser
    from genrefine.cli.speech import _options

    for argv, cut in ((["speech", "bench"], True), (["speech", "bench", "--no-tree-cut"], False)):
        assert _options(_parser().parse_args(argv)).tree_cut is cut
