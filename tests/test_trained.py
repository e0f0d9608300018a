"""Trained drafters (prediction heads: bpd, medusa, bpd+ngram, bpd+lm; EAGLE): greedy identity
with ``ar`` on tiny native models, training lowers the loss and raises tokens per step over
untrained drafters, checkpoint + resume equals an uninterrupted run, a drafter refuses another
model, the sampled output of a tree drafter keeps the target's distribution, and the CLI.

The training corpus is the tiny model's own greedy continuations of random prompts, so that
there is something for a drafter to learn from a random-weight target.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from genrefine.cli import main
from genrefine.methods.medusa import MedusaDrafter
from genrefine.methods.parts.heads import HeadsNet, static_tree
from genrefine.methods.parts.store import load_drafter, read_drafter
from genrefine.engine import Engine, Stats
from genrefine.errors import ConfigError
from genrefine.methods.base import FixedPolicy, Method, MethodOptions
from genrefine.registry import build_method
from genrefine.models.runtime import NativeModel
from genrefine.methods.parts.draft_size import TreeCut
from genrefine.sampling import logits_to_probs
from genrefine.train.loop import CHECKPOINT, TrainConfig
from genrefine.train.record import record
from genrefine.train.run import DrafterSpec, measure_tokens_per_step, run_training
from genrefine.types import SamplingParams
from test_verify import chi_square_ok
from tiny import char_tokenizer, save_tiny_model_dir, tiny_hf_model

GREEDY = SamplingParams()
FAMILIES = ("llama", "gemma3_text")
HEADS_METHODS = ("bpd", "medusa", "bpd+ngram", "bpd+lm")
SEQ = 64


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path / "cache"))


@functools.lru_cache(maxsize=None)
def native(family: str, seed: int = 0, vocab: int = 97) -> NativeModel:
    m = NativeModel.from_hf(tiny_hf_model(family, seed, vocab))
    m.name = f"tiny-{family}-{seed}"
    return m


def run(m, method, prompt, max_new=40, params=GREEDY):
    stats = Stats(method.name)
    out = [t for c in Engine(m, method).generate(prompt, max_new, params, stats=stats) for t in c]
    return out, stats


@functools.lru_cache(maxsize=None)
def corpus(family: str) -> tuple[str, ...]:
    """The model's greedy continuations of 60 random prompts, as text."""
    m, tok = native(family), char_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(60):
        p = torch.randint(3, 97, (8,), generator=g)
        out, _ = run(m, Method("ar"), p, 120)
        texts.append(tok.decode(p.tolist() + out))
    return tuple(texts)


SPEC = {
    "heads": DrafterSpec(kind="heads", seq_len=SEQ, max_tokens=20_000, tree_nodes=8),
    "eagle": DrafterSpec(kind="eagle", seq_len=SEQ, max_tokens=20_000),
    # the EAGLE-1 layer vLLM and SGLang run (no input or output norms, unscaled embedding)
    "eagle-engine": DrafterSpec(kind="eagle", seq_len=SEQ, max_tokens=20_000, eagle_style="engine"),
}


@functools.lru_cache(maxsize=None)
def trained(family: str, kind: str, steps: int = 200) -> Path:
    import tempfile

    out = Path(tempfile.mkdtemp(prefix=f"genrefine-{kind}-"))
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=10, batch=8, checkpoint_every=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENREFINE_CACHE", str(out / "cache"))
        res = run_training(native(family), char_tokenizer(), list(corpus(family)), SPEC[kind], cfg,
                           out, progress=False)
    assert res.ar_steps_equal
    return out


def held_out(family: str):
    rec = record(native(family), char_tokenizer(), list(corpus(family)), SEQ, 20_000, cache=False,
                 progress=False)
    return rec.split(0.05, 0)[1]


# --------------------------------------------------------------------------- lossless
@pytest.mark.parametrize(
    "kind, name",
    [("heads", n) for n in HEADS_METHODS] + [("eagle", "eagle"), ("eagle-engine", "eagle")],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_methods_equal_ar(family: str, kind: str, name: str) -> None:
    m = native(family)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (10,), generator=g).tolist() for _ in range(3)]
    prompts.append(char_tokenizer().encode(corpus(family)[1][:24], add_special_tokens=False))
    method = build_method(name, m, MethodOptions(drafter=str(trained(family, kind))))
    accepted = 0
    for p in prompts:
        ref, _ = run(m, Method("ar"), p)
        got, stats = run(m, method, p)
        assert got == ref, p
        accepted += stats.accepted
    assert accepted > 0  # the drafts were used, not empty


def test_trees_are_trees_and_budgets_hold() -> None:
    m = native("llama")
    out_dir = trained("llama", "eagle")
    for budget in (1, 3, 16):
        method = build_method("eagle", m, MethodOptions(drafter=str(out_dir), draft_len=budget))
        _, stats = run(m, method, [4, 5, 6, 7], 30)
        assert stats.drafted <= budget * stats.steps
    acc = torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1]])
    tree = static_tree(acc, 6)
    assert tree[:3] == [(0,), (0, 0), (1,)]  # 0.6, 0.3, 0.2 (ties: the heap's order)
    assert all(p[:-1] in tree[: i] or len(p) == 1 for i, p in enumerate(tree))


def test_tree_cut_keeps_what_pays_on_this_machine() -> None:
    """TreeCut: with flat forward times (a GPU) every node is kept; when each verified node costs
    a tenth of a step, only the nodes likely enough to be accepted are; accepted lengths above
    what the draft expected raise the calibration and so the kept count."""
    probs = [0.9, 0.8, 0.5, 0.2, 0.1, 0.05, 0.01]
    assert TreeCut(lambda n: 1.0)(probs) == len(probs)
    cut = TreeCut(lambda n: 1.0 + 0.1 * (n - 1))
    # (1 + sum p[:n]) / (1 + 0.1 n): 2.7/1.2 (n=2) < 3.2/1.3 (n=3) > 3.4/1.4 (n=4)
    assert cut(probs) == 3
    for _ in range(3):  # 8 accepted each time where 2.2 were expected: c = 26 / 8.6
        cut(probs)
        cut.observe(8, 8)
    assert cut(probs) > 3  # n = 4 pays once c > 2.5
    cut.reset()
    assert cut(probs) == 3
    assert TreeCut(lambda n: 1.0 + 10.0 * (n - 1))(probs) == 1  # never fewer than one node


@pytest.mark.parametrize("name", ["eagle", "medusa", "bpd", "bpd+ngram", "bpd+lm"])
def test_cut_trees_stay_lossless_and_deterministic(name: str) -> None:
    """eagle and the heads methods cut their drafts with the forward times measured for the model
    on first use; no clock is read while generating, so a seeded sample is the same twice."""
    m = native("llama")
    kind = "eagle" if name == "eagle" else "heads"
    method = build_method(name, m, MethodOptions(drafter=str(trained("llama", kind))))
    assert method.drafters[0].cut is not None
    whole_opts = MethodOptions(drafter=str(trained("llama", kind)), tree_cut=False)
    assert build_method(name, m, whole_opts).drafters[0].cut is None  # --no-tree-cut
    prompt = char_tokenizer().encode(corpus("llama")[1][:24], add_special_tokens=False)
    ref, _ = run(m, Method("ar"), prompt, 30)
    got, stats = run(m, method, prompt, 30)
    assert got == ref and stats.accepted > 0
    sample = SamplingParams(0.8, seed=5)
    first, _ = run(m, method, prompt, 30, sample)
    again, _ = run(m, method, prompt, 30, sample)
    assert first == again
    d = method.drafters[0]
    d.cut = TreeCut(lambda n: 1.0 + 10.0 * (n - 1))  # every extra node costs 10 steps
    got, steep = run(m, method, prompt, 30)
    assert got == ref and steep.drafted <= steep.steps  # at most one node a step
    d.cut = None
    _, whole = run(m, method, prompt, 30)
    d.cut = TreeCut(lambda n: 1.0)  # flat times: nothing is cut
    _, flat = run(m, method, prompt, 30)
    assert (flat.drafted, flat.steps) == (whole.drafted, whole.steps)
    assert whole.drafted > steep.drafted


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["heads", "eagle", "eagle-engine"])
def test_training_lowers_loss_and_raises_tokens_per_step(kind: str) -> None:
    m = native("llama")
    test = held_out("llama")
    name = "medusa" if kind == "heads" else "eagle"
    trained_method = build_method(name, m, MethodOptions(drafter=str(trained("llama", kind))))
    tps_trained, same = measure_tokens_per_step(m, trained_method, test, prompts=4)
    assert same
    # the same drafter before training: zero steps is the initialisation
    out0 = trained("llama", kind, steps=1)
    untrained = build_method(name, m, MethodOptions(drafter=str(out0)))
    tps0, _ = measure_tokens_per_step(m, untrained, test, prompts=4)
    assert tps_trained > tps0 + 0.2, (tps_trained, tps0)


def test_heads_loss_goes_down() -> None:
    """The heads' training loss on held-back windows, before and after training."""
    from genrefine.train.run import HeadsBundle, heads_loss

    m = native("llama")
    test = held_out("llama")
    rows = m.lm_head
    d = read_drafter(trained("llama", "heads"))
    bundle = HeadsBundle(m.hidden_size, 4, 4)
    fresh = heads_loss(m, rows, test, bundle)
    idx = torch.arange(test.tokens.shape[0])
    loss0, logs0 = fresh(idx, 0)
    bundle.heads.weight.data = d.tensors["heads.weight"].float()
    bundle.heads.bias.data = d.tensors["heads.bias"].float()
    bundle.lm.load_state_dict({k[3:]: v.float() for k, v in d.tensors.items() if k.startswith("lm.")})
    loss1, logs1 = fresh(idx, 0)
    # the targets are the tiny model's near-uniform distributions: their entropy dominates the
    # cross-entropy, so the loss moves little while head 1's top-1 agreement moves a lot
    assert float(loss1.detach()) < float(loss0.detach())
    assert logs1["acc1"] > logs0["acc1"] + 0.1, (logs0, logs1)


@pytest.mark.parametrize("kind", ["heads", "eagle"])
def test_resume_gives_the_same_weights(tmp_path, kind: str) -> None:
    m, tok, texts = native("llama"), char_tokenizer(), list(corpus("llama"))
    cfg = TrainConfig(steps=6, lr=3e-3, warmup=2, batch=4, checkpoint_every=2)
    spec = SPEC[kind]
    run_training(m, tok, texts, spec, cfg, tmp_path / "whole", progress=False, eval_prompts=1)
    res = run_training(m, tok, texts, spec, cfg, tmp_path / "cut", progress=False, stop_after=3)
    assert (tmp_path / "cut" / CHECKPOINT).exists()
    assert not (tmp_path / "cut" / "drafter.safetensors").exists()
    run_training(m, tok, texts, spec, cfg, tmp_path / "cut", progress=False, eval_prompts=1)
    a = read_drafter(tmp_path / "whole").tensors
    b = read_drafter(tmp_path / "cut").tensors
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different run refuses the checkpoint
    other = TrainConfig(steps=6, lr=1e-3, warmup=2, batch=4, checkpoint_every=2)
    with pytest.raises(ConfigError, match="other settings"):
        run_training(m, tok, texts, spec, other, tmp_path / "cut", progress=False)


def test_a_drafter_for_another_model_is_refused() -> None:
    out_dir = trained("llama", "heads")
    other = native("gemma3_text")
    with pytest.raises(ConfigError, match="tiny-llama-0.*tiny-gemma3_text-0"):
        build_method("medusa", other, MethodOptions(drafter=str(out_dir)))
    with pytest.raises(ConfigError, match="'heads' drafter but this method needs 'eagle'"):
        load_drafter(out_dir, "eagle", native("llama"))
    with pytest.raises(ConfigError, match="no trained drafter"):
        build_method("bpd", native("llama"), MethodOptions(drafter=str(out_dir / "nope")))
    with pytest.raises(ConfigError, match="no trained eagle drafter"):
        build_method("eagle", native("llama"))  # nothing shipped for a tiny model


# --------------------------------------------------------------------------- sampling
V = 5


def _target_joint(m, prefix: tuple[int, ...], params, length: int) -> dict:
    def probs(ctx):
        c = m.new_cache(32)
        logits = m.forward(torch.tensor(ctx), c).logits[-1]
        return logits_to_probs(logits.unsqueeze(0), params)[0]

    out = {}
    for seq in itertools.product(range(V), repeat=length):
        w = 1.0
        for i, y in enumerate(seq):
            w *= float(probs(prefix + seq[:i])[y])
        out[seq] = w
    return out


def test_tree_drafter_sampling_has_the_target_distribution() -> None:
    """A Medusa tree (random heads, so the tree holds both accepted and rejected branches) under
    speculative sampling: the joint of the first 3 new tokens matches the target's (Monte Carlo,
    seeded; the exact enumeration of deterministic trees is in test_verify)."""
    m = native("llama", 0, V)
    torch.manual_seed(0)
    net = HeadsNet(m.hidden_size, 2)
    net.weight.data.normal_(0, 0.5)
    tree = [(0,), (1,), (0, 0), (0, 1), (1, 0)]
    d = MedusaDrafter(m, net, torch.arange(V), tree=tree, topk=2)
    method = Method("medusa", [d], FixedPolicy(d, len(tree)), len(tree))
    params = SamplingParams(temperature=0.8)
    prefix = (1, 3)
    want = _target_joint(m, prefix, params, 3)
    counts, n, drafted = Counter(), 800, 0
    for seed in range(n):
        p = SamplingParams(0.8, seed=seed)
        # 5 new tokens: the first from the prefill, then a tree step of 3 nodes (two siblings
        # and a grandchild); the first 3 tokens' joint is the target's
        out, stats = run(m, method, list(prefix), 5, p)
        counts[tuple(out[:3])] += 1
        drafted += stats.drafted
    assert drafted >= n * 3
    assert chi_square_ok(counts, want, n)


# --------------------------------------------------------------------------- command line
def test_cli_train_and_generate(tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    save_tiny_model_dir(model_dir, "llama")
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text("the cat sat on the mat. " * 300)
    out = tmp_path / "heads"
    rc = main(["train", "heads", "--model", str(model_dir), "--corpus", str(corpus_dir),
               "--out", str(out), "--steps", "4", "--seq-len", "32", "--max-tokens", "3000",
               "--dtype", "float32", "--no-progress", "--self-generated", "2"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "tokens/step" in err and "same tokens as ar" in err
    assert (out / "drafter.safetensors").exists() and (out / "ngram.safetensors").exists()
    rc = main(["generate", "the cat", "--model", str(model_dir), "--method", "bpd+ngram",
               "--drafter", str(out), "--max-new-tokens", "8", "--dtype", "float32"])
    assert rc == 0
    # user mistakes: one line, exit 2, no traceback
    assert main(["train", "heads", "--model", str(model_dir), "--corpus", str(tmp_path / "none"),
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "eagle", "--model", str(model_dir), "--corpus", str(corpus_dir),
                 "--out", str(tmp_path / "e"), "--steps", "0"]) == 2
    assert main(["generate", "x", "--model", str(model_dir), "--method", "eagle",
                 "--drafter", str(out), "--dtype", "float32"]) == 2
    assert "'heads' drafter" in capsys.readouterr().err


# --------------------------------------------------------------------------- self-generated data
def test_self_generated_answers_are_the_greedy_answers() -> None:
    from genrefine.train.selfgen import generate_batched, prompts, self_generated_texts

    m, tok = native("llama"), char_tokenizer()
    ps = prompts(tok, 5, max_tokens=200)
    assert len(ps) == 5 and max(map(len, ps)) <= 200 and all(p and p[0] == 1 for p in ps)  # BOS, no chat template: plain text
    eos = {ps[0][-1]}  # some token that comes up: answers must stop before it
    one = generate_batched(m, ps, 12, eos, batch=1, progress=False)
    for p, a in zip(ps, one):
        ref, _ = run(m, Method("ar"), p, 12)
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        assert a == ref[:cut]
    many = generate_batched(m, ps, 12, eos, batch=3, progress=False)
    assert all(len(a) <= 12 and not (set(a) & eos) for a in many)
    texts = self_generated_texts(m, tok, eos, 3, max_new=8, progress=False)
    assert texts == self_generated_texts(m, tok, eos, 3, max_new=8, progress=False)  # cached
    assert len(texts) == 3


# --------------------------------------------------------------------------- distilled draft model
def test_distilled_draft_model_beats_its_shallow_start_and_stays_lossless(tmp_path) -> None:
    import genrefine

    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    gen = genrefine.load(str(model_dir), dtype="float32", quiet=True)
    m, tok = gen.model, gen.tokenizer
    texts = [" ".join(["the cat sat on the mat", "a dog ran in the park"][i % 2] for i in range(60))
             for _ in range(8)]
    spec = DrafterSpec(kind="draft", layers=1, seq_len=64, max_tokens=6000)
    cfg = TrainConfig(steps=60, lr=3e-3, warmup=5, batch=4)
    res = run_training(m, tok, texts, spec, cfg, tmp_path / "draft", progress=False,
                       source=str(model_dir), eval_prompts=3)
    assert res.ar_steps_equal
    assert (tmp_path / "draft" / "config.json").exists()
    start = build_method("sps", m, MethodOptions(draft_model=str(tmp_path / "draft" / "init")), tok)
    test = record(m, tok, texts, 64, 6000, progress=False).split(0.05, 0)[1]
    tps0, same0 = measure_tokens_per_step(m, start, test, prompts=3)
    assert same0 and res.tokens_per_step > tps0, (res.tokens_per_step, tps0)
