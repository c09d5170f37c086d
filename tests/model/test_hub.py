"""Models by Hub id, through huggingface_hub itself, against the same files loaded from a plain local
directory: a Hub cache laid out as huggingface_hub lays it out (models--org--name/blobs, snapshots/<sha>/
links to the blobs, refs/<branch or tag>) read offline (HF_HUB_OFFLINE), and downloads from a loopback
server speaking the Hub's HTTP API (HF_ENDPOINT)."""

import json
import shutil

import pytest
import torch
from hub_fakes import LoopbackHub, assert_same, hub_cache, put, resolve_online, snapshot_of  # noqa: F401 (a fixture)
from tiny_llava import make_hf_llava, write_components

from fastllava import Llava
from fastllava.model import hub
from fastllava.testing import write_llama_tokenizer, write_tiny_llava


def test_from_pretrained_by_id_loads_the_cached_snapshot(hub_cache, tmp_path):
    local = write_tiny_llava(tmp_path / "local", seed=0)
    sha = put(hub_cache, "org/tiny", local)
    assert hub.resolve("org/tiny") == hub_cache / "models--org--tiny" / "snapshots" / sha
    assert_same(Llava.from_pretrained("org/tiny"), Llava.from_pretrained(local))


def test_revision_picks_a_branch_tag_or_commit(hub_cache, tmp_path):
    first = put(hub_cache, "org/tiny", write_tiny_llava(tmp_path / "s0", seed=0))
    put(hub_cache, "org/tiny", write_tiny_llava(tmp_path / "s1", seed=1), refs=("v2",))
    seed0, seed1 = Llava.from_pretrained(tmp_path / "s0"), Llava.from_pretrained(tmp_path / "s1")
    assert_same(Llava.from_pretrained("org/tiny@v2"), seed1)
    assert_same(Llava.from_pretrained(f"org/tiny@{first}"), seed0)
    assert_same(Llava.from_pretrained("org/tiny"), seed0)
    # Two different seeds really differ, so the equalities above tell the revisions apart.
    assert not torch.equal(seed0.state_dict()["lm_head.weight"], seed1.state_dict()["lm_head.weight"])


def test_a_local_path_wins_over_an_id(hub_cache, tmp_path, monkeypatch):
    put(hub_cache, "org/tiny", write_tiny_llava(tmp_path / "cached", seed=0))
    monkeypatch.chdir(tmp_path)
    write_tiny_llava(tmp_path / "org" / "tiny", seed=1)
    assert hub.resolve("org/tiny").resolve() == tmp_path / "org" / "tiny"
    assert_same(Llava.from_pretrained("org/tiny"), Llava.from_pretrained(tmp_path / "org" / "tiny"))


def test_missing_id_offline_names_the_id_and_the_offline_mode(hub_cache):
    offline = r"model org/absent: .*org/absent is not in the Hub cache .*\(HF_HUB_OFFLINE is set\)"
    with pytest.raises(ValueError, match=offline):
        Llava.from_pretrained("org/absent")
    with pytest.raises(ValueError, match=r"org/absent@v9 is not in the Hub cache"):
        hub.resolve("org/absent@v9")


def test_neither_a_path_nor_an_id_is_an_error_saying_both(hub_cache, tmp_path):
    with pytest.raises(ValueError, match="does not exist as a local path, and is not a Hugging Face Hub id"):
        Llava.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a Hugging Face Hub id"):
        hub.resolve("org/name@")


def test_a_bin_only_repository_loads_through_its_pickles(hub_cache, tmp_path):
    """Vicuna-v1.5's case: no safetensors in the repository, so resolve fetches the .bin weights too."""
    from test_published_formats import as_bin

    local = write_tiny_llava(tmp_path / "st", seed=0)
    pickled = as_bin(local, tmp_path / "bin")
    put(hub_cache, "org/pickled", pickled)
    assert not any(hub.resolve("org/pickled").glob("*.safetensors"))
    assert_same(Llava.from_pretrained("org/pickled"), Llava.from_pretrained(local))


def test_run_config_components_by_id_build_what_local_dirs_build(hub_cache, tmp_path):
    """model.vision_path / model.llm_path as Hub ids: the tokenizer, the model and the image processor that
    train/build.py makes equal those of the same directories given as paths."""
    from fastllava.config import load_config
    from fastllava.train.build import build_image_processor, build_model, build_tokenizer

    hf = make_hf_llava()
    tower, llm, _ = write_components(hf, Llava.from_pretrained(write_tiny_llava(tmp_path / "t")), tmp_path)
    write_llama_tokenizer(llm)
    put(hub_cache, "org/tower", tower)
    put(hub_cache, "org/llm", llm)

    def build(vision, decoder):
        cfg = load_config(None, ["train.device=cpu", f"model.vision_path={vision}", f"model.llm_path={decoder}"])
        tokenizer, ids = build_tokenizer(cfg)
        model = build_model(cfg, ids)
        return tokenizer, model, build_image_processor(cfg, model)

    tok_id, by_id, proc_id = build("org/tower", "org/llm")
    tok_dir, by_dir, proc_dir = build(tower, llm)
    assert tok_id.get_vocab() == tok_dir.get_vocab()
    assert_same(by_id, by_dir)
    assert proc_id == proc_dir


def test_ranks_of_one_torchrun_job_share_one_resolution(hub_cache, tmp_path, monkeypatch):
    """The first rank of a node resolves and records the snapshot; a later rank of the same job reads the
    record (no Hub look-up: it still works once the ref is gone), a rank of another job resolves again."""
    put(hub_cache, "org/tiny", write_tiny_llava(tmp_path / "local"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    first = hub.resolve("org/tiny")
    (hub_cache / "models--org--tiny" / "refs" / "main").unlink()
    monkeypatch.setattr(hub, "_resolved", {})  # a new process
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hub.resolve("org/tiny") == first
    monkeypatch.setattr(hub, "_resolved", {})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job2")
    with pytest.raises(ValueError, match="not in the Hub cache"):
        hub.resolve("org/tiny")


def test_chat_and_eval_load_a_model_by_id(hub_cache, tmp_path):
    from fastllava.generate.inputs import image_processor, load_model, model_template

    local = write_tiny_llava(tmp_path / "local")
    put(hub_cache, "org/tiny", local)
    model, tokenizer = load_model("org/tiny", device="cpu")
    assert_same(model, load_model(local, device="cpu")[0])
    assert model_template("org/tiny") == model_template(local)
    assert image_processor(model.config, "org/tiny") == image_processor(model.config, local)


def test_original_layout_tower_named_by_id_in_its_config(hub_cache, tmp_path):
    """LLaVA's own config.json names its tower by Hub id (mm_vision_tower: openai/clip-vit-large-patch14-336):
    resolved from the cache, it loads as the same tower given as a directory."""
    from fastllava.testing import tiny_config, tiny_model

    out = tmp_path / "orig"
    tiny_model(tiny_config(projector_type="linear")).save_pretrained(out)  # the original layout + vision_tower/
    tower = tmp_path / "clip"
    shutil.move(out / "vision_tower", tower)
    put(hub_cache, "org/clip", tower)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "org/clip"}))
    assert_same(Llava.from_pretrained(out), Llava.from_pretrained(out, vision_tower=tower))


def test_download_fetches_only_what_is_read_never_pickles_beside_safetensors(tmp_path, monkeypatch):
    from test_published_formats import as_bin

    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "fastllava-cache"))
    local = write_tiny_llava(tmp_path / "st")
    both = tmp_path / "both"
    shutil.copytree(local, both)
    torch.save({"not": torch.zeros(1)}, both / "pytorch_model.bin")  # a repository that ships both formats
    (both / "training_args.bin").write_bytes(b"a pickle nothing should fetch")
    (both / "README.md").write_text("model card")
    pickled = as_bin(local, tmp_path / "bin")
    (pickled / "training_args.bin").write_bytes(b"a pickle nothing should fetch")
    server = LoopbackHub({"org/both": both, "org/pickled": pickled})
    try:
        snapshot = snapshot_of(resolve_online(server.endpoint, tmp_path / "hub", "org/both"))
        assert sorted(server.fetched) == sorted(f"org/both/{f.name}" for f in local.iterdir())
        assert_same(Llava.from_pretrained(snapshot), Llava.from_pretrained(local))

        server.fetched.clear()
        snapshot = snapshot_of(resolve_online(server.endpoint, tmp_path / "hub", "org/pickled"))
        assert "org/pickled/pytorch_model.bin" in server.fetched
        assert "org/pickled/training_args.bin" not in server.fetched
        assert_same(Llava.from_pretrained(snapshot), Llava.from_pretrained(local))

        absent = resolve_online(server.endpoint, tmp_path / "hub", "org/absent")
        assert absent.returncode != 0
        assert "model org/absent: no local path of that name, and the Hub has no repository org/absent" in absent.stderr
    finally:
        server.server.shutdown()
