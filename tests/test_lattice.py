"""Lattice rescoring: the n-gram LM's distribution and files, beam search against brute force,
the alpha = 0 draft, and the prefix tree built from ranked paths."""

from __future__ import annotations

import itertools

import pytest
import torch

from genrefine.methods.parts.lattice import NgramLM, paths_to_draft, rescore_lattice
from genrefine.errors import ConfigError

V = 7


def trained_lm(order: int = 3, seed: int = 0) -> NgramLM:
    g = torch.Generator().manual_seed(seed)
    lm = NgramLM(order=order, vocab_size=V)
    for _ in range(4):
        lm.add(torch.randint(0, V - 1, (40,), generator=g))  # token V - 1 is never seen
    lm.add([1, 2, 3, 1, 2, 3, 1, 2, 3])
    return lm


def random_lattice(seed: int, K: int = 3, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(K)])  # [K, k]
    logp = torch.randn(K, k, generator=g).log_softmax(-1)  # [K, k]
    return ids, logp


class PreferPath:
    """A scorer (no ``order``: it sees the whole context) that gives 0 to ``target[i]`` at
    position ``i`` after a context of ``base`` tokens and -100 to everything else."""

    def __init__(self, base: int, target: list[int]) -> None:
        self.base, self.target = base, target

    def logprob(self, context, token_ids):
        want = self.target[len(context) - self.base]
        return torch.where(token_ids == want, 0.0, -100.0)


class ContextHash:
    """A deterministic scorer that depends on the whole context (no ``order`` attribute)."""

    def logprob(self, context, token_ids):
        h = sum((i + 1) * t for i, t in enumerate(context))
        return torch.tensor([-(((h * 31 + t * 17) % 11) / 3.0) for t in token_ids.tolist()])


def brute_force(context, ids, logp, lm, alpha, p):
    K, k = ids.shape
    scored = []
    for choice in itertools.product(range(k), repeat=K):
        toks, s = [], 0.0
        for i, j in enumerate(choice):
            lm_lp = float(lm.logprob(list(context) + toks, ids[i])[j])
            s += float(logp[i, j]) + alpha * lm_lp
            toks.append(int(ids[i, j]))
        scored.append((toks, s))
    scored.sort(key=lambda ts: -ts[1])
    return scored[:p]


# ---------------------------------------------------------------------------- NgramLM
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("context", [[], [1, 2], [0, 4, 5], [6, 6], [2, 6, 1], [3, 3, 3, 3]])
def test_ngram_distribution_sums_to_one(order, context):
    lm = trained_lm(order)
    lp = lm.logprob(context, torch.arange(V))
    assert lp.dtype == torch.float32 and lp.shape == (V,)
    assert torch.isfinite(lp).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_ngram_prefers_seen_continuation():
    lm = NgramLM(order=3, vocab_size=V)
    lm.add([1, 2, 3] * 10)
    for ctx, nxt in [([1, 2], 3), ([2, 3], 1), ([3, 1], 2), ([5, 1], 2)]:
        lp = lm.logprob(ctx, torch.arange(V))
        assert int(lp.argmax()) == nxt
        assert lp[nxt].exp() > 0.8
    # a tensor context reads the same as a list
    lp = lm.logprob([1, 2], torch.arange(V))
    assert torch.equal(lm.logprob(torch.tensor([1, 2]), torch.arange(V)), lp)
    assert len(lm) == lm.num_ngrams == 3 + 3 + 3


def test_ngram_save_load_round_trip(tmp_path):
    lm = trained_lm(3)
    path = lm.save(tmp_path / "lm.safetensors")
    back = NgramLM.load(path)
    assert (back.order, back.vocab_size, back.discount, len(back)) == (3, V, 0.75, len(lm))
    for ctx in ([], [1], [1, 2], [4, 0, 6]):
        assert torch.equal(back.logprob(ctx, torch.arange(V)), lm.logprob(ctx, torch.arange(V)))


def test_ngram_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        NgramLM.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ConfigError, match="not a valid"):
        NgramLM.load(junk)
    # a valid safetensors file with an out-of-range token id
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file(
        {"ngrams_1": torch.tensor([[V]]), "counts_1": torch.tensor([1])},
        str(bad),
        metadata={"format": "genrefine-ngram-lm", "version": "1", "order": "1",
                  "vocab_size": str(V), "discount": "0.75"},
    )
    with pytest.raises(ConfigError, match="not a valid"):
        NgramLM.load(bad)


def test_ngram_rejects_bad_values():
    with pytest.raises(ConfigError):
        NgramLM(order=0, vocab_size=V)
    with pytest.raises(ConfigError):
        NgramLM(order=2, vocab_size=V, discount=0.0)
    with pytest.raises(ConfigError):
        NgramLM(order=2, vocab_size=V).add([0, V])


# ---------------------------------------------------------------------------- rescoring
@pytest.mark.parametrize("seed", range(5))
def test_alpha_zero_is_per_column_argmax(seed):
    ids, logp = random_lattice(seed, K=4, k=5)
    best = ids.gather(1, logp.argmax(1, keepdim=True)).squeeze(1).tolist()
    other = [int(r[(int(a) + 1) % 5]) for r, a in zip(ids, logp.argmax(1))]
    for lm in (trained_lm(), PreferPath(2, other)):
        paths = rescore_lattice([4, 5], ids, logp, lm, alpha=0.0, num_paths=3)
        assert paths[0][0] == best
        assert paths[0][1] == pytest.approx(float(logp.max(1).values.sum()))


def test_rescore_follows_a_strong_lm():
    ids, logp = random_lattice(1, K=4, k=4)
    target = [int(ids[i, (int(logp[i].argmax()) + 1) % 4]) for i in range(4)]  # never the argmax
    paths = rescore_lattice([0, 1, 2], ids, logp, PreferPath(3, target), alpha=1.0, num_paths=2)
    assert paths[0][0] == target
    assert paths[1][0] != target and paths[1][1] < paths[0][1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("make_lm", [trained_lm, lambda: trained_lm(2), ContextHash])
def test_beam_search_matches_brute_force(seed, make_lm):
    lm = make_lm()
    ids, logp = random_lattice(seed)
    context = [3, 1, 2]
    for alpha, p in [(1.0, 1), (0.5, 4), (2.0, 27)]:
        got = rescore_lattice(context, ids, logp, lm, alpha=alpha, num_paths=p, beam=27)
        want = brute_force(context, ids, logp, lm, alpha, p)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_small_beam_returns_distinct_ranked_paths():
    ids, logp = random_lattice(3, K=5, k=4)
    paths = rescore_lattice([1], ids, logp, trained_lm(), alpha=1.0, num_paths=4, beam=2)
    assert len(paths) == 4 and len({tuple(t) for t, _ in paths}) == 4
    assert all(len(t) == 5 for t, _ in paths)
    scores = [s for _, s in paths]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(ConfigError):
        rescore_lattice([1], ids, logp, trained_lm(), num_paths=0)


# ---------------------------------------------------------------------------- tree
def test_paths_to_draft_shares_prefixes():
    d = paths_to_draft([[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9], [1, 2, 3]])
    assert d.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert d.parents.tolist() == [-1, 0, 1, 1, 0, 4, -1, 6, 7]
    assert d.probs is None
    assert len(paths_to_draft([])) == 0


@pytest.mark.parametrize("seed", range(4))
def test_rescored_paths_make_a_valid_tree(seed):
    K = 4
    ids, logp = random_lattice(seed, K=K, k=3)
    paths = [t for t, _ in rescore_lattice([2], ids, logp, trained_lm(), num_paths=6)]
    d = paths_to_draft(paths)
    parents, tokens = d.parents.tolist(), d.tokens.tolist()
    assert all(-1 <= p < i for i, p in enumerate(parents))
    assert parents[:K] == [-1, 0, 1, 2] and tokens[:K] == paths[0]
    # every path is a root-to-leaf walk, and no two siblings carry the same token
    for path in paths:
        node = -1
        for t in path:
            kids = [i for i, p in enumerate(parents) if p == node and tokens[i] == t]
            assert len(kids) == 1
            node = kids[0]
    assert len(d) == len({tuple(p[:m]) for p in paths for m in range(1, K + 1)})


def test_repeated_candidates_give_distinct_paths():
    ids = torch.tensor([[1, 1, 2], [3, 4, 4]])  # [K=2, k=3], repeated tokens within columns
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.2, -3.0]])  # the first copy scores best
    got = rescore_lattice([0], ids, logp, trained_lm(), alpha=0.0, num_paths=9, beam=9)
    assert [t for t, _ in got] == [[1, 3], [1, 4], [2, 3], [2, 4]]
    assert [s for _, s in got] == pytest.approx([-0.6, -0.7, -2.1, -2.2])


def test_pruned_model_drops_rare_ngrams_and_stays_normalised():
    lm = NgramLM(order=3, vocab_size=7)
    lm.add([1, 2, 3, 1, 2, 3, 1, 2, 4, 5, 6])
    small = lm.pruned(2)
    assert small.num_ngrams < lm.num_ngrams
    for ctx in ([1, 2], [4, 5], [6]):
        total = float(small.logprob(ctx, torch.arange(7)).exp().sum())
        assert abs(total - 1.0) < 1e-5, ctx
    # (1, 2) -> 3 seen twice survives; (2, 4) seen once does not
    assert small.logprob([1, 2], torch.tensor([3]))[0] > small.logprob([1, 2], torch.tensor([4]))[0]
    assert lm.logprob([2], torch.tensor([4]))[0] > small.logprob([2], torch.tensor([4]))[0]
