"""Length profiles (counts from the LLaVA repository, determinism, bounds) and the stats tool's batching
arithmetic on hand-computed cases."""

import json

import numpy as np
import pytest

from fastllava.data.profile import MIX665K, PRETRAIN558K, sample_lengths, sample_profile
from fastllava.data.reference_sampler import padding_efficiency, reference_batches
from fastllava.data.stats import main, packing_efficiency

LLAVA_665K = {"llava_instruct": 157_712, "sharegpt": 40_688, "vqav2": 82_783, "gqa": 72_140, "okvqa": 8_998,
              "ocrvqa": 80_000, "aokvqa": 66_160, "textcaps": 21_953, "refcoco": 48_447, "vg": 86_417}


def test_mix665k_counts_are_llavas():
    counts = {}
    for s in MIX665K:
        key = "llava_instruct" if s.name.startswith("llava_instruct") else s.name
        counts[key] = counts.get(key, 0) + s.count
    assert counts == LLAVA_665K
    assert sum(counts.values()) == 665_298 and sum(s.count for s in PRETRAIN558K) == 558_128


def test_full_profile_shapes_and_bounds():
    out = sample_profile("mix665k")
    lengths, has_image = out["lengths"], out["has_image"]
    assert lengths.shape == has_image.shape == (665_298,) and lengths.dtype == np.int64
    assert int((~has_image).sum()) == 40_688
    assert lengths.max() <= 2048 and lengths[has_image].min() >= 576 + 1 + 35
    names = out["names"]
    per_source = np.bincount(out["source"], minlength=len(names))
    assert dict(zip(names, per_source.tolist())) == {s.name: s.count for s in MIX665K}
    # a few modelled facts the benchmarks rely on: ShareGPT is the long tail, VQA-style samples are short
    median = {n: np.median(lengths[out["source"] == k]) for k, n in enumerate(names)}
    assert median["sharegpt"] > median["gqa"] > median["vqav2"] > median["aokvqa"]
    pre, pre_img = sample_lengths("pretrain558k")
    assert pre.shape == (558_128,) and pre_img.all() and 580 <= np.median(pre) <= 600


def test_deterministic_and_proportional_subsets():
    a = sample_lengths("mix665k", n=5000, seed=3)
    b = sample_lengths("mix665k", n=5000, seed=3)
    c = sample_lengths("mix665k", n=5000, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
    out = sample_profile("mix665k", n=1000)
    per_source = np.bincount(out["source"], minlength=len(MIX665K))
    exact = np.array([s.count for s in MIX665K]) * 1000 / 665_298
    assert per_source.sum() == 1000 and np.all(np.abs(per_source - exact) < 1)
    lengths, _ = sample_lengths("mix665k", n=100, num_image_tokens=1, model_max_length=None)
    assert lengths.max() < 2048 + 600
    with pytest.raises(ValueError, match="unknown profile"):
        sample_lengths("mix1m")


def test_reference_batches_follow_llavas_sampler():
    # 2 devices x batch 2: a megabatch of 4 is sorted longest first and dealt to the lighter device
    lengths = np.array([10, 40, 30, 20, 5, 6, 7, 8, 9, 11])
    has_image = np.array([True] * 4 + [False] * 6)
    batches = reference_batches(lengths, has_image, batch_size=2, world_size=2, seed=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(10)) and all(len(b) <= 2 for b in batches)
    mm_full = [b for b in batches if set(b.tolist()) == {1, 0} or set(b.tolist()) == {2, 3}]
    assert len(mm_full) == 2  # the only full image megabatch: 40 + 10 on one device, 30 + 20 on the other
    for b in batches:  # no batch mixes modalities except the final leftovers
        if len(set(has_image[b].tolist())) > 1:
            assert b is batches[-1] or b is batches[-2]
    assert padding_efficiency(np.array([4, 2, 3, 3]), [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(12 / 14)


def test_packing_efficiency():
    # Two packs of exactly 10 exist (6+4, 5+3+2); at seed 0 plan_packs's closing best-fit phase finds them.
    eff, n_packs = packing_efficiency(np.array([6, 5, 4, 3, 2]), 10)
    assert n_packs == 2 and eff == pytest.approx(1.0)


def test_stats_cli_on_profile_and_data(tmp_path, llama_tok_dir, capsys, monkeypatch):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["--profile", "mix665k", "--n", "4000", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "reference batching" in out and "padding efficiency" in out and "fill" in out
    data = [{"id": str(i), "conversations": [{"from": "human", "value": "What color is the car?" * (i % 5 + 1)},
                                             {"from": "gpt", "value": "Blue. " * (i % 7 + 1)}]} for i in range(40)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    assert main(["--data", str(path), "--tokenizer", str(llama_tok_dir), "--max-tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "40 usable samples" in out and "word counts" in out
