"""``genrefine batch`` and :mod:`genrefine.batch` on a tiny random model: results equal the
library's, a crashed run resumes without duplicates, bad lines are reported with their line
numbers, duplicate ids stop the run, chat lines use the chat template, sampled lines do not depend
on the other lines, and (where Ray is installed) a local Ray run equals the serial one."""

from __future__ import annotations

import json

import pytest

import genrefine
import genrefine.batch as batch_mod
from genrefine.batch import BatchLine, BatchSettings, line_seed, read_input, run_batch
from genrefine.cli import main
from genrefine.errors import ConfigError
from tiny import save_tiny_model_dir

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
LINES = [
    {"id": "a", "prompt": "The cat sat on the mat. The cat"},
    {"id": 2, "prompt": "hello world", "max_new_tokens": 5},
    {"id": "c", "messages": [{"role": "user", "content": "abc abc abc"}]},
    {"id": "d", "prompt": "1 2 3 4 5 6", "temperature": 0.9},
    {"id": "e", "prompt": "Once upon a time", "temperature": 0.7, "seed": 5, "meta": {"k": [1]}},
]
VOLATILE = ("time_s",)  # wall-clock figures: the only fields two runs may disagree on


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, cache_dir):
    from transformers import AutoTokenizer

    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama", "llama")
    tok = AutoTokenizer.from_pretrained(d)  # a chat template on disk: Ray's actors load it too
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gen(tiny_dir):
    g = genrefine.load(str(tiny_dir), dtype="float32", quiet=True)
    assert g.tokenizer.chat_template == TEMPLATE
    return g


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_out(path) -> list[dict]:
    return [json.loads(t) for t in open(path, encoding="utf-8").read().splitlines()]


def stable(recs: list[dict]) -> dict:
    """Records by id, without wall-clock fields."""
    return {json.dumps(r["id"]): {k: v for k, v in r.items() if k not in VOLATILE} for r in recs}


SETTINGS = BatchSettings(method="pld", max_new_tokens=10, seed=11)


def test_records_equal_the_library(gen, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", LINES)
    summary = run_batch(gen, src, tmp_path / "out.jsonl", SETTINGS, progress=False)
    recs = read_out(tmp_path / "out.jsonl")
    assert [r["id"] for r in recs] == [line["id"] for line in LINES]
    assert summary.done == 5 and summary.ok and summary.skipped == 0
    a = gen.generate(LINES[0]["prompt"], max_new_tokens=10, method="pld")
    assert recs[0]["text"] == a.text and recs[0]["token_ids"] == a.token_ids
    assert recs[0]["steps"] == a.stats.steps and recs[0]["drafted"] == a.stats.drafted
    assert recs[0]["method"] == "pld" and recs[0]["seed"] is None and recs[0]["line"] == 1
    assert recs[1]["new_tokens"] == len(recs[1]["token_ids"]) <= 5
    e = gen.generate(LINES[4]["prompt"], max_new_tokens=10, method="pld", temperature=0.7, seed=5)
    assert recs[4]["token_ids"] == e.token_ids and recs[4]["seed"] == 5
    assert recs[4]["meta"] == {"k": [1]}
    # the derived seed is the one recorded, and it reproduces the line
    d = gen.generate(LINES[3]["prompt"], max_new_tokens=10, method="pld", temperature=0.9,
                     seed=recs[3]["seed"])
    assert recs[3]["token_ids"] == d.token_ids
    assert sum(r["new_tokens"] for r in recs) == summary.new_tokens
    assert summary.per_method["pld"][0] == 5


def test_chat_lines_go_through_the_chat_template(gen, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [LINES[2]])
    run_batch(gen, src, tmp_path / "out.jsonl", SETTINGS, progress=False)
    rec = read_out(tmp_path / "out.jsonl")[0]
    ids = gen.chat_prompt(LINES[2]["messages"])
    assert gen.tokenizer.decode(ids).endswith("<user>abc abc abc\n<assistant>")
    ref = gen.generate(ids, max_new_tokens=10, method="pld")
    assert rec["token_ids"] == ref.token_ids and rec["prompt_tokens"] == len(ids)


def test_a_crashed_run_resumes_without_duplicates(gen, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", LINES)
    run_batch(gen, src, tmp_path / "ref.jsonl", SETTINGS, progress=False)
    ref = stable(read_out(tmp_path / "ref.jsonl"))

    real, calls = batch_mod.run_line, []

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(batch_mod, "run_line", crash_on_third)
    with pytest.raises(RuntimeError):
        run_batch(gen, src, out, SETTINGS, progress=False)
    assert [r["id"] for r in read_out(out)] == ["a", 2]  # both flushed before the crash
    with open(out, "a") as f:  # a crash in the middle of writing a line
        f.write('{"id": "c", "text": "cut sh')
    monkeypatch.setattr(batch_mod, "run_line", real)
    summary = run_batch(gen, src, out, SETTINGS, progress=False)
    assert summary.skipped == 2 and summary.done == 3
    recs = read_out(out)
    assert len(recs) == len(LINES) and stable(recs) == ref
    again = run_batch(gen, src, out, SETTINGS, progress=False)  # nothing left to do
    assert again.done == 0 and again.skipped == 5 and len(read_out(out)) == 5


def test_sampled_lines_do_not_depend_on_the_other_lines(gen, tmp_path):
    # rest drafts from earlier outputs too: a method shared across lines would draft otherwise
    settings = BatchSettings(method="rest", max_new_tokens=24, seed=11)
    rows = [{"id": i, "prompt": "abc abc abc abc", "temperature": 1.0} for i in range(6)]
    run_batch(gen, write_jsonl(tmp_path / "all.jsonl", rows), tmp_path / "o1.jsonl",
              settings, progress=False)
    run_batch(gen, write_jsonl(tmp_path / "rev.jsonl", rows[::-1][:3]), tmp_path / "o2.jsonl",
              settings, progress=False)
    one, two = stable(read_out(tmp_path / "o1.jsonl")), stable(read_out(tmp_path / "o2.jsonl"))
    for k, rec in two.items():
        assert {**rec, "line": 0} == {**one[k], "line": 0}
    assert len({json.dumps(r["token_ids"]) for r in one.values()}) > 1  # seeds differ by id


def test_line_seeds():
    s = BatchSettings(temperature=0.5, seed=3)
    assert line_seed(BatchLine(1, 1, "x"), s) != line_seed(BatchLine("1", 1, "x"), s)
    assert line_seed(BatchLine(1, 1, "x"), s) == line_seed(BatchLine(1, 9, "y"), s)
    assert line_seed(BatchLine(1, 1, "x"), s) != line_seed(BatchLine(1, 1, "x"), BatchSettings(temperature=0.5, seed=4))
    assert line_seed(BatchLine(1, 1, "x", seed=7), s) == 7
    assert line_seed(BatchLine(1, 1, "x"), BatchSettings()) is None  # greedy
    assert line_seed(BatchLine(1, 1, "x", temperature=0.0), s) is None


BAD = [
    ("not json", "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"prompt": "x"}, "no id"),
    ({"id": True, "prompt": "x"}, "id must be"),
    ({"id": "z"}, "exactly one of prompt"),
    ({"id": "z", "prompt": "x", "messages": []}, "exactly one of prompt"),
    ({"id": "z", "prompt": 5}, "prompt must be"),
    ({"id": "z", "messages": [{"role": "user"}]}, "messages[0]"),
    ({"id": "z", "prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"id": "z", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"id": "z", "prompt": "x", "seed": 1.5}, "seed"),
    ({"id": "z", "prompt": "x", "method": "nope"}, "unknown method"),
    ({"id": "z", "prompt": "x", "max_new_token": 3}, "unknown field 'max_new_token'"),
]


@pytest.mark.parametrize("row, needle", BAD, ids=[b[1] for b in BAD])
def test_bad_lines_are_reported_with_their_line_numbers(tmp_path, row, needle):
    src = write_jsonl(tmp_path / "in.jsonl", [LINES[0], row, LINES[1]])
    lines, bad = read_input(src)
    assert [ln.line_no for ln in lines] == [1, 3]
    assert len(bad) == 1 and bad[0].line_no == 2 and needle in bad[0].message


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_skips_bad_lines_reports_them_and_exits_1(capsys, tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [LINES[0], "{oops", "", {"id": "x", "prompt": "y" * 400},
                                              LINES[1]])
    out = tmp_path / "out.jsonl"
    args = ["batch", src, "--out", str(out), "--model", str(tiny_dir), "--dtype", "float32",
            "--max-new-tokens", "4", "--no-progress"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 1 and stdout == ""
    assert "skipped line 2: not JSON" in err
    assert "failed line 4: id \"x\"" in err and "context" in err  # too long for the tiny model
    assert "2 done, 0 already in the output, 1 bad, 1 failed" in err
    assert [r["id"] for r in read_out(out)] == ["a", 2]
    code, _, err = run_cli(capsys, *args)  # a rerun: the good lines are done
    assert code == 1 and "0 done, 2 already in the output" in err
    assert len(read_out(out)) == 2


def test_cli_clean_run_exits_0(capsys, tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", LINES[:2])
    code, _, err = run_cli(capsys, "batch", src, "--out", str(tmp_path / "o.jsonl"), "--model",
                           str(tiny_dir), "--dtype", "float32", "--max-new-tokens", "3",
                           "--method", "pld", "--no-progress")
    assert code == 0 and "2 done" in err and "pld: 2 lines" in err and "tokens/step" in err


@pytest.mark.parametrize("rows, extra, needle", [
    ([LINES[0], LINES[1], {"id": "a", "prompt": "again"}, {"id": 2, "prompt": "and"}], [],
     'duplicate ids in'),
    (None, [], "does not exist"),
    ([LINES[0]], ["--method", "nope"], "unknown method 'nope'"),
    ([{"id": 1, "prompt": "x", "method": "sps"}], [], "needs a draft model"),
    ([LINES[0]], ["--num-actors", "0"], "--num-actors must be >= 1"),
    ([LINES[0]], ["--max-new-tokens", "0"], "--max-new-tokens"),
    ([LINES[0]], ["--temperature", "-1"], "temperature"),
], ids=["duplicate", "missing", "method", "line-method", "actors", "tokens", "temperature"])
def test_cli_user_errors_are_one_line_exit_2(capsys, tiny_dir, tmp_path, rows, extra, needle):
    src = write_jsonl(tmp_path / "in.jsonl", rows) if rows is not None else str(tmp_path / "no.jsonl")
    code, _, err = run_cli(capsys, "batch", src, "--out", str(tmp_path / "o.jsonl"),
                           "--model", str(tiny_dir), *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_duplicate_ids_name_every_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [LINES[0], LINES[1], {"id": "a", "prompt": "again"},
                                              {"id": 2, "prompt": "and"}, {"id": "2", "prompt": "ok"}])
    with pytest.raises(ConfigError, match=r'id "a" on lines 1, 3; id 2 on lines 2, 4$'):
        read_input(src)


def test_out_must_not_be_the_input(gen, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", LINES[:1])
    with pytest.raises(ConfigError, match="must not be the input"):
        run_batch(gen, src, src, SETTINGS, progress=False)


def test_ray_missing_is_one_line(capsys, tiny_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    src = write_jsonl(tmp_path / "in.jsonl", LINES[:1])
    code, _, err = run_cli(capsys, "batch", src, "--out", str(tmp_path / "o.jsonl"), "--model",
                           str(tiny_dir), "--ray")
    assert code == 2 and "pip install 'genrefine[ray]'" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- Ray Data
@pytest.fixture(scope="module")
def local_ray(cache_dir):
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        pytest.skip("ray[data] is not installed (pip install 'genrefine[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_ray_equals_serial_line_for_line(local_ray, gen, tiny_dir, tmp_path, method):
    rows = LINES + [{"id": f"s{i}", "prompt": "abc abc abc abc", "temperature": 1.0}
                    for i in range(3)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    settings = BatchSettings(method=method, max_new_tokens=10, seed=11)
    run_batch(gen, src, tmp_path / "serial.jsonl", settings, progress=False)
    load_kwargs = {"model": str(tiny_dir), "dtype": "float32"}
    summary = batch_mod.run_batch_ray(load_kwargs, src, tmp_path / "ray.jsonl", settings,
                                      num_actors=2, progress=False)
    assert summary.done == len(rows) and summary.ok
    serial, ray_recs = read_out(tmp_path / "serial.jsonl"), read_out(tmp_path / "ray.jsonl")
    assert len(ray_recs) == len(rows)
    s, r = stable(serial), stable(ray_recs)
    for k in s:  # greedy (pld's drafter state may differ: its figures are not compared)
        assert r[k]["token_ids"] == s[k]["token_ids"] and r[k]["text"] == s[k]["text"], k
        assert r[k]["seed"] == s[k]["seed"] and r[k]["finish_reason"] == s[k]["finish_reason"]
    # resumable on Ray too: a rerun has nothing left to do
    again = batch_mod.run_batch_ray(load_kwargs, src, tmp_path / "ray.jsonl", settings,
                                    num_actors=2, progress=False)
    assert again.done == 0 and again.skipped == len(rows) and len(read_out(tmp_path / "ray.jsonl")) == len(rows)


def test_cli_ray_run_equals_the_serial_cli_run(local_ray, capsys, tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", LINES)
    common = ["--model", str(tiny_dir), "--dtype", "float32", "--max-new-tokens", "6",
              "--temperature", "0.8", "--seed", "4", "--no-progress"]
    code, _, _ = run_cli(capsys, "batch", src, "--out", str(tmp_path / "s.jsonl"), *common)
    assert code == 0
    code, _, err = run_cli(capsys, "batch", src, "--out", str(tmp_path / "r.jsonl"), "--ray",
                           "--num-actors", "2", *common)
    assert code == 0 and "5 done" in err
    s, r = stable(read_out(tmp_path / "s.jsonl")), stable(read_out(tmp_path / "r.jsonl"))
    assert r == s  # ar: the figures agree too
