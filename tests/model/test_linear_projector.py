"""The first LLaVA's `linear` projector end to end: a tiny model trains through the real Trainer in both stages,
stage 1 writes LLaVA's `model.mm_projector.weight/bias`, and stage 2's export (the original LLaVA layout, which
holds a linear projector where llava-hf cannot) loads back with identical logits."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_llava import make_samples, pack

from fastllava import Llava, PackedBatch
from fastllava.config import load_config
from fastllava.testing import TORCH_BACKENDS, tiny_config

ARCH = tiny_config(vision={"num_hidden_layers": 2, "num_attention_heads": 2}, projector_type="linear",
                   vision_feature_layer=-1, pad_token_id=0)
IMAGE_TOKEN, NUM_IMAGE_TOKENS = ARCH.image_token_id, ARCH.num_image_tokens


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny ops on a busy 2-core machine: one thread (see tests/train/conftest.py)."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Captions:
    """n samples with the LlavaDataset interface, deterministic per index: an image, then a caption that a
    fixed rule derives from the image's mean (so a projector can learn it), the caption carrying the loss."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def _raw(self, i):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randn(1, 3, 28, 28, generator=g) * 0.1 + (i % 4)
        caption = torch.tensor([3 + 10 * (i % 4) + k for k in range(6)])
        ids = torch.cat([torch.tensor([1, IMAGE_TOKEN]), caption])
        labels = torch.cat([torch.tensor([-100, -100]), caption])
        return ids, labels, pixels

    def lengths(self):
        return np.full(self.n, 8 + NUM_IMAGE_TOKENS - 1, dtype=np.int64)

    def __getitem__(self, i):
        ids, labels, pixels = self._raw(i)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "id": str(i)}


def train(out_dir, stage, model, steps=12, lr="5e-3"):
    from fastllava.train import Trainer

    cfg = load_config(None, [
        "model.source=scratch", "model.architecture={}", "data.max_tokens_per_pack=64", "data.model_max_length=64",
        "data.num_workers=0", "train.global_batch_size=8", "train.device=cpu", f"train.output_dir={out_dir}",
        f"optim.lr={lr}", "optim.warmup_ratio=0.0", "parallel.activation_checkpointing=none",
        "logging.progress=false", "checkpoint.every_steps=0", f"train.stage={stage}", f"train.max_steps={steps}", "train.epochs=10"])
    return Trainer(cfg, model, Captions(32)).run()


def logits(model, samples):
    with torch.no_grad():
        return model(pack(samples, model.num_image_tokens), return_logits=True).logits


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def dataset_loss(model, n=32):
    """Mean next-token loss over the first n samples in one pack: no batch-to-batch noise."""
    data = Captions(n)
    batch = PackedBatch.from_samples([data[i] for i in range(n)], image_token_id=IMAGE_TOKEN,
                                     num_image_tokens=NUM_IMAGE_TOKENS)
    with torch.no_grad():
        out = model(batch)
    return (out.loss_sum / out.num_label_tokens).item()


def falls(losses):
    """Mean of the last three steps' losses below 0.8x that of the first three."""
    values = [losses[s] for s in sorted(losses)]
    return np.mean(values[-3:]) < 0.8 * np.mean(values[:3]), values


def test_stage1_linear_projector_trains_and_writes_llavas_keys(tmp_path):
    model = Llava.from_config(ARCH, seed=0, backends=TORCH_BACKENDS)
    before = dataset_loss(model)
    r = train(tmp_path, "align", model, lr="2e-1", steps=20)
    # only the projector moves, and a random frozen 2-layer LLM leaves it little to gain: measured on the
    # whole data set at once (the per-step losses vary by +-0.1 with the batch): 4.87 -> 4.65 (CPU, fp32)
    after = dataset_loss(r.model)
    assert after < before - 0.1, (before, after)
    assert r.export == tmp_path / "projector.safetensors"
    state = load_file(r.export)
    # LLaVA's names for its nn.Linear mm_projector (no Sequential index), as mm_projector.bin holds them
    assert sorted(state) == ["model.mm_projector.bias", "model.mm_projector.weight"]
    assert state["model.mm_projector.weight"].shape == (ARCH.text.hidden_size, ARCH.vision.hidden_size)
    assert torch.equal(state["model.mm_projector.weight"], full(r.model.projector.linears[0].weight))
    # and it loads into a fresh linear-projector model (stage 2's start)
    fresh = Llava.from_config(ARCH, seed=5, backends=TORCH_BACKENDS)
    fresh.load_projector(r.export)
    assert torch.equal(fresh.projector.linears[0].bias, state["model.mm_projector.bias"])


def test_stage2_linear_projector_trains_exports_and_loads_back(tmp_path):
    model = Llava.from_config(ARCH, seed=0, backends=TORCH_BACKENDS)
    r = train(tmp_path, "finetune", model, lr="2e-3")
    ok, values = falls(r.losses)
    assert ok, values
    out = r.export
    assert out == tmp_path / "final"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["mm_projector_type"] == "linear"
    assert (config["mm_hidden_size"], config["mm_vision_select_layer"]) == (32, -1)
    assert config["mm_vision_tower"] == str((out / "vision_tower").resolve())
    state = load_file(out / "model.safetensors")
    assert {k for k in state if "mm_projector" in k} == {"model.mm_projector.weight", "model.mm_projector.bias"}
    assert not any(k.startswith(("multi_modal_projector", "vision_tower", "model.vision_tower")) for k in state)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(state)

    trained = Llava.from_config(ARCH, seed=9, backends=TORCH_BACKENDS)
    trained.load_state_dict({n: full(p) for n, p in r.model.named_parameters()})
    reloaded = Llava.from_pretrained(out, image_token_id=IMAGE_TOKEN, backends=TORCH_BACKENDS)
    assert reloaded.config == replace(ARCH, text=replace(ARCH.text, head_dim=16))
    samples = make_samples(3)
    assert torch.equal(logits(reloaded, samples), logits(trained, samples))

    # LLaVA's meaning of the keys, restated without our model: mm_projector(x) = x W^T + b on the tower's
    # features (its nn.Linear(mm_hidden_size, hidden_size))
    feats = reloaded.vision_tower(samples[0]["pixel_values"]).reshape(-1, ARCH.vision.hidden_size)
    expected = feats @ state["model.mm_projector.weight"].T + state["model.mm_projector.bias"]
    with torch.no_grad():
        assert torch.allclose(reloaded.projector(feats), expected, rtol=1e-6, atol=1e-6)

    # moved elsewhere: mm_vision_tower no longer points at the tower; vision_tower= does
    moved = tmp_path / "moved"
    out.rename(moved)
    with pytest.raises(ValueError, match="pass vision_tower=CLIP_DIR"):
        Llava.from_pretrained(moved)
    again = Llava.from_pretrained(moved, vision_tower=moved / "vision_tower", image_token_id=IMAGE_TOKEN,
                                  backends=TORCH_BACKENDS)
    assert torch.equal(logits(again, samples), logits(trained, samples))


def test_llava_hf_layout_refuses_other_projectors_with_the_way_out():
    with pytest.raises(ValueError, match=r"only holds an mlp2x_gelu projector.*'linear'.*original LLaVA layout"):
        ARCH.to_hf_llava()


@pytest.mark.parametrize("projector_type", ["linear", "mlp3x_gelu"])
def test_original_layout_round_trip_without_training(tmp_path, projector_type):
    model = Llava.from_config(replace(ARCH, projector_type=projector_type), seed=3, backends=TORCH_BACKENDS)
    model.save_pretrained(tmp_path / "out", max_shard_bytes=30_000)  # several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    reloaded = Llava.from_pretrained(tmp_path / "out", image_token_id=IMAGE_TOKEN, backends=TORCH_BACKENDS)
    assert set(reloaded.carried) == set(model.carried)  # the unused last vision layer and post_layernorm too
    for key, t in model.carried.items():
        assert torch.equal(reloaded.carried[key], t), key
    samples = make_samples(4)
    assert torch.equal(logits(reloaded, samples), logits(model, samples))
