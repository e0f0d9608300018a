"""The bench: input checks, metrics on hand-made records, reports, and full runs on a tiny model."""

from __future__ import annotations

import json

import pytest

from genrefine.bench.metrics import aggregate, build_report
from genrefine.bench.questions import (
    Question,
    check_writable,
    jsonl_path_for,
    load_questions,
    parse_methods,
    select_questions,
)
from genrefine.bench.report import markdown_report, plot_report
from genrefine.bench.backends import TurnResult
from genrefine.bench.plan import Settings
from genrefine.bench.runner import first_difference, rotated, run_question
from genrefine.cli import main
from genrefine.errors import ConfigError

from tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_bench"), "llama")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))


def write_lines(path, lines):
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def q(qid, cat, *turns):
    return json.dumps({"question_id": qid, "category": cat, "turns": list(turns)})


@pytest.fixture()
def qfile(tmp_path):
    return write_lines(
        tmp_path / "questions.jsonl",
        [
            q(1, "summarization", "the cat sat on the mat. the cat sat on the mat. summary: the"),
            q(2, "summarization", "abc abc abc abc abc"),
            q(3, "writing", "write about cats", "now shorter"),
            q(4, "rag", "context: x y z x y z. question: what comes after y?"),
        ],
    )


# ----------------------------------------------------------------------------- questions
@pytest.mark.parametrize(
    "lines, needle",
    [
        ([q(1, "a", "x"), "{not json"], "line 2: not valid JSON"),
        ([q(1, "a", "x"), "", '{"question_id": 2, "category": "a"}'], "line 3: missing field(s) turns"),
        (['{"question_id": 1, "category": "a", "turns": []}'], "line 1: turns must be"),
        (['{"question_id": 1, "category": "a", "turns": ["ok", ""]}'], "line 1: turns must be"),
        (['{"question_id": 1, "category": "", "turns": ["x"]}'], "line 1: category"),
        (['{"question_id": null, "category": "a", "turns": ["x"]}'], "line 1: question_id"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([q(7, "a", "x"), q(8, "a", "y"), q(7, "b", "z")], "line 3: question_id 7 repeats line 1"),
        ([""], "holds no questions"),
    ],
)
def test_question_file_errors_name_the_line(tmp_path, lines, needle):
    f = write_lines(tmp_path / "q.jsonl", lines)
    with pytest.raises(ConfigError) as e:
        load_questions(f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_question_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="not a file"):
        load_questions(tmp_path)


def test_questions_load_and_select(qfile):
    qs = load_questions(qfile)
    assert [x.question_id for x in qs] == [1, 2, 3, 4]
    assert qs[2].turns == ("write about cats", "now shorter")
    assert [x.question_id for x in select_questions(qs)] == [1, 2, 3, 4]
    assert [x.question_id for x in select_questions(qs, ["rag", "summarization"])] == [1, 2, 4]
    assert [x.question_id for x in select_questions(qs, None, 1)] == [1, 3, 4]
    with pytest.raises(ConfigError) as e:
        select_questions(qs, ["rag", "poetry"])
    assert "'poetry'" in str(e.value) and "summarization, writing, rag" in str(e.value)
    with pytest.raises(ConfigError, match="positive"):
        select_questions(qs, None, 0)


def test_method_list():
    assert parse_methods("pld,jacobi") == ["ar", "pld", "jacobi"]
    assert parse_methods("jacobi, ar ,pld,pld") == ["ar", "jacobi", "pld"]
    assert parse_methods("hf_generate") == ["ar", "hf_generate"]
    with pytest.raises(ConfigError) as e:
        parse_methods("pld,hydra")
    msg = str(e.value)
    assert "'hydra'" in msg
    for name in ("ar", "pld", "jacobi", "auto", "hf_generate", "hf_prompt_lookup"):
        assert name in msg
    assert parse_methods("hf_assisted,sps") == ["ar", "hf_assisted", "sps"]  # need --draft-model


def test_output_paths(tmp_path):
    assert jsonl_path_for("out/b.json").name == "b.questions.jsonl"
    assert check_writable(tmp_path / "r.json", "--json") == tmp_path / "r.json"
    with pytest.raises(ConfigError, match="does not exist"):
        check_writable(tmp_path / "no" / "r.json", "--json")
    with pytest.raises(ConfigError, match="is a directory"):
        check_writable(tmp_path, "--json")


# ----------------------------------------------------------------------------- metrics
def rec(qid, cat, **methods):
    """A hand-made record: method=(new_tokens, time, steps, step_tokens, same_as_ar[, extra])."""
    out = {}
    for name, (n, t, steps, st, same, *extra) in methods.items():
        out[name] = {
            "new_tokens": n, "time": t, "steps": steps, "step_tokens": st,
            "drafted": steps and (st - steps) * 2, "accepted": steps and (st - steps),
            "accepted_hist": [steps], "same_as_ar": same, "same_as_hf_generate": None,
        }
        if extra:
            out[name].update(extra[0])
    return {"question_id": qid, "category": cat, "n_turns": 1, "methods": out}


RECORDS = [
    # ar 10 tok/s; pld 20 tok/s on q1 (2x), 10 tok/s on q2 (1x), 40 tok/s on q3 (4x)
    rec(1, "summarization", ar=(100, 10.0, 99, 99, True), pld=(100, 5.0, 33, 99, True)),
    rec(2, "summarization", ar=(50, 5.0, 49, 49, True), pld=(50, 5.0, 49, 49, True)),
    rec(3, "rag", ar=(40, 4.0, 39, 39, True), pld=(40, 1.0, 13, 39, False)),
]


def test_speedup_is_the_mean_of_per_question_ratios():
    m = aggregate(RECORDS, ["ar", "pld"])
    assert m["ar"]["speedup"] == pytest.approx(1.0)
    assert m["pld"]["speedup"] == pytest.approx((2 + 1 + 4) / 3)
    # tokens/s is all tokens over all seconds (not the mean of ratios)
    assert m["pld"]["tokens_per_s"] == pytest.approx(190 / 11.0)
    assert m["ar"]["tokens_per_s"] == pytest.approx(19.0 / 1.9)
    assert m["pld"]["n_questions"] == 3


def test_tokens_per_step_acceptance_and_histogram():
    m = aggregate(RECORDS, ["ar", "pld"])
    assert m["ar"]["tokens_per_step"] == pytest.approx(1.0)
    assert m["pld"]["tokens_per_step"] == pytest.approx((99 + 49 + 39) / (33 + 49 + 13))
    assert m["ar"]["acceptance_rate"] is None
    assert m["pld"]["acceptance_rate"] == pytest.approx(0.5)
    assert m["pld"]["accepted_hist"] == [33 + 49 + 13]


def test_per_category_figures():
    pc = aggregate(RECORDS, ["ar", "pld"])["pld"]["per_category"]
    assert set(pc) == {"summarization", "rag"}
    assert pc["summarization"]["speedup"] == pytest.approx(1.5)
    assert pc["summarization"]["tokens_per_s"] == pytest.approx(150 / 10.0)
    assert pc["summarization"]["tokens_per_step"] == pytest.approx(148 / 82)
    assert pc["rag"]["speedup"] == pytest.approx(4.0)
    assert pc["rag"]["n_questions"] == 1


def test_lossless_flags():
    m = aggregate(RECORDS, ["ar", "pld"])
    assert m["ar"]["lossless"] is True
    assert m["pld"]["lossless"] is False  # q3 differs from ar
    assert m["pld"]["same_as_ar_fraction"] == pytest.approx(2 / 3)
    assert aggregate(RECORDS[:2], ["ar", "pld"])["pld"]["lossless"] is True
    sampled = aggregate(RECORDS, ["ar", "pld"], greedy=False)
    assert sampled["ar"]["lossless"] is None and sampled["pld"]["lossless"] is None


def test_lossless_of_the_transformers_baselines():
    no_steps = {"steps": None, "step_tokens": None, "accepted_hist": None, "drafted": None}
    records = [
        rec(1, "qa", ar=(10, 1.0, 9, 9, True),
            hf_generate=(10, 2.0, 9, 9, False, {"same_as_hf_generate": True}),
            hf_prompt_lookup=(10, 1.0, 5, 9, False, {"same_as_hf_generate": True, **no_steps})),
    ]
    m = aggregate(records, ["ar", "hf_generate", "hf_prompt_lookup"])
    assert m["hf_generate"]["lossless"] is False  # its tokens differ from ar's
    assert m["hf_prompt_lookup"]["lossless"] is True  # it matches transformers' greedy
    assert m["hf_prompt_lookup"]["tokens_per_step"] is None
    assert m["hf_prompt_lookup"]["accepted_hist"] is None
    alone = aggregate(records, ["ar", "hf_prompt_lookup"])
    assert alone["hf_prompt_lookup"]["lossless"] is None  # no reference ran


def test_report_shape_and_markdown(tmp_path):
    records = [dict(r, loadavg=x) for r, x in zip(RECORDS, (2.5, 4.0, 3.0))]
    r = build_report(records, ["ar", "pld"], model="m", dtype="bfloat16", device="cpu",
                     max_new_tokens=128, machine={"cpu": "X", "torch_threads": 2},
                     command="genrefine bench --quick", timestamp="t")
    for key in ("model", "dtype", "device", "max_new_tokens", "methods", "machine", "command",
                "timestamp"):
        assert key in r
    for name in ("ar", "pld"):
        for key in ("tokens_per_s", "speedup", "tokens_per_step", "acceptance_rate", "lossless",
                    "n_questions", "per_category", "accepted_hist"):
            assert key in r["methods"][name]
    json.dumps(r)
    md = markdown_report(r)
    assert "| method | summarization | rag | overall |" in md
    assert "| `pld` | 1.50x | 4.00x | 2.33x |" in md
    assert "| `ar` | 1.00x | 1.00x | 1.00x |" in md
    assert "**NO** (2/3 same)" in md  # pld differs on q3
    assert r["load_average_during"] == [2.5, 4.0] and "2.5 to 4.0 while measuring" in md
    assert r["methods"]["pld"]["same_as_reference"] == [2, 3]
    for needle in ("tokens/step", "bfloat16", "genrefine bench --quick", "X"):
        assert needle in md
    plot_report(r, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- the runner
class FakeBackend:
    def __init__(self, answers):
        self.answers, self.prompts = answers, []

    def run(self, prompt_ids, max_new_tokens, temperature, seed):
        self.prompts.append(list(prompt_ids))
        toks = self.answers[len(self.prompts) - 1]
        return TurnResult(toks, 0.5, False, len(prompt_ids), steps=len(toks) - 1, drafted=0,
                          accepted=0, accepted_hist=[len(toks) - 1])


def test_second_turn_follows_the_ar_answer_for_every_method():
    backends = {"ar": FakeBackend([[5, 6, 7], [8, 9]]), "pld": FakeBackend([[5, 6, 7], [8, 1]])}
    settings = Settings("m", "float32", "cpu", ("ar", "pld"), 8, 0.0, 1, "q")
    seen = []

    def chat_prompt(messages):
        seen.append([dict(m) for m in messages])
        return [len(m["content"]) for m in messages]

    question = Question(3, "writing", ("first", "second"))
    r = run_question(question, backends, chat_prompt, settings, ["pld", "ar"],
                     decode=lambda ids: "ANSWER" + "".join(map(str, ids)))
    assert seen[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ANSWER567"},
        {"role": "user", "content": "second"},
    ]
    assert backends["ar"].prompts == backends["pld"].prompts  # identical prompts
    ar, pld = r["methods"]["ar"], r["methods"]["pld"]
    assert ar["new_tokens"] == 5 and ar["time"] == pytest.approx(1.0)
    assert ar["same_as_ar"] is True and pld["same_as_ar"] is False  # turn 2 differs
    assert pld["same_as_hf_generate"] is None
    assert [t["turn"] for t in ar["turns"]] == [0, 1]
    assert r["ar_answers"] == ["ANSWER567", "ANSWER89"]
    assert [t["first_diff_vs_ar"] for t in pld["turns"]] == [None, 1]
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert rotated(["ar", "pld", "jacobi"], 4) == ["pld", "jacobi", "ar"]


@pytest.fixture(scope="module")
def tiny_gen(tiny_dir):
    from genrefine.api import load

    return load(str(tiny_dir), dtype="float32", device="cpu")


def test_genrefine_backend_times_token_ids_without_decoding(tiny_gen, monkeypatch):
    """The clock covers generation alone: no detokenization (once per token for ar) inside it."""
    from genrefine.bench.backends import GenrefineBackend

    calls = []
    real = tiny_gen.tokenizer.decode
    monkeypatch.setattr(tiny_gen.tokenizer, "decode",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = tiny_gen.chat_prompt([{"role": "user", "content": "abc abc abc abc"}])
    r = GenrefineBackend(tiny_gen, "ar").run(prompt, 12, 0.0, None)
    assert len(r.token_ids) + r.ended_eos >= 1
    assert calls == []


@pytest.mark.parametrize("method", ["rest", "pld", "jacobi"])
def test_every_run_starts_from_the_same_method_state(tiny_gen, method):
    """A repeat of the same prompt drafts exactly as the first run did: rest does not draft its
    own earlier answer (nor anything an earlier run taught it)."""
    from genrefine.bench.backends import GenrefineBackend

    b = GenrefineBackend(tiny_gen, method)
    prompt = tiny_gen.chat_prompt([{"role": "user", "content": "the cat sat on the mat. the"}])
    first, second = (b.run(prompt, 24, 0.0, None) for _ in range(2))
    assert second.token_ids == first.token_ids
    assert (second.steps, second.drafted, second.accepted) == (
        first.steps, first.drafted, first.accepted
    )


def test_hf_assisted_runs_start_from_the_same_assistant_state():
    """transformers' "heuristic" schedule keeps the assistant's draft length across generate
    calls; each bench run starts from the length it had when the backend was built."""
    import copy

    from genrefine.bench.baselines import HFBackend

    from tiny import tiny_hf_model

    target = tiny_hf_model("llama")
    assistant = copy.deepcopy(target)  # the same weights: every draft token is accepted
    assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
    assistant.generation_config.num_assistant_tokens = 2
    assistant.generation_config.assistant_confidence_threshold = 0.0  # drafts of that length
    b = HFBackend(target, [2], 0, None, assistant)
    first, second = (b.run([1, 5, 6, 7, 5, 6], 24, 0.0, None) for _ in range(2))
    assert second.token_ids == first.token_ids
    assert (second.steps, second.drafted) == (first.steps, first.drafted)


# ----------------------------------------------------------------------------- the command
def bench(capsys, *argv):
    code = main(["bench", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_quick_on_a_tiny_model(capsys, tiny_dir, qfile, tmp_path):
    out_json = tmp_path / "b.json"
    code, out, err = bench(
        capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype", "float32",
        "--methods", "pld,jacobi", "--quick", "--json", str(out_json),
        "--report", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png"),
    )
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["max_new_tokens"] == 24 and r["dtype"] == "float32" and r["device"] == "cpu"
    assert list(r["methods"]) == ["ar", "pld", "jacobi"]
    assert r["categories"] == ["summarization", "writing", "rag"]
    for name, m in r["methods"].items():
        assert m["lossless"] is True, name  # lossless methods reproduce ar's greedy tokens
        assert m["n_questions"] == 3
        assert set(m["per_category"]) == {"summarization", "writing", "rag"}
        assert m["tokens_per_s"] > 0 and m["speedup"] > 0
    assert r["methods"]["ar"]["tokens_per_step"] == 1.0
    assert r["methods"]["ar"]["speedup"] == pytest.approx(1.0)
    assert r["machine"]["cpu"] and r["command"].startswith("genrefine bench")
    assert "| method | summarization | writing | rag | overall |" in out
    assert (tmp_path / "b.md").read_text().startswith("# genrefine bench")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "b.questions.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the settings header + one line per question
    assert json.loads(lines[0])["settings"]["max_new_tokens"] == 24
    writing = [json.loads(x) for x in lines[1:] if json.loads(x)["category"] == "writing"][0]
    assert writing["n_turns"] == 2 and len(writing["methods"]["pld"]["turns"]) == 2


def test_bench_resumes_and_refuses_other_settings(capsys, tiny_dir, qfile, tmp_path, monkeypatch):
    import genrefine.api

    args = ["--questions", str(qfile), "--model", str(tiny_dir), "--dtype", "float32",
            "--methods", "pld", "--quick", "--json", str(tmp_path / "b.json")]
    code, _, err = bench(capsys, *args)
    assert code == 0, err
    jsonl = tmp_path / "b.questions.jsonl"
    first = jsonl.read_text().splitlines()
    assert len(first) == 4

    # drop the last question (and leave half a line, as a killed run would): only it runs again
    jsonl.write_text("\n".join(first[:3]) + "\n" + first[3][:20])
    calls = []
    real_load = genrefine.api.load
    monkeypatch.setattr(genrefine.api, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    code, _, err = bench(capsys, *args)
    assert code == 0, err
    assert "resuming: 2 question(s)" in err and len(calls) == 1
    again = jsonl.read_text().splitlines()
    assert again[:3] == first[:3] and len(again) == 4
    assert json.loads(again[3])["question_id"] == json.loads(first[3])["question_id"]

    # everything done: no model is loaded, the report is rebuilt from the JSONL
    code, _, err = bench(capsys, *args)
    assert code == 0 and len(calls) == 1 and "resuming: 3 question(s)" in err
    assert json.loads((tmp_path / "b.json").read_text())["methods"]["pld"]["n_questions"] == 3

    code, _, err = bench(capsys, *[a if a != "pld" else "jacobi" for a in args])
    assert code == 2
    assert "other settings" in err and "methods" in err and "--fresh" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = bench(capsys, *args[:-1], str(tmp_path / "b.json"), "--max-new-tokens", "5")
    assert code == 0  # --quick fixes max_new_tokens at 24: same settings
    code, _, err = bench(capsys, *args, "--no-tree-cut")
    assert code == 2 and "other settings" in err and "tree_cut" in err
    code, _, err = bench(capsys, *args, "--draft-vocab", "50")
    assert code == 2 and "other settings" in err and "draft_vocab" in err


def test_bench_no_tree_cut_reaches_the_methods(capsys, tiny_dir, qfile, tmp_path, monkeypatch):
    """--no-tree-cut and --draft-vocab N build every method with MethodOptions(tree_cut=False,
    draft_vocab=N), and say so in the settings header and the report's command."""
    import genrefine.bench.runner as runner

    seen = []
    real = runner.GenrefineBackend

    def spy(gen, method, options=None):
        seen.append((method, options))
        return real(gen, method, options)

    monkeypatch.setattr(runner, "GenrefineBackend", spy)
    out = tmp_path / "c.json"
    code, _, err = bench(capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype",
                         "float32", "--methods", "pld,rest", "--quick", "--json", str(out),
                         "--no-tree-cut", "--draft-vocab", "5000")
    assert code == 0, err
    assert {m for m, _ in seen} == {"ar", "pld", "rest"}
    assert all(o is not None and o.tree_cut is False and o.draft_vocab == 5000 for _, o in seen)
    header = json.loads((tmp_path / "c.questions.jsonl").read_text().splitlines()[0])
    assert header["settings"]["tree_cut"] is False and header["settings"]["draft_vocab"] == 5000
    command = json.loads(out.read_text())["command"]
    assert "--no-tree-cut" in command and "--draft-vocab 5000" in command


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--methods", "pld,nope"], "unknown method 'nope'"),
        (["--categories", "rag,poetry"], "unknown category 'poetry': choose from summarization"),
        (["--json", "/no/such/dir/b.json"], "directory '/no/such/dir' does not exist"),
        (["--report", "/no/such/dir/b.md"], "does not exist"),
        (["--plot", "PLOT.xyz"], "unknown image type"),
        (["--limit-per-category", "0"], "--limit-per-category"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--repeats", "0"], "--repeats"),
        (["--draft-vocab", "0"], "--draft-vocab must be >= 1"),
        (["--temperature", "-1"], "temperature"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--methods", "pld,sps"], "method sps needs a draft model: add --draft-model PATH"),
        (["--methods", "hf_assisted,sps"], "methods hf_assisted, sps need a draft model"),
        (["--methods", "sps", "--draft-model", "/no/such/draft"], "does not exist"),
        (["--questions", "MISSING"], "does not exist"),
        (["--questions", "BAD"], "line 2: not valid JSON"),
    ],
)
def test_bench_rejects_bad_input_before_loading(capsys, tmp_path, qfile, monkeypatch, extra, needle):
    import genrefine.api

    monkeypatch.setattr(genrefine.api, "load", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "BAD", [q(1, "a", "x"), "{oops"])
    argv = ["--questions", str(qfile), "--json", str(tmp_path / "b.json"), *extra]
    argv = [str(tmp_path / "MISSING") if a == "MISSING" else a for a in argv]
    code, _, err = bench(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("genrefine: error:")


def test_bench_warms_up_on_a_prompt_it_does_not_measure(capsys, tiny_dir, qfile, tmp_path,
                                                         monkeypatch):
    import genrefine.bench.runner as runner

    prompts = []
    real = runner.GenrefineBackend

    class Spy(real):
        def run(self, prompt_ids, *a, **k):
            prompts.append((self.method, list(prompt_ids)))
            return super().run(prompt_ids, *a, **k)

    monkeypatch.setattr(runner, "GenrefineBackend", Spy)
    code, _, err = bench(capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype",
                         "float32", "--methods", "rest", "--quick", "--json",
                         str(tmp_path / "b.json"))
    assert code == 0, err
    for method in ("ar", "rest"):
        seen = [p for m, p in prompts if m == method]
        assert len(seen) == 1 + 4  # the warm-up, then 3 questions (one with two turns)
        assert seen[0] not in seen[1:]


def test_bench_records_exactness_and_the_cpu(capsys, tiny_dir, qfile, tmp_path):
    """float32 is not bitwise exact: every result, the settings header and the report say so
    (and the CPU they ran on); lossless stays the measured token equality."""
    from genrefine.diskcache import cpu_model

    code, _, err = bench(capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype",
                         "float32", "--methods", "pld", "--quick", "--json",
                         str(tmp_path / "b.json"), "--report", str(tmp_path / "b.md"))
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "b.questions.jsonl").read_text().splitlines()]
    header, records = lines[0], lines[1:]
    assert header["bitwise_exact"] is False and header["settings"]["cpu"] == cpu_model()
    assert all(r["bitwise_exact"] is False and r["cpu"] == cpu_model() for r in records)
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["bitwise_exact"] is False and r["machine"]["cpu"] == cpu_model()
    assert r["methods"]["pld"]["lossless"] is True  # measured: pld reproduced ar's tokens
    md = (tmp_path / "b.md").read_text()
    assert len([ln for ln in md.splitlines() if "bitwise exact" in ln]) == 1
    assert len([ln for ln in err.splitlines() if "bitwise exact" in ln]) == 1


def test_report_says_when_exactness_is_off():
    def report(*flags):
        records = [dict(r, bitwise_exact=f) for r, f in zip(RECORDS, flags)]
        return build_report(records, ["ar", "pld"], model="m", dtype="float32", device="cpu",
                            max_new_tokens=8)

    exact = report(True, True, True)
    assert exact["bitwise_exact"] is True and "bitwise exact" not in markdown_report(exact)
    mixed = report(True, False, True)
    assert mixed["bitwise_exact"] is False
    assert len([ln for ln in markdown_report(mixed).splitlines() if "bitwise exact" in ln]) == 1


def test_bench_refuses_results_of_another_version(capsys, tiny_dir, qfile, tmp_path):
    import genrefine

    args = ["--questions", str(qfile), "--model", str(tiny_dir), "--dtype", "float32",
            "--methods", "pld", "--categories", "rag", "--quick", "--json",
            str(tmp_path / "b.json")]
    code, _, err = bench(capsys, *args)
    assert code == 0, err
    jsonl = tmp_path / "b.questions.jsonl"
    lines = jsonl.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["settings"]["version"] == genrefine.__version__
    header["settings"]["version"] = "0.0.1"
    jsonl.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    code, _, err = bench(capsys, *args)
    assert code == 2
    assert "another version of genrefine" in err and "0.0.1" in err and "--fresh" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = bench(capsys, *args, "--fresh")
    assert code == 0, err


def test_bench_transformers_baselines_on_a_tiny_model(capsys, tiny_dir, qfile, tmp_path):
    code, _, err = bench(
        capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype", "float32",
        "--methods", "hf_generate,hf_prompt_lookup", "--categories", "summarization",
        "--quick", "--json", str(tmp_path / "b.json"),
    )
    assert code == 0, err
    m = json.loads((tmp_path / "b.json").read_text())["methods"]
    assert list(m) == ["ar", "hf_generate", "hf_prompt_lookup"]
    assert m["hf_generate"]["tokens_per_step"] == pytest.approx(1.0)
    for name in ("hf_generate", "hf_prompt_lookup"):  # against ar's tokens; hf_generate's
        same, compared = m[name]["same_as_reference"]
        assert compared == m[name]["n_questions"] > 0  # every question compared
        assert m[name]["lossless"] is (same == compared)
    assert sum(m["hf_prompt_lookup"]["accepted_hist"]) > 0
    assert json.loads((tmp_path / "b.json").read_text())["hf_dtype"] == "float32"


def test_transformers_baselines_run_in_the_dtype_fast_on_this_cpu(monkeypatch):
    import genrefine.diskcache as stock
    from genrefine.bench.baselines import hf_dtype

    monkeypatch.setattr(stock, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert hf_dtype("auto", "cpu") == "float32"  # no native bfloat16: torch's is slow there
    assert hf_dtype("gguf", "cpu") == "float32"
    assert hf_dtype("q8_0", "cpu") == "float32"  # not a torch dtype: never passed through
    assert hf_dtype("bfloat16", "cpu") == "bfloat16"  # genrefine's own float dtype
    assert hf_dtype("auto", "cpu", "bfloat16") == "bfloat16"  # --hf-dtype wins
    assert hf_dtype("auto", "cuda:0") == "bfloat16"
    monkeypatch.setattr(stock, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert hf_dtype("auto", "cpu") == "bfloat16"
    assert hf_dtype("gguf", "cpu", "float32") == "float32"


def test_bench_sampling_makes_no_lossless_claim(capsys, tiny_dir, qfile, tmp_path):
    code, _, err = bench(
        capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype", "float32",
        "--methods", "pld", "--categories", "rag", "--quick", "--temperature", "0.8",
        "--repeats", "2", "--json", str(tmp_path / "b.json"),
    )
    assert code == 0, err
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["temperature"] == 0.8 and r["repeats"] == 2
    assert r["methods"]["ar"]["lossless"] is None and r["methods"]["pld"]["lossless"] is None
    line = json.loads((tmp_path / "b.questions.jsonl").read_text().splitlines()[1])
    assert line["methods"]["pld"]["same_as_ar"] is None
    assert [t["repeat"] for t in line["methods"]["pld"]["turns"]] == [0, 1]


def test_bench_splits_each_methods_time_into_phases(capsys, tiny_dir, qfile, tmp_path):
    """The JSON names the weights that ran and, per method, seconds spent in weights (matmuls),
    attention, drafting and the rest, with shares that add up to one; the Markdown shows them."""
    code, _, err = bench(capsys, "--questions", str(qfile), "--model", str(tiny_dir), "--dtype",
                         "float32", "--methods", "ar,pld", "--quick", "--json",
                         str(tmp_path / "b.json"), "--report", str(tmp_path / "b.md"))
    assert code == 0, err
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["weights"] == "float32"
    for m in ("ar", "pld"):
        ph = r["methods"][m]["phases"]
        assert set(ph["seconds"]) == {"weights", "attention", "drafting", "other"}
        assert ph["seconds"]["weights"] > 0 and ph["seconds"]["attention"] > 0
        assert sum(ph["share"].values()) == pytest.approx(1.0)
        assert sum(ph["seconds"].values()) <= r["methods"][m]["time_s"] * 1.001
    assert r["methods"]["ar"]["phases"]["seconds"]["drafting"] == 0
    assert "Where the time goes" in (tmp_path / "b.md").read_text()
