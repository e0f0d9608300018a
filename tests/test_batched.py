"""The batched target forward: every sequence gets bit for bit what its own forward gives it.

Sequences of different lengths, chains and trees, one-token (``ar``) steps and drafts, every
native family (sliding windows, soft-capping, QK-norm); then the batched decoding of
:class:`~genrefine.engine.Decoder` steps equals each sequence decoded alone.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from genrefine.engine import Decoder, Engine, Stats
from genrefine.registry import build_method
from genrefine.models.batched import BatchItem, batches_rows, forward_batch, plan_groups
from genrefine.models.runtime import NativeModel
from genrefine.types import SamplingParams
from genrefine.verify import build_tree
from tiny import FAMILIES, quantized_native, tiny_hf_model, without_exact_rows


@functools.lru_cache(maxsize=None)
def native(family: str, dtype: torch.dtype) -> NativeModel:
    return NativeModel.from_hf(tiny_hf_model(family), dtype=dtype)


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n,), generator=g)


def _items(m: NativeModel) -> list[BatchItem]:
    """Four sequences: a one-token step, a chain, a tree, a longer chain; prefixes of 3..20."""
    out = []
    specs = [(5, None), (11, 4), (20, "tree"), (3, 9)]
    for j, (prefix, draft) in enumerate(specs):
        cache = m.new_cache(64)
        m.forward(_ids(prefix, j), cache)
        if draft is None:
            out.append(BatchItem(_ids(1, 10 + j), cache))
        elif draft == "tree":
            parents = torch.tensor([-1, -1, 0, 0, 1, 2])
            info = build_tree(parents)
            pos = cache.length + torch.cat([torch.zeros(1, dtype=torch.long), 1 + info.depth])
            out.append(BatchItem(_ids(7, 10 + j), cache, pos, info.mask_with_root))
        else:
            out.append(BatchItem(_ids(draft + 1, 10 + j), cache))
    return out


def test_plan_groups() -> None:
    assert plan_groups([1, 1, 1], 64) == [[0, 1, 2]]
    assert plan_groups([30, 30, 30], 64) == [[0, 1], [2]]
    assert plan_groups([70, 2, 2], 64) == [[0], [1, 2]]


def _row_by_row(m: NativeModel):
    """A linear that computes every row as a one-row matmul: batch-invariant by construction."""
    inner = m._linear

    def linear(x, weight, bias):
        return torch.cat([inner(x[r : r + 1], weight, bias) for r in range(x.shape[0])])

    return linear


def _compare(m: NativeModel, exact: bool) -> None:
    items = _items(m)
    alone = copy.deepcopy(items)
    got = forward_batch(m, items, mode="always")
    for it, ref, logits in zip(items, alone, got):
        want = m.forward(ref.tokens, ref.cache, positions=ref.positions, tree_mask=ref.tree_mask)
        if exact:
            assert torch.equal(logits, want.logits)
        else:  # bf16 kernels: equal but for rare one-ulp roundings of the accumulation order
            torch.testing.assert_close(logits, want.logits, atol=2e-2, rtol=2e-2)
            assert (logits == want.logits).float().mean() > 0.95
        assert it.cache.length == ref.cache.length
        n = it.cache.length
        for layer in range(m.num_layers):
            same = torch.equal if exact else torch.testing.assert_close
            same(it.cache.keys[layer][:, :n], ref.cache.keys[layer][:, :n])
            same(it.cache.values[layer][:, :n], ref.cache.values[layer][:, :n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_forward_gives_each_sequence_its_own_forward(family, dtype, monkeypatch) -> None:
    """With a batch-invariant linear, every logit and cache entry is bitwise what the sequence's
    own ``model.forward`` computes: attention, masks (windows, trees, row-exact plans), positions
    and cache writes are the runtime's."""
    m = native(family, dtype)
    monkeypatch.setattr(m, "_linear", _row_by_row(m))
    _compare(m, exact=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "gemma2"])
def test_one_call_batch_gives_each_sequence_its_own_forward(family, tmp_path, monkeypatch) -> None:
    """Quantized weights with the C++ kernels: the batched forward runs every layer of every
    sequence in one call (kernels.run_layer_stack_batch, not the layer-by-layer path), and each
    sequence's logits and cache are bitwise its own forward's (a one-token step, a chain, a tree
    and a longer chain over prefixes of different lengths)."""
    from genrefine.kernels import load_extension

    if not load_extension():
        pytest.skip("no C++ extension on this machine: the batched forward runs layer by layer")
    monkeypatch.setenv("GENREFINE_CACHE", str(tmp_path))
    m = quantized_native(tiny_hf_model(family))
    assert m.fused_layers and batches_rows(m)

    def layer_by_layer(*args, **kwargs):
        raise AssertionError("the batched forward went layer by layer")

    monkeypatch.setattr(m, "_batched_layer", layer_by_layer)
    _compare(m, exact=True)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_kernels_batched(family: str) -> None:
    """With the real kernels the rows agree as far as bfloat16 matmuls are batch-invariant: the
    invariance probe makes them so for its test inputs, but on the development CPU a one-row and
    a many-row matmul still round about one output in 10^5 differently (one ulp). Verification
    in ``NativeModel.forward`` lives with the same kernels."""
    m = native(family, torch.bfloat16)
    if not m.bitwise_exact:  # the probe failed here: what the fallback promises
        _each_alone_without_exact_rows(m)
        return
    assert batches_rows(m)
    _compare(m, exact=False)


def _each_alone_without_exact_rows(m: NativeModel) -> None:
    """Without exact rows batching is off by default: every sequence gets exactly its own
    forward (``--batching always`` still batches, equal up to rounding)."""
    assert not m.bitwise_exact and not batches_rows(m) and batches_rows(m, "always")
    items = _items(m)
    alone = copy.deepcopy(items)
    for ref, logits in zip(alone, forward_batch(m, items)):
        want = m.forward(ref.tokens, ref.cache, positions=ref.positions, tree_mask=ref.tree_mask)
        assert torch.equal(logits, want.logits)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_without_exact_rows_runs_each_sequence_alone(family: str) -> None:
    """The fallback of the test above, on every machine: a model whose probe failed."""
    _each_alone_without_exact_rows(without_exact_rows(family))


def test_float32_runs_each_sequence_alone_unless_asked() -> None:
    m = native("gemma3_text", torch.float32)
    assert not m.bitwise_exact and not batches_rows(m) and batches_rows(m, "always")
    items = _items(m)
    alone = copy.deepcopy(items)
    got = forward_batch(m, items, mode="always")  # batched anyway: equal up to rounding
    for ref, logits in zip(alone, got):
        want = m.forward(ref.tokens, ref.cache, positions=ref.positions, tree_mask=ref.tree_mask)
        torch.testing.assert_close(logits, want.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["ar", "pld", "jacobi", "lookahead", "swift"])
def test_batched_decoding_equals_each_alone(method: str, dtype: torch.dtype) -> None:
    """Decoder steps of sequences that join and leave at different times, one forward per step."""
    m = native("gemma3_text", dtype)
    # batched where rows are exact; each sequence alone otherwise: equal to decoding alone either way
    assert batches_rows(m) == m.bitwise_exact
    prompts = [(_ids(8, 1).tolist() * 3), _ids(5, 2).tolist(), (_ids(4, 3).tolist() * 5)]
    budgets = [30, 12, 24]
    params = SamplingParams()
    alone = []
    for p, b in zip(prompts, budgets):
        out = Engine(m, build_method(method, m)).generate(p, b, params)
        alone.append([t for chunk in out for t in chunk])
    decs, outs = [], [[] for _ in prompts]
    for step in range(80):
        if step < len(prompts):  # one sequence joins per step
            j = step
            d = Decoder(m, build_method(method, m), torch.tensor(prompts[j]), budgets[j], params,
                        frozenset(), Stats(method))
            outs[j] += d.start()
            decs.append((j, d))
        live = [(j, d, d.propose()) for j, d in decs if not d.done]
        live = [(j, d, s) for j, d, s in live if s is not None]
        if not live and step >= len(prompts):
            break
        items = [BatchItem(s.tokens, s.cache, s.positions, s.tree_mask) for _, _, s in live]
        for (j, d, _), logits in zip(live, forward_batch(m, items)):
            outs[j] += d.accept(logits)
    assert outs == alone
