"""The cold start: lengths tokenized over a pool of processes (data/lengths.py) equal the serial lengths and
encode_sample's, sample by sample; processes sharing a cache compute a file once; a JSON list is parsed once,
each entry kept as the file spells it (data/files.py)."""

import json
import multiprocessing as mp
import os

import numpy as np
import pytest

import fastllava.data.lengths as lengths_mod
from fastllava.data.dataset import LlavaDataset
from fastllava.data.files import SampleError, load_records
from fastllava.data.lengths import length_workers, pooled_lengths
from fastllava.data.templates import Rendered, Template, get_template
from fastllava.data.tokenize import (Fit, _first_labels, batch_lengths, encode_sample, image_token_id,
                                      tokenize_texts)

WORDS = "the sea is deep a cat sat on the red sofa what color is the car blue two people Café 日本語".split()


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n conversations of 1-6 rounds, a third with an image, some long enough to be truncated at 256 tokens
    and some whose first question alone exceeds it (no label survives: rejected)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = []
        for r in range(int(rng.integers(1, 7))):
            q = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 120 if i % 17 == 0 else 12))))
            if r == 0 and i % 3 == 0:
                q = "<image>\n" + q
            turns += [{"from": "human", "value": q},
                      {"from": "gpt", "value": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 15))))}]
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def setup(llama_tok):
    template = get_template("vicuna_v1")
    fit = Fit(image_token_id(llama_tok), num_image_tokens=20, model_max_length=256)
    return llama_tok, template, fit


def test_pooled_lengths_equal_serial_and_encode_sample(setup, tmp_path, monkeypatch):
    tokenizer, template, fit = setup
    turns = conversations(700)
    serial = batch_lengths(turns, tokenizer, template, fit)

    # each chunk's tokenizing process is recorded, so the test sees the pool was used
    pids = tmp_path / "pids"

    def recording(*args):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return batch_lengths(*args)

    monkeypatch.setattr(lengths_mod, "batch_lengths", recording)
    seen = []
    lens, cut, errors = pooled_lengths(len(turns), turns.__getitem__, tokenizer, template, fit, workers=2, chunk=64,
                                       on_chunk=seen.append)
    workers = set(pids.read_text().split())
    assert len(workers) == 2 and str(os.getpid()) not in workers
    assert sum(seen) == len(turns) and len(seen) == 11
    assert lens.dtype == np.int64 and np.array_equal(lens, serial[0]) and np.array_equal(cut, serial[1])
    described = {k: (e.reason, e.detail) for k, e in errors.items()}
    assert described == {k: (e.reason, e.detail) for k, e in serial[2].items()}
    assert 0 < len(errors) and 0 < cut.sum() < len(turns)  # the file has rejects and truncations
    # the independent reference: the per-sample path with offsets and labels
    for i, t in enumerate(turns):
        try:
            assert lens[i] == encode_sample(t, tokenizer, template, fit).length
        except SampleError as e:
            assert errors[i].reason == e.reason == "no_labels"


def _build(path, tok_dir, cache, start, out):
    ds = LlavaDataset(path, None, str(tok_dir), "vicuna_v1", num_image_tokens=20, model_max_length=256,
                      cache_dir=cache, verbose=False, length_workers=1)
    start.wait()  # both processes ask for the lengths at the same moment
    lengths = ds.lengths().tolist()
    out.put((ds.lengths_computed, lengths, ds.valid().tolist()))


def test_processes_sharing_a_cache_compute_once(tmp_path, llama_tok_dir):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": str(i), "conversations": t} for i, t in enumerate(conversations(3000))
                                if "<image>" not in t[0]["value"]]))
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build, args=(path, llama_tok_dir, tmp_path / "cache", start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [0, 1]  # one tokenized, the other waited and read its cache
    assert results[0][1:] == results[1][1:]
    alone = LlavaDataset(path, None, str(llama_tok_dir), "vicuna_v1", num_image_tokens=20, model_max_length=256,
                         cache_dir=None, verbose=False)
    assert results[0][1] == alone.lengths().tolist() and results[0][2] == alone.valid().tolist()


def test_length_workers_setting(monkeypatch):
    monkeypatch.delenv(lengths_mod.WORKERS_ENV, raising=False)
    assert length_workers() == len(os.sched_getaffinity(0))
    assert length_workers(3) == 3
    monkeypatch.setenv(lengths_mod.WORKERS_ENV, "2")
    assert length_workers() == 2
    monkeypatch.setenv(lengths_mod.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="FASTLLAVA_LENGTH_WORKERS='many'"):
        length_workers()
    with pytest.raises(ValueError, match=">= 1"):
        length_workers(0)


def test_json_list_entries_keep_their_text(tmp_path):
    entries = [{"id": i, "image": f"{i}.jpg", "conversations": t, "note": ["é", {"x": None}, 1.5]}
               for i, t in enumerate(conversations(40))]
    for e in entries:
        if "<image>" not in e["conversations"][0]["value"]:
            del e["image"]
    path = tmp_path / "d.json"
    for indent, ascii_ in ((None, True), (3, False)):
        path.write_text(" \n" + json.dumps(entries, indent=indent, ensure_ascii=ascii_) + "\n")
        records = load_records(path, verbose=False)
        assert [records[i] for i in range(len(records))] == entries
        assert records.ids == [str(i) for i in range(40)]
    path.write_text("[]")
    assert len(load_records(path, verbose=False)) == 0
    for bad, line in (('[{"id": 1},\n {"id": 2}\n', 3), ('[{"id": 1}]\n]', 2), ('[{"id": 1},]', 1)):
        path.write_text(bad)
        with pytest.raises(ValueError, match=f"d\\.json: malformed JSON at line {line}"):
            load_records(path, verbose=False)


def test_overlong_first_label_from_a_prefix_and_its_fallback(setup):
    """An over-long sample's first label token is found by tokenizing its text only up to the end of the first
    answer (tokenize._first_labels). Where that prefix tokenizes differently from the whole text (here a loss span
    that ends inside a word, so the prefix's last word is cut), the whole text is tokenized instead: the lengths
    and rejects equal encode_sample's either way."""
    tokenizer, _, fit = setup
    long_q = " ".join(["sofa"] * 400)

    def render(turns):  # a loss span of the "f" of "Café": the prefix ends "Caf", tokenized "Ca" "f", not "Ca" "fé"
        text = turns[0]["value"] + " ASSISTANT: " + turns[1]["value"]
        start = len(turns[0]["value"]) + len(" ASSISTANT: ") + 2
        return Rendered(text, ((start, start + 1),), 0)

    template = Template("cut-inside-a-word", render, stop_str="")
    samples = [[{"from": "human", "value": q}, {"from": "gpt", "value": "Café" + " sea" * 300}]
               for q in ("what color", long_q)]
    rendered = [render(t) for t in samples]
    ids = [tokenize_texts([r.text], tokenizer, fit.img_id)[0][0] for r in rendered]
    assert _first_labels(rendered, ids, tokenizer, fit.img_id) == [None, None]  # the fallback is taken
    ordinary = [[{"from": "human", "value": q}, {"from": "gpt", "value": "cat" + " sea" * 300}] for q in ("what color", long_q)]
    vicuna = get_template("vicuna_v1")
    assert None not in _first_labels([vicuna.render(t) for t in ordinary],
                                     [tokenize_texts([vicuna.render(t).text], tokenizer, fit.img_id)[0][0] for t in ordinary],
                                     tokenizer, fit.img_id)  # the prefix decides these
    for tpl, batch in ((template, samples), (vicuna, ordinary)):
        lens, cut, errors = batch_lengths(batch, tokenizer, tpl, fit)
        assert cut.all()
        assert lens[0] == encode_sample(batch[0], tokenizer, tpl, fit).length
        with pytest.raises(SampleError) as e:
            encode_sample(batch[1], tokenizer, tpl, fit)
        assert list(errors) == [1] and (errors[1].reason, errors[1].detail) == (e.value.reason, e.value.detail)
