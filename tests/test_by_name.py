"""Issue 25's "done when" as a user meets it: three commands, prepare, train, eval, everything named by id, on
loopback. Each command runs through its own command line in a fresh process, with HF_HUB_OFFLINE=1 and
HF_HUB_CACHE at this test's cache, so nothing reaches the network and no code of ours is replaced:

1. `python -m fastllava.data.prepare llava-1.5 --root data` fetches LLaVA-1.5's two stages from the small fakes
   of every source (tests/data/test_prepare_fakes.py), served on loopback and reached through --mirror;
2. the shipped recipes `recipes/pretrain.py` and `recipes/finetune.py` (under torchrun) with their configs as
   shipped, whose model ids (openai/clip-vit-large-patch14-336, lmsys/vicuna-7b-v1.5) are held by the Hub cache
   as tiny models (tests/model/hub_fakes.put; the LLM as `.bin` pickles, as Vicuna publishes it), on what
   prepare wrote, stage 2 from stage 1's projector; only sizes and step counts are overridden;
3. `python -m fastllava.eval --model <stage 2's final> --task pope --data hub` on lmms-lab/POPE's parquet rows
   in the Hub cache (tests/eval/hub_parquet.py).

The helpers live beside the tests of each piece (tests/data, tests/model, tests/eval) and are imported from
there, as pytest's own rootdir-relative imports would (those folders are on sys.path while their tests run).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RECIPES, CONFIGS = ROOT / "recipes", ROOT / "recipes" / "configs"
sys.path[:0] = [str(TESTS / d) for d in ("data", "model", "eval") if str(TESTS / d) not in sys.path]

from hub_fakes import put  # noqa: E402
from hub_parquet import hub_cache  # noqa: E402
from layout_vqa import make_pope  # noqa: E402
from test_hub_tasks import pope_parquet  # noqa: E402
from test_prepare_fakes import entries_json, image_bytes, mirror_args, serve_fakes, server, zip_of  # noqa: E402,F401
from test_published_formats import as_bin  # noqa: E402

from fastllava.eval.run import main as eval_main  # noqa: E402
from fastllava.testing import tiny_config, tiny_model, write_llama_tokenizer  # noqa: E402

VISION_ID, LLM_ID = "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"  # what the shipped recipes name
PRETRAIN = "huggingface.co/datasets/liuhaotian/LLaVA-Pretrain/resolve/main/"
IMAGES = 32  # stage 1's captioned images
# What makes the 7B recipes two CPU steps of the tiny models; the data and the model ids stay the recipes'.
TINY_RUN = ["train.device=cpu", "train.max_steps=2", "train.global_batch_size=8", "data.num_workers=0",
            "data.model_max_length=256", "data.max_tokens_per_pack=512", "logging.progress=false"]


def publish_components(cache, tmp):
    """A tiny CLIP tower and a tiny LLaMA with a SentencePiece tokenizer (no tokenizer.json), stored in the Hub
    cache under the ids the shipped recipes name; the LLM as pytorch_model.bin only, as lmsys publishes
    Vicuna-v1.5. Its window holds Vicuna's system prompt and a turn (the tiny default, 64 tokens, does not).
    Returns the tower's directory."""
    llava = tiny_model(tiny_config(text={"vocab_size": 512, "max_position_embeddings": 256}))
    llava.save_components(tmp / "clip", tmp / "llm")
    put(cache, VISION_ID, tmp / "clip")
    put(cache, LLM_ID, write_llama_tokenizer(as_bin(tmp / "llm", tmp / "vicuna")))
    return tmp / "clip"


def publish_pope(cache, tmp) -> Path:
    """lmms-lab/POPE's parquet shards in the Hub cache, as `--data hub` reads them; returns LLaVA's layout of
    the same questions (test_hub_tasks.py holds the two equal)."""
    layout = make_pope(tmp / "pope-layout")
    rows = pope_parquet(layout, tmp / "POPE")
    hub_cache(cache, "lmms-lab/POPE", {f"data/{p.name}": p.read_bytes() for p in (rows / "data").iterdir()})
    return layout


def run(cwd, env, *command):
    """`python *command` in `cwd`, as a user types it; the completed process, its output kept."""
    return subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def ok(done) -> str:
    """The output of a command that must have succeeded (else the assertion shows the end of both streams)."""
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def summary(out: str) -> dict:
    """The trainer's end-of-run table: {"optimizer steps": "2", "samples": "16", ...}."""
    rows = (re.match(r"(\S+(?: \S+)*)  +(\S.*)", line) for line in out.splitlines())
    return {m[1]: m[2] for m in rows if m}


class User(NamedTuple):
    home: Path  # the user's folder, empty: the commands run there
    env: dict  # offline, on this test's Hub cache
    tower: Path  # what the cache holds as openai/clip-vit-large-patch14-336
    pope_layout: Path  # LLaVA's layout of the POPE questions the cache holds as lmms-lab/POPE


@pytest.fixture
def user(server, tmp_path) -> User:
    """A user's empty folder and environment: the Hub cache holds the recipes' models and POPE, offline; the
    loopback server holds every prepare source."""
    cache = tmp_path / "hf"
    tower = publish_components(cache, tmp_path / "models")
    pope_layout = publish_pope(cache, tmp_path / "bench")
    serve_fakes(server)
    # Stage 1's json names a few dozen images (the shared fake names three).
    names = [f"{i // 10:05d}/{i}.jpg" for i in range(IMAGES)]
    server.files[PRETRAIN + "blip_laion_cc_sbu_558k.json"] = entries_json(names)
    server.files[PRETRAIN + "images.zip"] = zip_of({n: image_bytes(i) for i, n in enumerate(names)})
    home = tmp_path / "user"
    home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "FASTLLAVA_CACHE": str(tmp_path / "fastllava-cache"), "PYTHONPATH": str(ROOT)}
    return User(home, env, tower, pope_layout)


@pytest.mark.slow
def test_prepare_train_eval_by_name_offline(server, user, tmp_path):
    home, env = user.home, user.env
    out = ok(run(home, env, "-m", "fastllava.data.prepare", "llava-1.5", "--root", "data", *mirror_args(server)))
    assert out.count("all images present and decodable") == 2, out  # the checker's report on both stages' json
    assert (home / "data/LLaVA-Pretrain/images/00003/31.jpg").is_file() and (home / "data/coco/train2017").is_dir()

    stage1 = summary(ok(run(home, env, RECIPES / "pretrain.py", "--config", CONFIGS / "llava15_7b_pretrain.yaml",
                            *TINY_RUN)))
    assert (stage1["optimizer steps"], stage1["samples"]) == ("2", "16"), stage1  # train.max_steps x 8
    projector = home / "outputs/llava15-7b-pretrain/projector.safetensors"
    assert projector.is_file()
    # Vicuna's pickles were read with weights_only and converted once, into FASTLLAVA_CACHE.
    assert len(list((Path(env["FASTLLAVA_CACHE"]) / "safetensors-from-bin").glob("*/model.safetensors"))) == 1

    # Stage 2 under torchrun, from stage 1's projector (the finetune config names that file).
    stage2 = summary(ok(run(home, env, "-m", "torch.distributed.run", "--nproc_per_node=1", RECIPES / "finetune.py",
                            "--config", CONFIGS / "llava15_7b_finetune.yaml", *TINY_RUN)))
    # The fake mix's 8 entries are one epoch of one step; every one trained (none dropped, e.g. as too long).
    assert (stage2["optimizer steps"], stage2["samples"]) == ("1", "8"), stage2
    final = load_file(home / "outputs/llava15-7b-finetune/final/model.safetensors")
    # The frozen tower is the cached openai/clip-vit-large-patch14-336, bit for bit; the projector is stage 1's
    # after one step at lr <= 2e-5 (one drawn afresh is 1e-3 away or more: its bias starts at zero, and stage 1's
    # two steps at lr 1e-3 moved it by about that).
    for key, tower in load_file(user.tower / "model.safetensors").items():
        assert torch.equal(final[f"vision_tower.{key}"], tower), key
    for key, stage1_value in load_file(projector).items():
        layer = {"0": "linear_1", "2": "linear_2"}[key.split(".")[2]]
        moved = final[f"multi_modal_projector.{layer}.{key.split('.')[3]}"] - stage1_value
        assert moved.abs().max() <= 1e-4, key

    ok(run(home, env, "-m", "fastllava.eval", "--model", "outputs/llava15-7b-finetune/final", "--task", "pope",
           "--data", "hub", "--output", "eval/pope"))
    # Every question answered once, and scored as LLaVA's layout of the same questions scores those answers.
    answers = home / "eval/pope/answers.jsonl"
    asked = (user.pope_layout / "pope/llava_pope_test.jsonl").read_text().splitlines()
    assert sorted(json.loads(a)["question_id"] for a in answers.read_text().splitlines()) == \
           sorted(json.loads(q)["question_id"] for q in asked)
    assert eval_main(["--task", "pope", "--data", str(user.pope_layout), "--answers", str(answers),
                      "--output", str(tmp_path / "by-layout")]) == 0
    scores = json.loads((home / "eval/pope/scores.json").read_text())
    assert scores["scores"] == json.loads((tmp_path / "by-layout/scores.json").read_text())["scores"]

    # What is not in the cache, offline, is an error naming it: a model id, a benchmark's dataset id.
    absent = run(home, env, RECIPES / "pretrain.py", "--config", CONFIGS / "llava15_7b_pretrain.yaml", *TINY_RUN,
                 "model.llm_path=lmsys/vicuna-13b-v1.5")
    assert absent.returncode != 0 and "lmsys/vicuna-13b-v1.5 is not in the Hub cache" in absent.stderr, absent.stderr
    assert "HF_HUB_OFFLINE is set" in absent.stderr
    for args, named in ((["--model", "me/llava-absent", "--data", "hub"], "me/llava-absent"),
                        (["--model", "outputs/llava15-7b-finetune/final", "--data", "me/POPE"], "me/POPE")):
        absent = run(home, env, "-m", "fastllava.eval", "--task", "pope", "--output", "eval/x", *args)
        assert absent.returncode != 0 and named in absent.stderr, absent.stderr
