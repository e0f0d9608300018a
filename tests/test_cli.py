"""The command line: help, listing, generation on tiny models, and every user-error path."""

from __future__ import annotations

import pytest

from genrefine.cli import main
from genrefine.registry import METHODS

from tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("generate", "demo", "methods"):
        assert sub in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--method", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                "--seed", "--dtype", "--device"):
        assert opt in out


def test_methods_lists_every_method_with_losslessness(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(METHODS)
    for ln, info in zip(lines, METHODS.values()):
        assert ln.split()[1] == ("lossless" if info.lossless else "lossy")


def test_methods_notes_what_lossless_means_without_exactness(capsys):
    _, _, err = run(capsys, "methods")
    note = [ln for ln in err.splitlines() if "bitwise exact" in ln]
    assert len(note) == 1 and "lossless" in note[0] and "genrefine bench" in note[0]


def test_generate_on_a_tiny_model_directory(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "hello", "--model", str(tiny_dir), "--max-new-tokens",
                         "12", "--method", "pld", "--dtype", "float32")
    assert code == 0
    assert "tokens/s" in err and "method pld" in err and "tokens/step" in err
    code2, out2, _ = run(capsys, "generate", "hello", "--model", str(tiny_dir), "--max-new-tokens",
                         "12", "--dtype", "float32")
    assert code2 == 0 and out2 == out  # pld is lossless: same text as ar


def test_architecture_without_native_runtime_uses_the_adapter(capsys, tmp_path):
    d = save_tiny_model_dir(tmp_path / "gpt2", "gpt2")
    code, out, err = run(capsys, "generate", "hi", "--model", str(d), "--max-new-tokens", "5",
                         "--method", "pld", "--dtype", "float32")
    assert code == 0
    notices = [ln for ln in err.splitlines() if "generic transformers adapter" in ln]
    assert len(notices) == 1


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
        (["generate", "hi", "--method", "nosuch"], "unknown method"),
        (["generate", "hi", "--temperature", "-0.5"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top-p"),
        (["generate", "hi", "--top-p", "1.5"], "top-p"),
        (["generate", "hi", "--top-k", "-3"], "top-k"),
        (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "hi", "--dtype", "int3"], "unknown dtype"),
        (["generate", "hi", "--draft-len", "0"], "draft-len"),
        (["demo", "--methods", "ar,nosuch"], "unknown method"),
    ],
)
def test_user_errors_are_one_line_and_nonzero(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_a_file_that_is_not_a_model(capsys, tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_text("not a model")
    code, _, err = run(capsys, "generate", "hi", "--model", str(bad))
    assert code == 2 and "not a model file" in err and "Traceback" not in err
    empty = tmp_path / "emptydir"
    empty.mkdir()
    code, _, err = run(capsys, "generate", "hi", "--model", str(empty))
    assert code == 2 and "config.json" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    code, _, err = run(capsys, "generate", "hi", "--model", str(broken))
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_prompt_longer_than_the_context(capsys, tiny_dir):
    long_prompt = "x" * 400  # the tiny model's context is 256 tokens
    code, _, err = run(capsys, "generate", long_prompt, "--model", str(tiny_dir))
    assert code == 2 and "context" in err and "Traceback" not in err


def test_sampling_with_a_seed_repeats(capsys, tiny_dir):
    args = ["generate", "abc", "--model", str(tiny_dir), "--max-new-tokens", "10",
            "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "7"]
    c1, o1, _ = run(capsys, *args)
    c2, o2, _ = run(capsys, *args)
    assert c1 == c2 == 0 and o1 == o2


def test_generate_stop_never_prints_the_start_of_a_split_stop(capsys, tiny_dir, monkeypatch):
    """The stop string arrives split over two chunks of tokens: its first part is never printed."""
    import genrefine.api as api_mod
    from test_text import CHUNKS, ChunkEngine

    monkeypatch.setattr(api_mod, "Engine", ChunkEngine)
    assert CHUNKS[0].endswith("ti") and CHUNKS[1].startswith("me")  # "time" is split
    code, out, _ = run(capsys, "generate", "hello", "--model", str(tiny_dir), "--dtype", "float32",
                       "--stop", "nope", "--stop", "time")
    assert code == 0 and out == "Once upon a \n"


def test_index_build_and_generate_with_the_datastore(capsys, tiny_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    store = tmp_path / "store.safetensors"
    code, out, err = run(capsys, "index", "build", str(docs), "--out", str(store), "--model",
                         str(tiny_dir))
    assert code == 0 and store.is_file(), err
    args = ["generate", "the quick brown", "--model", str(tiny_dir), "--max-new-tokens", "12",
            "--dtype", "float32"]
    code, ar_out, _ = run(capsys, *args)
    code2, rest_out, err = run(capsys, *args, "--method", "rest", "--datastore", str(store))
    assert code == code2 == 0 and rest_out == ar_out and "method rest" in err
    code, _, err = run(capsys, *args, "--method", "rest", "--datastore", str(tmp_path / "no.st"))
    assert code == 2 and "genrefine index build" in err
