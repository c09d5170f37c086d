"""Per-module learning rates (optim.vision_lr beside optim.projector_lr, LLaVA-NeXT's mm_vision_tower_lr and
mm_projector_lr): the configuration's checks, each parameter's group and lr through the schedule, AdamW's steps
against torch's AdamW given the groups by hand, a LoRA run with the tower trained in full (its PEFT export read
back by peft), resumed = uninterrupted."""

import re

import pytest
import torch

from fastllava import PackedBatch
from fastllava.config import OptimConfig, load_config
from fastllava.layers.lora import is_adapter
from fastllava.train.freeze import set_trainable
from fastllava.train.metrics import Meter, StepRecord
from fastllava.train.optim import build_optimizer, build_scheduler

from train_tiny import IMAGE_TOKEN, NUM_IMAGE_TOKENS, ToyDataset, run, tiny_config, tiny_model

BASE = ["model.source=scratch", "model.architecture={}"]


@pytest.mark.parametrize("override, message", [
    (["optim.vision_lr=2e-6"], "optim.vision_lr=2e-06 sets the vision tower's learning rate, but the tower is "
                               "frozen (train.unfreeze_vision=false)"),
    (["optim.vision_lr=0", "train.unfreeze_vision=true"], "optim.vision_lr must be > 0, got 0"),
])
def test_vision_lr_errors(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, BASE + override)


def test_vision_lr_and_lora_with_an_unfrozen_tower_load():
    cfg = load_config(None, BASE + ["optim.vision_lr=2e-6", "train.unfreeze_vision=true", "lora.rank=8"])
    assert (cfg.optim.vision_lr, cfg.train.unfreeze_vision, cfg.lora.rank) == (2e-6, True, 8)


# --- the groups: which parameter trains at which lr, through the schedule ------------------------------------

MODULE = {"vision_tower.": "vision", "projector.": "projector", "language_model.": "model", "lm_head.": "model"}
LRS = {"model": 2e-5, "projector": 1e-5, "vision": 2e-6}  # LLaVA-NeXT's stage 2, a projector lr of its own


def _module_of(name):
    return next(module for prefix, module in MODULE.items() if name.startswith(prefix))


def _groups_by_hand(model, weight_decay):
    """torch.optim.AdamW's groups written out from the rule (the module's lr; decay on matrices only)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.dim() >= 2
            groups.setdefault((_module_of(name), decay), []).append(p)
    return [{"params": ps, "lr": LRS[module], "weight_decay": weight_decay if decay else 0.0}
            for (module, decay), ps in groups.items()]


def _unfrozen(seed=0):
    model = tiny_model(seed)
    set_trainable(model, "finetune", unfreeze_vision=True)
    return model


def test_each_module_in_its_group_at_its_lr_through_warmup_and_cosine():
    model = _unfrozen()
    cfg = OptimConfig(lr=LRS["model"], projector_lr=LRS["projector"], vision_lr=LRS["vision"], weight_decay=0.1,
                      warmup_ratio=0.2)
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["name"] for g in opt.param_groups] == ["model_no_decay", "model", "projector_no_decay", "projector",
                                                     "vision_no_decay", "vision"]
    for g in opt.param_groups:
        module = g["name"].removesuffix("_no_decay")
        assert all(_module_of(names[id(p)]) == module for p in g["params"]), g["name"]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.1)
    members = {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert members == {n for n, p in model.named_parameters() if p.requires_grad} and len(members) == len(names)
    # 10 steps, warmup ceil(0.2 * 10) = 2 from 0; cosine to 0 after it: half way (step 6) at half the peak.
    sched = build_scheduler(opt, cfg, 10)
    seen = {}
    for step in range(7):
        seen[step] = {g["name"]: g["lr"] for g in opt.param_groups}
        opt.step(), sched.step()
    for step, factor in {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5}.items():
        for name, lr in seen[step].items():
            assert lr == pytest.approx(factor * LRS[name.removesuffix("_no_decay")], rel=1e-12, abs=1e-20), (step, name)


def test_without_their_own_lr_the_tower_and_projector_train_at_the_model_lr():
    opt = build_optimizer(_unfrozen(), OptimConfig(lr=3e-5))
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("model_no_decay", 3e-5), ("model", 3e-5)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(_unfrozen().parameters()))


def test_adamw_steps_equal_torch_adamw_with_the_groups_built_by_hand():
    data = ToyDataset(6)
    batch = PackedBatch.from_samples([data[i] for i in range(1, 5)], image_token_id=IMAGE_TOKEN,
                                     num_image_tokens=NUM_IMAGE_TOKENS)
    ours_model, ref_model = _unfrozen(), _unfrozen()
    ours = build_optimizer(ours_model, OptimConfig(lr=LRS["model"], projector_lr=LRS["projector"],
                                                   vision_lr=LRS["vision"], weight_decay=0.1))
    # foreach as build_optimizer: the same arithmetic, so the updates must agree bit for bit.
    ref = torch.optim.AdamW(_groups_by_hand(ref_model, 0.1), foreach=True)
    before = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    for _ in range(2):  # the second step reads the first's moments
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            model(batch).loss_sum.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        assert not torch.equal(p, before[name]), name  # every module trained


# --- whole runs: LoRA beside a tower trained in full, resume --------------------------------------------------

LORA_TOWER = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0", "optim.lr=0.02", "optim.projector_lr=0.005",
              "train.unfreeze_vision=true", "optim.vision_lr=0.002"]


def _name(n):
    return n.replace("_checkpoint_wrapped_module.", "")


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# peft 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` (peft_model.py):
# peft's call, not ours, so its FutureWarning is not this test's to show.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_with_the_tower_trained_in_full_exports_it_in_the_peft_adapter(tmp_path, capsys):
    """LLaVA-NeXT's LoRA runs with an unfrozen tower: the LLM through its adapters, the tower in full at its own
    lr. The PEFT adapter carries the trained tower (modules_to_save): PeftModel.from_pretrained(base, adapter/)
    gives the merged export's logits, which are our trained model's."""
    peft = pytest.importorskip("peft")
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    base_dir = tmp_path / "base"
    tiny_model().save_pretrained(base_dir)
    init = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    r = run(tiny_config(tmp_path / "run", *LORA_TOWER, "train.max_steps=4"),
            tiny_model(), ToyDataset(24))
    assert "optimizer groups: model lr 0.02 wd 0.01" in capsys.readouterr().out
    lrs = {g["name"]: g["initial_lr"] for g in r.optimizer.param_groups}
    assert lrs == {"model": 0.02, "projector": 0.005, "projector_no_decay": 0.005, "vision": 0.002,
                   "vision_no_decay": 0.002}
    vision = {id(p) for g in r.optimizer.param_groups if g["name"].startswith("vision") for p in g["params"]}
    for name, p in r.model.named_parameters():
        name = _name(name)
        trained = is_adapter(name) or name.startswith(("projector.", "vision_tower."))
        assert p.requires_grad == trained and (p in r.optimizer.state) == trained, name
        assert (id(p) in vision) == name.startswith("vision_tower."), name
        if name.startswith("vision_tower.") and name.endswith(".weight"):
            assert not torch.equal(_full(p), init[name]), name  # the tower trained
    adapter = tmp_path / "run" / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        tower_keys = [k for k in f.keys() if ".vision_tower." in k]
    base = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
    # The whole tower, as PEFT replaces it: its trained parameters and the unused ones (CLIP's post_layernorm).
    assert sorted(tower_keys) == sorted(f"base_model.model.model.vision_tower.{k}"
                                        for k in base.model.vision_tower.state_dict())
    sample = ToyDataset(3)[1]
    pack = PackedBatch.from_samples([sample], image_token_id=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS)
    with torch.no_grad():
        ours = r.model(pack, return_logits=True).logits
        hf_kwargs = {"input_ids": pack.input_ids[None], "pixel_values": sample["pixel_values"]}
        merged = LlavaForConditionalGeneration.from_pretrained(r.export).eval()(**hf_kwargs).logits[0]
        adapted = peft.PeftModel.from_pretrained(base, adapter).eval()(**hf_kwargs).logits[0]
    scale = merged.abs().max()
    assert (adapted - merged).abs().max() <= 1e-5 * scale
    assert (ours - merged).abs().max() <= 1e-5 * scale


def test_resume_with_a_tower_at_its_own_lr_equals_the_uninterrupted_run(tmp_path):
    common = ["train.unfreeze_vision=true", "optim.vision_lr=2e-4", "optim.projector_lr=5e-4",
              "optim.warmup_ratio=0.25", "train.max_steps=4", "data.max_tokens_per_pack=64"]
    full = run(tiny_config(tmp_path / "a", *common, "checkpoint.every_steps=2", "checkpoint.keep_last=0"),
               tiny_model(), ToyDataset(32))
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    resumed = run(tiny_config(tmp_path / "b", *common, f"checkpoint.resume={step2}"), tiny_model(), ToyDataset(32))
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6), step

    def groups(r):
        return [(g["name"], g["lr"], g["initial_lr"], [_name(n) for n in names])
                for g, names in zip(r.optimizer.param_groups, _group_names(r))]

    assert groups(resumed) == groups(full)
    assert [g[0] for g in groups(full)][-2:] == ["vision_no_decay", "vision"]
    final = {_name(n): _full(p) for n, p in full.model.named_parameters()}
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(_full(p), final[_name(n)], rtol=1e-6, atol=1e-7, msg=n)
    moments = {_name(n): _full(full.optimizer.state[p]["exp_avg_sq"]) for n, p in full.model.named_parameters()}
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(_full(resumed.optimizer.state[p]["exp_avg_sq"]), moments[_name(n)], rtol=1e-6,
                                   atol=1e-12, msg=n)


def _group_names(r):
    names = {id(p): n for n, p in r.model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in r.optimizer.param_groups]


def test_each_module_lr_is_a_metric():
    seen = {}
    meter = Meter(total_steps=1, start_step=0, world_size=1, peak_tflops=None, show_progress=False)
    meter.add_writer(lambda step, scalars: seen.update(scalars))
    meter.update(StepRecord(1, 1.0, 2e-5, 1.0, 10, 1, 0.0, 1.0, lrs={"model": 2e-5, "vision": 2e-6}))
    assert (seen["lr"], seen["lr/model"], seen["lr/vision"]) == (2e-5, 2e-5, 2e-6)
