"""The model paths beyond the model directories, by Hub id, through huggingface_hub itself (its offline cache
layout, and a loopback server speaking its HTTP API): the stage-1 projector (`model.projector_weights`,
`Llava.load_projector`, `from_pretrained` / `from_components(projector_weights=)`), LLaVA's published
mm_projector.bin and a file named inside a repository of several; the tokenizer (`model.tokenizer_path`),
the checkpoint (`model.pretrained_path`) and the image processor (`data.image_processor`). Each is checked
against the same files given as local paths, or the tensors that were written. Also what docs/recipes.md
tells users: a gated repository's error, and `python -m fastllava.model.hub` or `hf download`, then
HF_HUB_OFFLINE=1."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hub_fakes import LoopbackHub, assert_same, hub_cache, put, resolve_online, snapshot_of  # noqa: F401 (a fixture)
from tiny_llava import make_hf_llava, write_components

from fastllava import Llava
from fastllava.config import load_config
from fastllava.model import hub
from fastllava.testing import tiny_config, write_tiny_llava

BASE = ["train.device=cpu", "model.vision_path=org/tower", "model.llm_path=org/llm"]


def llava_projector_bin(model: Llava, path):
    """The projector as LLaVA's stage 1 saves mm_projector.bin: torch.save of a dict keyed as its
    nn.Sequential names them (Linear, GELU, Linear: model.mm_projector.0.* and .2.*)."""
    state = {f"model.mm_projector.{2 * i}.{leaf}": getattr(linear, leaf).detach().clone()
             for i, linear in enumerate(model.projector.linears) for leaf in ("weight", "bias")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def same_projector(model: Llava, donor: Llava):
    for (name, a), (_, b) in zip(model.projector.state_dict().items(), donor.projector.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_projector_by_id_is_llavas_mm_projector_bin_everywhere_a_projector_is_taken(hub_cache, tmp_path):
    """A repository laid out as liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 (config.json +
    mm_projector.bin): Llava.load_projector, from_pretrained(projector_weights=) and a run configuration's
    model.projector_weights (with pretrained_path and tokenizer_path ids too) all place its tensors."""
    from fastllava.train.build import build_model, build_tokenizer

    base_dir = write_tiny_llava(tmp_path / "base", seed=0)
    donor = Llava.from_pretrained(write_tiny_llava(tmp_path / "donor", seed=1))
    repo = tmp_path / "pretrain"
    llava_projector_bin(donor, repo / "mm_projector.bin")
    (repo / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))
    put(hub_cache, "liuhaotian/tiny-pretrain", repo)
    put(hub_cache, "org/tiny", base_dir)
    base = Llava.from_pretrained(base_dir)
    with pytest.raises(AssertionError):
        same_projector(base, donor)  # the seeds differ, so the checks below tell the projectors apart

    loaded = Llava.from_pretrained(base_dir)
    loaded.load_projector("liuhaotian/tiny-pretrain")
    planned = Llava.from_pretrained("org/tiny", projector_weights="liuhaotian/tiny-pretrain")
    cfg = load_config(None, ["train.device=cpu", "model.source=pretrained", "model.pretrained_path=org/tiny",
                             "model.tokenizer_path=org/tiny", "model.projector_weights=liuhaotian/tiny-pretrain"])
    tokenizer, ids = build_tokenizer(cfg)
    built = build_model(cfg, ids)
    for model in (loaded, planned, built):
        same_projector(model, donor)
    base.load_projector(repo / "mm_projector.bin")
    assert_same(planned, base)  # the rest is the checkpoint's
    assert tokenizer.get_vocab() == build_tokenizer(load_config(None, BASE + [f"model.tokenizer_path={base_dir}"]))[0].get_vocab()


def test_components_take_a_stage1_output_as_a_folder_or_a_repository(hub_cache, tmp_path):
    """fastllava's own stage-1 output (projector.safetensors) as a local folder, or uploaded as a repository,
    is the projector file itself."""
    tower, llm, projector = write_components(make_hf_llava(), Llava.from_pretrained(write_tiny_llava(tmp_path / "t")),
                                             tmp_path)
    stage1 = tmp_path / "outputs" / "stage1"
    stage1.mkdir(parents=True)
    shutil.copy(projector, stage1 / "projector.safetensors")
    for repo_id, src in (("org/tower", tower), ("org/llm", llm), ("me/stage1", stage1)):
        put(hub_cache, repo_id, src)
    by_file = Llava.from_components(tower, llm, projector_weights=projector)
    assert_same(Llava.from_components("org/tower", "org/llm", projector_weights="me/stage1"), by_file)
    assert_same(Llava.from_components(tower, llm, projector_weights=stage1), by_file)
    with pytest.raises(ValueError, match=r"the local directory .*outputs holds none of mm_projector.safetensors, "
                                         r"mm_projector.bin, projector.safetensors"):
        Llava.from_components(tower, llm, projector_weights=tmp_path / "outputs")


def test_a_file_of_a_repository_of_several_is_named_after_the_id(hub_cache, tmp_path):
    """org/name[@revision]/path/in/repo picks one file; a repository without the default names says so and
    shows that form."""
    base = Llava.from_pretrained(write_tiny_llava(tmp_path / "base"))
    donors = [Llava.from_pretrained(write_tiny_llava(tmp_path / f"d{seed}", seed=seed)) for seed in (1, 2)]
    repo = tmp_path / "several"
    llava_projector_bin(donors[0], repo / "7b" / "projector-cc3m.bin")
    donors[1].save_projector(repo / "other.safetensors")
    put(hub_cache, "org/several", repo, refs=("main", "v1"))

    base.load_projector("org/several/7b/projector-cc3m.bin")
    same_projector(base, donors[0])
    base.load_projector("org/several@v1/other.safetensors")
    same_projector(base, donors[1])
    with pytest.raises(ValueError, match=r"model.projector_weights org/several: no local file of that name, and the "
                                         r"Hub repository org/several has none of mm_projector.safetensors, "
                                         r"mm_projector.bin, projector.safetensors \(HF_HUB_OFFLINE is set.*\); "
                                         r"name a file in it as org/several\[@revision\]/FILE"):
        base.load_projector("org/several")
    with pytest.raises(ValueError, match=r"org/several@v1 has none of absent.bin"):
        base.load_projector("org/several@v1/absent.bin")
    with pytest.raises(ValueError, match=r"org/absent is not in the Hub cache"):
        base.load_projector("org/absent/mm_projector.bin")
    # A revision holding "/" is written with %2F, as in huggingface_hub's hf:// paths.
    assert hub.split_file_ref("org/several@refs%2Fpr%2F1/7b/x.bin") == ("org/several@refs/pr/1", "7b/x.bin")


def test_image_processor_by_id_reads_the_repositorys_preprocessor_config(hub_cache, tmp_path):
    from transformers import CLIPImageProcessor

    from fastllava.train.build import build_image_processor

    CLIPImageProcessor(image_mean=[0.25] * 3, crop_size=28, size={"shortest_edge": 28}).save_pretrained(tmp_path / "proc")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    put(hub_cache, "org/proc", tmp_path / "proc")
    put(hub_cache, "org/bare", tmp_path / "bare")
    model = Llava(tiny_config())
    by_id = build_image_processor(load_config(None, BASE + ["data.image_processor=org/proc"]), model)
    assert by_id == build_image_processor(load_config(None, BASE + [f"data.image_processor={tmp_path / 'proc'}"]), model)
    assert by_id.mean == (0.25,) * 3
    with pytest.raises(ValueError, match=r"data.image_processor org/bare: .* holds no preprocessor_config.json"):
        build_image_processor(load_config(None, BASE + ["data.image_processor=org/bare"]), model)


def test_configuration_takes_ids_without_the_hub_and_refuses_what_is_neither(hub_cache, tmp_path):
    """Ids pass validation with nothing cached and the Hub offline (nothing is resolved before the run); a
    value that is neither an existing path nor an id is refused at once, naming the key and both readings."""
    load_config(None, ["model.source=components", "model.vision_path=openai/clip-vit-large-patch14-336",
                       "model.llm_path=lmsys/vicuna-7b-v1.5", "model.tokenizer_path=lmsys/vicuna-7b-v1.5@main",
                       "model.projector_weights=liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
                       "data.image_processor=openai/clip-vit-large-patch14-336"])
    load_config(None, ["model.source=pretrained", "model.pretrained_path=llava-hf/llava-1.5-7b-hf",
                       "model.projector_weights=org/several@v1/7b/projector-cc3m.bin"])
    both = "does not exist as a local path, and is not a Hugging Face Hub id"
    for key, bad in [("model.vision_path", tmp_path / "nope"), ("model.llm_path", "org/name@"),
                     ("model.tokenizer_path", "org/name/extra"), ("model.pretrained_path", "./checkpoints/x"),
                     ("model.projector_weights", tmp_path / "outputs" / "projector.safetensors")]:
        with pytest.raises(ValueError, match=rf"{key} {bad}: {both}"):
            load_config(None, [*BASE, f"{key}={bad}"])
    with pytest.raises(ValueError, match=r"data.image_processor .*nowhere.* nor a Hugging Face Hub id"):
        load_config(None, [*BASE, f"data.image_processor={tmp_path / 'nowhere'}"])


def test_ranks_of_one_torchrun_job_share_one_projector_resolution(hub_cache, tmp_path, monkeypatch):
    repo = tmp_path / "pretrain"
    llava_projector_bin(Llava.from_pretrained(write_tiny_llava(tmp_path / "t")), repo / "mm_projector.bin")
    put(hub_cache, "org/proj", repo)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    first = hub.resolve_projector("org/proj")
    (hub_cache / "models--org--proj" / "refs" / "main").unlink()
    monkeypatch.setattr(hub, "_resolved", {})  # a new process of the same job: reads the first rank's record
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hub.resolve_projector("org/proj") == first


def test_download_fetches_the_projector_or_the_preprocessor_config_alone_and_names_a_gated_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "fastllava-cache"))
    donor = Llava.from_pretrained(write_tiny_llava(tmp_path / "t"))
    repo = tmp_path / "pretrain"
    llava_projector_bin(donor, repo / "mm_projector.bin")
    (repo / "config.json").write_text("{}")
    (repo / "trainer_state.json").write_text("{}")
    tower = tmp_path / "tower"
    donor.save_components(tower, tmp_path / "llm")
    (tower / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    server = LoopbackHub({"liuhaotian/tiny-pretrain": repo, "org/tower": tower}, gated={"meta-llama/gated"})
    try:
        path = snapshot_of(resolve_online(server.endpoint, tmp_path / "hub", "liuhaotian/tiny-pretrain",
                                          "resolve_projector"))
        assert server.fetched == ["liuhaotian/tiny-pretrain/mm_projector.bin"]
        base = Llava.from_pretrained(tmp_path / "t")
        base.load_projector(path)
        same_projector(base, donor)

        server.fetched.clear()
        snapshot_of(resolve_online(server.endpoint, tmp_path / "hub", "org/tower", files=("preprocessor_config.json",)))
        assert server.fetched == ["org/tower/preprocessor_config.json"]
        assert len(list(tower.iterdir())) > 2  # the tower's weights and config were there, and not fetched

        absent = resolve_online(server.endpoint, tmp_path / "hub", "org/tower/mm_projector.bin", "resolve_projector")
        assert absent.returncode != 0
        assert "the Hub repository org/tower has none of mm_projector.bin;" in absent.stderr

        gated = resolve_online(server.endpoint, tmp_path / "hub", "meta-llama/gated")
        assert gated.returncode != 0
        assert ("model meta-llama/gated: meta-llama/gated is gated on the Hub: accept its terms on huggingface.co and "
                "log in (hf auth login) or set HF_TOKEN") in gated.stderr
    finally:
        server.server.shutdown()


HF_DOWNLOAD = ["hf", "download", "lmsys/tiny", "--include", "*.json", "--include", "*.safetensors", "--include",
               "pytorch_model*.bin", "--include", "tokenizer.model"]
FETCH = [sys.executable, "-m", "fastllava.model.hub", "lmsys/tiny", "--projector", "liuhaotian/tiny-pretrain"]


@pytest.mark.parametrize("command", [FETCH, HF_DOWNLOAD], ids=["fastllava.model.hub", "hf download"])
def test_predownload_then_run_offline(command, tmp_path, monkeypatch):
    """docs/recipes.md's commands for an offline cluster (here a .bin-only repository, Vicuna-v1.5's case):
    fill the cache online, then with HF_HUB_OFFLINE=1 the model (and the projector) load from that cache."""
    from test_published_formats import as_bin

    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "fastllava-cache"))
    local = write_tiny_llava(tmp_path / "st")
    pickled = as_bin(local, tmp_path / "bin")
    (pickled / "tf_model.h5").write_bytes(b"weights fastllava never reads")
    donor = Llava.from_pretrained(write_tiny_llava(tmp_path / "donor", seed=1))
    llava_projector_bin(donor, tmp_path / "pretrain" / "mm_projector.bin")
    server = LoopbackHub({"lmsys/tiny": pickled, "liuhaotian/tiny-pretrain": tmp_path / "pretrain"})
    env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        download = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert download.returncode == 0, download.stderr
        assert "lmsys/tiny/tf_model.h5" not in server.fetched
        if command is FETCH:  # one line per reference, a bad one named with exit status 1
            assert [line.split("\t")[0] for line in download.stdout.splitlines()] == FETCH[3:4] + FETCH[5:]
            absent = subprocess.run(FETCH[:3] + ["org/absent"], env=env, capture_output=True, text=True, timeout=120)
            assert absent.returncode == 1 and "the Hub has no repository org/absent" in absent.stderr
    finally:
        server.server.shutdown()
    code = "from fastllava.model.hub import resolve; print(resolve('lmsys/tiny'))"
    offline = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                             text=True, timeout=120)
    model = Llava.from_pretrained(snapshot_of(offline))
    assert_same(model, Llava.from_pretrained(local))
    if command is FETCH:
        code = "from fastllava.model.hub import resolve_projector; print(resolve_projector('liuhaotian/tiny-pretrain'))"
        offline = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"},
                                 capture_output=True, text=True, timeout=120)
        model.load_projector(snapshot_of(offline))
        same_projector(model, donor)
