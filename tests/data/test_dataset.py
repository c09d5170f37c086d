"""LlavaDataset: samples, lengths that match what __getitem__ yields (and PackedBatch), the reject policy
for tokenization and image failures, strict mode, the per-file lengths cache."""

import json
import os

import numpy as np
import pytest
import torch

from fastllava.batch import IGNORE_INDEX, PackedBatch
from fastllava.data.dataset import LlavaDataset

S = 8  # image side for the fake loader


def conv(*pairs):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(pairs)]


def entries():
    return [
        {"id": "img1", "image": "a.jpg", "conversations": conv("<image>\nWhat is in the image?", "A cat.")},
        {"id": "text", "conversations": conv("Write a poem about the sea.", "The sea is wide.")},
        {"id": "img2", "image": ["a.jpg", "b.jpg"],
         "conversations": conv("<image>\nFirst?", "A cat.", "<image>\nSecond?", "A small dog next to the window.")},
        {"id": "bad", "conversations": conv("q", "a")[::-1]},  # structural reject
        {"id": "long", "conversations": conv("Describe the image in detail.", "the sea is deep " * 60)},
    ]


class FakeLoader:
    """Records calls; a path containing 'broken' fails like a corrupt file."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, mode, size):
        self.calls.append((os.path.basename(path), mode, size))
        if "broken" in path:
            raise OSError(f"cannot identify image file {path!r}")
        return torch.full((3, size, size), float(len(self.calls)))


def make(tmp_path, tok_dir, data=None, **kw):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data if data is not None else entries()))
    kw.setdefault("image_loader", FakeLoader())
    kw.setdefault("cache_dir", tmp_path / "cache")
    return LlavaDataset(path, tmp_path / "images", str(tok_dir), "vicuna_v1", image_size=S, num_image_tokens=20,
                        verbose=False, **kw)


def test_samples_and_lengths_agree_with_packed_batch(tmp_path, llama_tok_dir):
    ds = make(tmp_path, llama_tok_dir, image_mode="square")
    assert len(ds) == 4 and ds.rejects.counts == {"roles": 1}
    samples = [ds[i] for i in range(len(ds))]
    assert [s["id"] for s in samples] == ["img1", "text", "img2", "long"]
    assert samples[0]["pixel_values"].shape == (1, 3, S, S) and samples[1]["pixel_values"] is None
    assert samples[2]["pixel_values"].shape == (2, 3, S, S)
    assert ds.image_loader.calls == [("a.jpg", "square", S), ("a.jpg", "square", S), ("b.jpg", "square", S)]
    assert ds.has_image().tolist() == [True, False, True, False]
    img = ds.image_token_id
    for s in samples:
        assert int((s["input_ids"] == img).sum()) == (0 if s["pixel_values"] is None else len(s["pixel_values"]))
        assert (s["labels"] != IGNORE_INDEX).any()
    batch = PackedBatch.from_samples(samples, image_token_id=img, num_image_tokens=20)
    assert np.diff(batch.cu_seqlens.numpy()).tolist() == ds.lengths().tolist()
    assert ds.valid().all() and ds.num_truncated == 0


def test_truncation_drops_trailing_images_and_counts(tmp_path, llama_tok_dir):
    full = make(tmp_path, llama_tok_dir)
    ids = full[2]["input_ids"]
    second = int(torch.nonzero(ids == full.image_token_id)[1])  # token index of the second image
    # room for everything before the second image plus 10 of its 20 positions: it must go entirely
    ds = make(tmp_path, llama_tok_dir, model_max_length=second + 19 + 10)
    s = ds[2]
    assert s["pixel_values"].shape[0] == int((s["input_ids"] == ds.image_token_id).sum()) == 1
    assert torch.equal(s["input_ids"], ids[:second])
    assert ds.lengths()[2] == second + 19 == len(s["input_ids"]) + 19
    assert [c[0] for c in ds.image_loader.calls] == ["a.jpg"]  # the dropped image is never decoded
    assert ds.num_truncated == 2  # img2 and long


def test_overlong_reject_policy(tmp_path, llama_tok_dir):
    ds = make(tmp_path, llama_tok_dir, model_max_length=200, overlong="reject")
    lengths, valid = ds.lengths(), ds.valid()
    assert valid.tolist() == [True, True, True, False] and lengths[3] == 1  # placeholder for the planner
    assert ds[3] is None and ds.rejects.counts == {"roles": 1, "overlong": 1}
    lines = [json.loads(x) for x in open(ds.rejects.path)]
    assert [(r["id"], r["reason"]) for r in lines] == [("bad", "roles"), ("long", "overlong")]  # once each
    with pytest.raises(ValueError, match=r"entry 3.*'long'.*overlong"):
        make(tmp_path, llama_tok_dir, data=[e for e in entries() if e["id"] != "bad"], model_max_length=200,
             overlong="reject", strict=True).lengths()


def test_failing_image_is_a_reject_or_raises_in_strict_mode(tmp_path, llama_tok_dir):
    data = entries()[:3]
    data[2]["image"] = ["a.jpg", "broken.jpg"]
    ds = make(tmp_path, llama_tok_dir, data=data, rejects_path=tmp_path / "rej.jsonl")
    assert ds[0] is not None and ds[2] is None
    (rec,) = [json.loads(x) for x in open(tmp_path / "rej.jsonl")]
    assert rec["id"] == "img2" and rec["reason"] == "image" and "broken.jpg" in rec["detail"]
    assert ds.rejects.counts == {"image": 1}
    strict = make(tmp_path, llama_tok_dir, data=data, strict=True)
    with pytest.raises(ValueError, match=r"'img2'.*broken\.jpg"):
        strict[2]


def test_structural_reject_in_strict_mode_fails_at_load(tmp_path, llama_tok_dir):
    with pytest.raises(ValueError, match=r"data\.json entry 3.*'bad'.*roles"):
        make(tmp_path, llama_tok_dir, strict=True)


def test_lengths_cache_is_used_and_invalidated(tmp_path, llama_tok_dir, monkeypatch):
    ds = make(tmp_path, llama_tok_dir)
    expected = ds.lengths().copy()
    (cache,) = os.listdir(tmp_path / "cache" / "lengths")
    import fastllava.data.lengths as lengths_mod

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(lengths_mod, "batch_lengths", boom)
    again = LlavaDataset(tmp_path / "data.json", None, ds.tokenizer, "vicuna_v1", num_image_tokens=20,
                         cache_dir=tmp_path / "cache", verbose=False)
    assert np.array_equal(again.lengths(), expected)
    monkeypatch.undo()
    # a different num_image_tokens is a different cache entry
    other = LlavaDataset(tmp_path / "data.json", None, ds.tokenizer, "vicuna_v1", num_image_tokens=30,
                         cache_dir=tmp_path / "cache", verbose=False)
    assert np.array_equal(other.lengths() - expected, 10 * other.records.num_images)
    assert len(os.listdir(tmp_path / "cache" / "lengths")) == 2


def test_bad_arguments(tmp_path, llama_tok_dir):
    with pytest.raises(ValueError, match="image_mode"):
        make(tmp_path, llama_tok_dir, image_mode="crop")
    with pytest.raises(ValueError, match="overlong"):
        make(tmp_path, llama_tok_dir, overlong="drop")
    with pytest.raises(ValueError, match="local directory"):
        LlavaDataset(tmp_path / "data.json", None, "lmsys/vicuna-7b-v1.5", "vicuna_v1")


def test_default_image_loader_reads_real_files(tmp_path, llama_tok_dir):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    data = entries()[:1] + [dict(entries()[0], id="broken", image="broken.jpg")]
    ds = make(tmp_path, llama_tok_dir, data=data, image_loader=None)
    assert ds[0]["pixel_values"].shape == (1, 3, S, S)
    assert ds[1] is None and ds.rejects.counts == {"image": 1}


def test_rejects_found_with_the_lengths_are_counted_on_the_console(tmp_path, llama_tok_dir, capsys):
    """The files' summary is printed before any sample is tokenized; the rejects found then get their own line,
    with the rejects file, and describe_rejects() names them all for an error."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries()))
    ds = LlavaDataset(path, tmp_path / "images", str(llama_tok_dir), "vicuna_v1", image_size=S, num_image_tokens=20,
                      model_max_length=200, overlong="reject", cache_dir=None)
    summary = capsys.readouterr().err
    assert "data: 4 samples from 5 entries" in summary and "1 rejected" in summary  # the structural one only
    ds.lengths()
    err = capsys.readouterr().err
    assert (f"data: 1 more rejected while computing lengths (1 overlong), 3 of 4 samples left\n"
            f"  rejects written to {ds.rejects.path}") in err
    assert ds.describe_rejects().startswith(f"2 of the 5 entries of {path} rejected (1 roles, 1 overlong), e.g. "
                                            f"{path} entry 3, id 'bad': roles: ")
    assert ds.describe_rejects().endswith(f"the rejects file {ds.rejects.path} lists each")
