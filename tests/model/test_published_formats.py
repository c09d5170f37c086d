"""Base models as they are published: .bin pickle weights (single and sharded, as Vicuna-v1.5 and LLaVA's
released checkpoints ship them) read through a converted, cached safetensors copy, hostile pickles refused,
and a SentencePiece-only tokenizer directory (tokenizer.model, no tokenizer.json) as Vicuna ships it.

transformers 5 no longer writes .bin files (save_pretrained ignores safe_serialization=False), so
`as_bin` rewrites a transformers save into the layout transformers 4 wrote: pytorch_model.bin, or
pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_llava import IMAGE_TOKEN, logits, make_hf_llava, make_samples, write_components

from fastllava import Llava
from fastllava.model.safetensors_io import iter_tensors


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def as_bin(st_dir, bin_dir, shards: int = 1):
    """bin_dir: st_dir's config and tensors (same keys) as torch pickles in `shards` files, no safetensors."""
    bin_dir.mkdir(parents=True)
    state = {}
    for f in sorted(st_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for f in st_dir.glob("*.json"):
        if "safetensors" not in f.name:
            (bin_dir / f.name).write_text(f.read_text())
    keys = list(state)
    if shards == 1:
        torch.save(state, bin_dir / "pytorch_model.bin")
        return bin_dir
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, bin_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return bin_dir


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shards", [1, 3])
def test_llava_bin_loads_as_its_safetensors(hf_llava_dir, tmp_path, shards, capsys):
    st_dir, _ = hf_llava_dir
    bin_dir = as_bin(st_dir, tmp_path / "bin", shards)
    if shards == 1:  # the pre-1.6 torch.save format (not a zip file, cannot be memory-mapped)
        state = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
        torch.save(state, bin_dir / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reference, ours = Llava.from_pretrained(st_dir), Llava.from_pretrained(bin_dir)
    assert_same_parameters(ours, reference)
    samples = make_samples()
    assert torch.equal(logits(ours, samples), logits(reference, samples))
    assert capsys.readouterr().err.count("converting") == shards  # a progress line per shard
    # The lazy reader sharded loading uses (RowReader on the converted copy) reads the same rows.
    for (k, _, eager), (k2, _, lazy) in zip(iter_tensors(bin_dir), iter_tensors(bin_dir, lazy=True), strict=True):
        assert k == k2 and torch.equal(lazy[1:3], eager[1:3]), k


def test_conversion_happens_once_per_file_version(hf_llava_dir, tmp_path, own_cache, capsys):
    bin_dir = as_bin(hf_llava_dir[0], tmp_path / "bin", shards=2)
    Llava.from_pretrained(bin_dir)
    assert "converting" in capsys.readouterr().err
    (copy,) = own_cache.glob("safetensors-from-bin/*")
    mtimes = {f: f.stat().st_mtime_ns for f in copy.iterdir()}
    Llava.from_pretrained(bin_dir)
    assert "converting" not in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in copy.iterdir()} == mtimes
    shard = bin_dir / "pytorch_model-00001-of-00002.bin"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a changed file
    Llava.from_pretrained(bin_dir)
    assert "converting" in capsys.readouterr().err
    assert len(list(own_cache.glob("safetensors-from-bin/*"))) == 2
    assert not list(own_cache.glob("safetensors-from-bin/*.tmp-*"))


def test_safetensors_win_over_bin(hf_llava_dir, own_cache, capsys):
    st_dir, _ = hf_llava_dir
    reference = Llava.from_pretrained(st_dir)
    (st_dir / "pytorch_model.bin").write_bytes(b"not a pickle")  # an error if it were read
    assert_same_parameters(Llava.from_pretrained(st_dir), reference)
    assert "converting" not in capsys.readouterr().err and not own_cache.exists()


class WritesMarker:
    """Unpickling this would run os.system: what weights_only=True exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(hf_llava_dir, tmp_path, own_cache):
    bin_dir = as_bin(hf_llava_dir[0], tmp_path / "bin")
    state = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "ran"
    torch.save({**state, "extra": WritesMarker(marker)}, bin_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused: not only tensors"):
        Llava.from_pretrained(bin_dir)
    assert not marker.exists()
    assert not list(own_cache.glob("safetensors-from-bin/*"))  # nothing half-converted left behind
    # LLaVA's stage-1 mm_projector.bin goes through the same guarded reader.
    torch.save({"model.mm_projector.0.weight": WritesMarker(marker)}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"mm_projector\.bin: refused"):
        Llava.from_pretrained(hf_llava_dir[0]).load_projector(tmp_path / "mm_projector.bin")
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path, hf_llava_dir):
    bin_dir = as_bin(hf_llava_dir[0], tmp_path / "bin")
    torch.save([torch.zeros(2)], bin_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: expected a dict of name -> tensor"):
        Llava.from_pretrained(bin_dir)
    (bin_dir / "pytorch_model.bin").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a readable torch checkpoint"):
        Llava.from_pretrained(bin_dir)


@pytest.mark.parametrize("tie", [False, True])
def test_from_components_with_a_bin_llama(tmp_path, tie):
    """Vicuna's layout for the LLM (tied: lm_head saved as the embedding's storage, which safetensors
    cannot write as it is)."""
    hf_model = make_hf_llava(tie=tie)
    ours = Llava.from_pretrained(_saved(hf_model, tmp_path / "hf"))
    tower, llm, projector = write_components(hf_model, ours, tmp_path)
    bin_llm = as_bin(llm, tmp_path / "llm_bin", shards=2)
    if tie:
        state = torch.load(bin_llm / "pytorch_model-00001-of-00002.bin", weights_only=True)
        other = torch.load(bin_llm / "pytorch_model-00002-of-00002.bin", weights_only=True)
        state.update(other)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        weight_map = json.loads((bin_llm / "pytorch_model.bin.index.json").read_text())
        weight_map["weight_map"] = dict.fromkeys(state, "pytorch_model-00001-of-00002.bin")
        (bin_llm / "pytorch_model.bin.index.json").write_text(json.dumps(weight_map))
        (bin_llm / "pytorch_model-00002-of-00002.bin").unlink()
        torch.save(state, bin_llm / "pytorch_model-00001-of-00002.bin")
    kwargs = {"image_token_id": IMAGE_TOKEN, "vision_feature_layer": ours.config.vision_feature_layer}
    assert_same_parameters(Llava.from_components(tower, bin_llm, projector, **kwargs),
                           Llava.from_components(tower, llm, projector, **kwargs))


def _saved(hf_model, path):
    hf_model.save_pretrained(path)
    return path


def test_sentencepiece_only_tokenizer_loads(tmp_path):
    """Vicuna's tokenizer directory: tokenizer.model and tokenizer_config.json, no tokenizer.json. The fast
    tokenizer transformers converts from it gives SentencePiece's own ids (BOS first)."""
    import sentencepiece as spm

    from fastllava.data.tokenize import load_tokenizer
    from fastllava.testing import TOKENIZER_CORPUS, write_llama_tokenizer

    path = write_llama_tokenizer(tmp_path / "tok")
    assert not (path / "tokenizer.json").exists()
    tokenizer = load_tokenizer(path)
    assert tokenizer.is_fast
    reference = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    for text in TOKENIZER_CORPUS:
        assert tokenizer(text)["input_ids"] == [reference.bos_id(), *reference.encode(text)], text


@pytest.mark.parametrize("blocked", ["sentencepiece", "google.protobuf"])
def test_sentencepiece_needs_are_runtime_dependencies(tmp_path, blocked):
    """Without either package transformers cannot convert tokenizer.model (its error is about tiktoken):
    both are in a plain install's dependencies, and a missing one is named in one line."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    from fastllava.testing import write_llama_tokenizer

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    runtime = {d.split(">")[0].split("=")[0].strip() for d in pyproject["project"]["dependencies"]}
    assert {"sentencepiece", "protobuf"} <= runtime
    path = write_llama_tokenizer(tmp_path / "tok")
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from fastllava.data.tokenize import load_tokenizer\n"
            f"load_tokenizer({str(path)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    package = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}[blocked]
    assert result.returncode != 0
    assert f"tokenizer.model without tokenizer.json needs {package}," in result.stderr.strip().splitlines()[-1]
