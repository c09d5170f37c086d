"""Packing planner invariants, C++ == Python reference, resume == uninterrupted, collation."""

import itertools

import numpy as np
import pytest
import torch

from fastllava.batch import IGNORE_INDEX
from fastllava.data import packing as P

needs_cpp = pytest.mark.skipif(P._packing is None, reason="fastllava._packing not built (pip install -e .)")
BACKENDS = ["python", pytest.param("cpp", marks=needs_cpp)]


def _lengths(n, seed=0, max_tokens=4096):
    """A LLaVA-like mix: 2/3 image samples (576 image tokens + text), 1/3 text-only, long tail."""
    rng = np.random.default_rng(seed)
    text = np.minimum(rng.lognormal(5.0, 0.9, n).astype(np.int64) + 8, max_tokens - 600)
    return np.where(rng.random(n) < 0.67, text + 576, text)


def _check_epoch(steps, lengths, global_batch, num_ranks, max_tokens):
    seen = []
    for k, step in enumerate(steps):
        assert step.index == k
        assert step.tokens.shape == (step.num_micro_steps, num_ranks)
        step_samples = [i for micro in step.micro_batches for b in micro for i in b]
        expected = min(global_batch, len(lengths) - k * global_batch)
        assert len(step_samples) == expected
        for m, micro in enumerate(step.micro_batches):
            assert len(micro) == num_ranks
            for r, b in enumerate(micro):
                assert step.tokens[m, r] == lengths[b].sum() <= max_tokens
        # M is minimal: one micro-step fewer cannot hold the step's tokens, or the lower bound holds
        bound = -(-int(lengths[step_samples].sum()) // (num_ranks * max_tokens))
        assert step.num_micro_steps >= bound
        seen += step_samples
    assert sorted(seen) == list(range(len(lengths)))  # every sample exactly once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_ranks,global_batch,max_tokens", [(1, 32, 4096), (4, 128, 4096), (8, 128, 2048), (3, 50, 1500)])
def test_steps_invariants(backend, num_ranks, global_batch, max_tokens):
    lengths = _lengths(1003, max_tokens=max_tokens)  # 1003: a short last step
    steps = P.plan_steps(lengths, global_batch, max_tokens, num_ranks, seed=7, backend=backend)
    _check_epoch(steps, lengths, global_batch, num_ranks, max_tokens)
    stats = P.plan_stats(steps[:-1])  # the short last step may leave ranks idle
    assert stats["balance_min"] > 0.85 and stats["balance_mean"] > 0.97, stats
    assert stats["micro_balance_mean"] > 0.9, stats


def test_cpp_equals_python_reference():
    if P._packing is None:
        pytest.skip("fastllava._packing not built")
    rng = np.random.default_rng(1)
    for trial in range(40):
        max_tokens = int(rng.integers(20, 5000))
        n = int(rng.integers(1, 700))
        lengths = rng.integers(1, max_tokens + 1, n)
        group, ranks = int(rng.integers(1, 300)), int(rng.integers(1, 9))
        seed, epoch = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)), int(rng.integers(0, 4))
        cpp = P._plan_epoch(lengths, group, ranks, max_tokens, seed, epoch, "cpp")
        ref = P._plan_epoch(lengths, group, ranks, max_tokens, seed, epoch, "python")
        for a, b in zip(cpp, ref):
            np.testing.assert_array_equal(a, b, err_msg=f"trial {trial}")
    np.testing.assert_array_equal(P._packing.shuffle(1000, 2**64 - 1, 3), P._shuffle_py(1000, 2**64 - 1, 3))


def test_shuffle_matches_splitmix64_spec():
    # splitmix64 from state 0 (Vigna's reference values): 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4.
    # seed = _EPOCH_MUL at epoch 0 gives state 0. Fisher-Yates on 3: i=2 swaps with out1 % 3,
    # then i=1 with out2 % 2.
    order = [0, 1, 2]
    j = 0xE220A8397B1DCDAF % 3
    order[2], order[j] = order[j], order[2]
    j = 0x6E789E6AA1B965F4 % 2
    order[1], order[j] = order[j], order[1]
    assert P._shuffle_py(3, P._EPOCH_MUL, 0) == order
    if P._packing is not None:
        assert P._packing.shuffle(3, P._EPOCH_MUL, 0).tolist() == order
    assert sorted(P._shuffle_py(500, 5, 1)) == list(range(500))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_seed_dependent(backend):
    lengths = _lengths(600)
    a = P.plan_steps(lengths, 64, 4096, 4, seed=3, backend=backend)
    b = P.plan_steps(lengths, 64, 4096, 4, seed=3, backend=backend)
    c = P.plan_steps(lengths, 64, 4096, 4, seed=4, backend=backend)
    d = P.plan_steps(lengths, 64, 4096, 4, seed=3, epoch=1, backend=backend)
    assert [s.micro_batches for s in a] == [s.micro_batches for s in b]
    assert [s.micro_batches for s in a] != [s.micro_batches for s in c]
    assert [s.micro_batches for s in a] != [s.micro_batches for s in d]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_ranks", [1, 4])
def test_plan_packs(backend, num_ranks):
    lengths = _lengths(2000, seed=2)
    packs = P.plan_packs(lengths, 4096, num_ranks, seed=1, shuffle_buffer=512, backend=backend)
    assert len(packs) % num_ranks == 0
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    loads = np.array([lengths[p].sum() for p in packs])
    assert loads.max() <= 4096
    assert loads.sum() / (len(packs) * 4096) > 0.9  # windows of 512 samples pack to > 90 %
    per_micro = loads.reshape(-1, num_ranks)
    assert np.mean(per_micro.mean(1) / per_micro.max(1)) > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_long_sample_names_index(backend):
    lengths = np.array([10, 20, 5000, 30])
    with pytest.raises(ValueError, match=r"sample 2 has 5000 tokens, more than max_tokens=4096"):
        P.plan_packs(lengths, 4096, backend=backend)
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        P.plan_steps([5, 0], 2, 100, backend=backend)


@needs_cpp
def test_cpp_rejects_bad_lengths_itself():
    with pytest.raises(ValueError, match="sample 1 has length 99"):
        P._packing.plan_epoch(np.array([1, 99]), 4, 1, 50, 0, 0)


@pytest.mark.parametrize("mode", ["samples", "tokens"])
def test_resume_mid_epoch_equals_uninterrupted(mode):
    lengths = _lengths(700, seed=4)
    kwargs = dict(num_ranks=2, seed=11, global_batch=64) if mode == "samples" else dict(
        num_ranks=2, seed=11, global_batch=None, micro_steps=3, shuffle_buffer=200)

    def run(planner, n_epochs):
        return [(s.epoch, s.index, s.micro_batches) for _ in range(n_epochs) for s in planner]

    full = run(P.PackingPlanner(lengths, 4096, **kwargs), 2)
    first = P.PackingPlanner(lengths, 4096, **kwargs)
    it = iter(first)
    head = [(s.epoch, s.index, s.micro_batches) for s in itertools.islice(it, 5)]
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (0, 5)
    resumed = P.PackingPlanner(lengths, 4096, **kwargs)
    resumed.load_state_dict(state)
    rest = run(resumed, 2)[: len(full) - 5]
    assert head + rest == full
    epochs = {e for e, _, _ in full}
    assert epochs == {0, 1}
    for e in epochs:  # every sample once per epoch in both modes
        assert sorted(i for ep, _, mb in full if ep == e for micro in mb for b in micro for i in b) == list(range(700))


def test_resume_refuses_other_config():
    state = P.PackingPlanner(_lengths(100), 4096, global_batch=16).state_dict()
    with pytest.raises(ValueError, match="num_ranks"):
        P.PackingPlanner(_lengths(100), 4096, global_batch=16, num_ranks=2).load_state_dict(state)
    with pytest.raises(ValueError, match="lengths_crc32"):
        P.PackingPlanner(_lengths(100, seed=9), 4096, global_batch=16).load_state_dict(state)


def test_falls_back_to_python_with_one_warning(monkeypatch):
    monkeypatch.setattr(P, "_packing", None)
    monkeypatch.setattr(P, "_warned_fallback", False)
    lengths = _lengths(300)
    with pytest.warns(UserWarning, match="not built"):
        a = P.plan_packs(lengths, 4096)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = P.plan_packs(lengths, 4096)  # second call: silent
    assert a == b == P.plan_packs(lengths, 4096, backend="python")


def test_collate_pack_skips_rejected():
    image_token, n_img = 99, 4
    s0 = {"input_ids": torch.tensor([1, image_token, 5, 6]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 5, 6]),
          "pixel_values": torch.randn(1, 3, 8, 8)}
    s1 = {"input_ids": torch.tensor([7, 8, 9]), "labels": torch.tensor([IGNORE_INDEX, 8, 9]), "pixel_values": None}
    batch, rejected = P.collate_pack([s0, None, s1, None], image_token, n_img)
    assert rejected == 2
    assert batch.cu_seqlens.tolist() == [0, 7, 10] and batch.num_images == 1
    assert P.collate_pack([None], image_token, n_img) == (None, 1)
