"""The loop's semantics: stage 1 trains exactly the projector; the step's loss and gradient do not depend
on how the samples are packed; the FLOP model matches torch's own FLOP counter."""

import importlib
import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastllava import PackedBatch
from fastllava.train.freeze import set_trainable
from fastllava.flops import FlopModel, pack_stats

from train_tiny import ToyDataset, run, tiny_config, tiny_model

va = importlib.import_module("fastllava.ops.varlen_attention")


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def test_align_trains_exactly_the_projector(tmp_path):
    init = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    r = run(tiny_config(tmp_path, "train.stage=align", "train.max_steps=2", "optim.lr=0.05"), tiny_model(), ToyDataset(24))
    model, opt = r.model, r.optimizer
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        is_projector = name.startswith("projector.")
        assert p.requires_grad == is_projector, name
        changed = not torch.equal(_full(p), init[name])
        assert changed == is_projector, name  # frozen weights untouched, every projector tensor moved
        assert (p in opt.state) == is_projector, name  # no optimizer state for frozen weights
    # One more backward: frozen weights get no gradient at all; the projector does.
    batch = PackedBatch.from_samples([ToyDataset(4)[i] for i in (1, 2)], image_token_id=299, num_image_tokens=4)
    model(batch).loss_sum.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("projector."), name


def test_unfreeze_vision_is_stage_2_only():
    model = tiny_model()
    counts = set_trainable(model, "finetune", unfreeze_vision=True)
    assert counts["frozen"] == 0
    with pytest.raises(ValueError, match="stage-2"):
        set_trainable(model, "align", unfreeze_vision=True)


def test_packed_equals_unpacked_loss_and_grads():
    """A pack of samples gives the sum of the per-sample losses and gradients (no cross-sample leakage)."""
    data = ToyDataset(6)
    samples = [data[i] for i in range(6)]  # with text-only sample 0 and 5
    model = tiny_model()
    packed = model(PackedBatch.from_samples(samples, image_token_id=299, num_image_tokens=4))
    packed.loss_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = 0.0, 0
    for s in samples:
        out = model(PackedBatch.from_samples([s], image_token_id=299, num_image_tokens=4))
        out.loss_sum.backward()
        total, count = total + out.loss_sum.item(), count + int(out.num_label_tokens)
    assert packed.loss_sum.item() == pytest.approx(total, rel=1e-6)
    assert int(packed.num_label_tokens) == count
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, packed_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_step_independent_of_pack_budget(tmp_path):
    """The same optimizer steps with 1 pack per step or several micro-steps (gradient accumulation):
    same losses, gradient norms and parameters."""
    results = []
    for budget in (64, 1024):
        r = run(tiny_config(tmp_path / str(budget), "train.max_steps=3", f"data.max_tokens_per_pack={budget}"),
                tiny_model(), ToyDataset(24))
        results.append((r, {n: _full(p) for n, p in r.model.named_parameters()}))
    (a, pa), (b, pb) = results
    assert a.summary["steps"] == 3
    for step in a.losses:
        assert a.losses[step] == pytest.approx(b.losses[step], rel=1e-6)
        assert a.grad_norms[step] == pytest.approx(b.grad_norms[step], rel=1e-5)
    for n in pa:
        # Adam turns float-level gradient differences on near-zero gradients into ~lr-sized steps:
        # 4e-6 seen at lr 1e-3; gradients themselves are compared through the norm above.
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-5, atol=2e-5, msg=n)


@pytest.mark.parametrize("stage, unfreeze", [("finetune", False), ("align", False), ("finetune", True)])
def test_flop_model_matches_torch_counter(stage, unfreeze):
    """torch's FlopCounterMode over one forward + backward: LLM matmuls 6 N per token with weight
    gradients, 4 N when frozen; the vision tower's forward only, unless it trains. fastllava's ops count
    through the FLOP formulas registered with them (fastllava/ops/_library.py)."""
    model = tiny_model()
    set_trainable(model, stage, unfreeze_vision=unfreeze)
    batch = PackedBatch.from_samples([ToyDataset(6)[i] for i in range(1, 5)], image_token_id=299, num_image_tokens=4)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss_sum.backward()
    counts = counter.get_flop_counts()
    tokens, sum_sq, images = pack_stats(batch)
    fm = FlopModel.build(model.config, stage, unfreeze)
    # Global holds everything: the decoder's GEMMs (aten.mm) and the LM head inside the fused loss op; the
    # projector's GEMMs are its own op, not aten.mm.
    g, fl = counts["Global"], torch.ops.fastllava
    llm_mm = g[torch.ops.aten.mm] + g[fl.fused_linear_cross_entropy]
    if unfreeze:
        llm_mm -= counts["Llava.vision_tower"].get(torch.ops.aten.mm, 0)
    assert llm_mm == fm.llm_per_token * tokens
    assert g[fl.varlen_attention] + g[fl.varlen_attention_backward] == fm.llm_attn_coeff * sum_sq
    vision = counts["Llava.vision_tower"]
    vision_matmuls = sum(v for op, v in vision.items() if "attention" not in str(op))
    assert vision_matmuls == fm.vision_matmul_per_image * images
    # The projector's forward + backward GEMMs: with a frozen tower its first layer computes no input gradient.
    projector = g[fl.fused_mlp_projector] + g[fl.fused_mlp_projector_backward]
    assert projector == fm.projector_per_image * images
    assert fm.flops(tokens, sum_sq, images) > llm_mm + vision_matmuls


def test_mfu_peaks():
    from fastllava.hardware import peak_tflops
    from fastllava.train.metrics import Meter, format_summary

    assert peak_tflops(torch.device("cpu")) is None  # CPU: MFU n/a
    assert peak_tflops(torch.device("cpu"), override=100.0) == 100.0
    meter = Meter(total_steps=1, start_step=0, world_size=2, peak_tflops=100.0, show_progress=False)
    assert meter.mfu(flops=100e12, seconds=2.0) == pytest.approx(0.25)  # 50 TFLOP/s of 2 x 100
    assert Meter(total_steps=1, start_step=0, world_size=1, peak_tflops=None, show_progress=False).mfu(1.0, 1.0) is None
    summary = {"steps": 2, "wall_clock_s": 61.0, "samples": 8, "tokens": 100, "tokens_per_s": 5.0, "mfu": None,
               "final_loss": 1.5, "peak_memory_gib": None}
    assert "n/a" in format_summary(summary) and "01:01" in format_summary(summary)


def test_activation_checkpointing_modes_agree(tmp_path):
    """Recomputation changes memory, not results: full and selective give the losses and gradients of none."""
    runs = {}
    for mode in ("none", "full", "selective"):
        r = run(tiny_config(tmp_path / mode, "train.max_steps=2", f"parallel.activation_checkpointing={mode}"),
                tiny_model(), ToyDataset(16))
        runs[mode] = (r.losses, r.grad_norms)
    assert runs["full"] == runs["none"] and runs["selective"] == runs["none"]


def _recipe_run(tmp_path, records, *overrides, data_config=None):
    """A recipe's command line (stage finetune, a tiny scratch model) on `records` written to data.json."""
    import yaml

    from fastllava.testing import TINY_TEXT, TINY_VISION, write_llama_tokenizer

    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": "scratch", "tokenizer_path": str(write_llama_tokenizer(tmp_path / "tok")),
                  "architecture": {"vision": TINY_VISION, "text": TINY_TEXT, "vision_feature_layer": -1}},
        "data": {"data_path": str(data), "template": "vicuna_v1", "model_max_length": 64, "max_tokens_per_pack": 64,
                 "num_workers": 0, **(data_config or {})},
        "train": {"stage": "finetune", "global_batch_size": 8, "device": "cpu", "output_dir": str(tmp_path / "out")},
        "logging": {"progress": False}}))
    from fastllava.train import main

    return main(["--config", str(config), *overrides], "finetune"), data


def _no_label_run(tmp_path, *overrides):
    """8 samples whose question fills data.model_max_length=64: every sample is rejected for no_labels when
    its length is computed (the files' summary, before that, counts 0 rejects)."""
    conv = [{"from": "human", "value": "Describe the sea. " * 20}, {"from": "gpt", "value": "Blue."}]
    return _recipe_run(tmp_path, [{"id": str(i), "conversations": conv} for i in range(8)], *overrides)


# train.main's @record enables faulthandler on stderr, which pytest's capture has no file descriptor for.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_a_run_with_every_sample_rejected_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as stop:
        _no_label_run(tmp_path)
    data = tmp_path / "data.json"
    rejects = f"{data}.rejects.jsonl"
    err = capsys.readouterr().err
    assert stop.value.code == 2
    with open(rejects) as f:
        assert [json.loads(line)["reason"] for line in f] == ["no_labels"] * 8
    assert (f"data: 8 more rejected while computing lengths (8 no_labels), 0 of 8 samples left\n"
            f"  rejects written to {rejects}") in err
    assert err.strip().splitlines()[-1] == (
        f"error: no sample to train on: 8 of the 8 entries of {data} rejected (8 no_labels), e.g. {data} entry 0, "
        f"id '0': no_labels: no token carries a loss after truncation to 64 tokens; the rejects file {rejects} "
        "lists each")
    assert not (tmp_path / "out").exists()  # nothing trained, checkpointed or exported
    # data.strict stops at the first of them, as at a structural reject (the lengths are cached by now: the same)
    with pytest.raises(SystemExit) as stop:
        _no_label_run(tmp_path, "data.strict=true")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: reject (strict mode): {data} entry 0, id '0': no_labels: no token carries a loss after truncation "
        "to 64 tokens")


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
@pytest.mark.parametrize("workers", [0, 1])
def test_a_strict_reject_while_training_is_one_line(tmp_path, monkeypatch, capsys, workers):
    """data.strict=true and an image that is not there: the reject comes when the sample is loaded (in a
    DataLoader worker with workers=1, which re-raises it with the worker's traceback in its message); the
    recipe's main() ends it as the configuration errors are, one `error:` line naming the file, entry, id,
    reason and image, exit status 2, nothing exported."""
    from PIL import Image

    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "images" / "red.png")
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    records = [{"id": f"s{i}", "image": "gone.png" if i == 5 else "red.png", "conversations": conv} for i in range(8)]
    with pytest.raises(SystemExit) as stop:
        _recipe_run(tmp_path, records, "data.strict=true", "train.max_steps=1",
                    data_config={"image_folder": str(tmp_path / "images"), "num_workers": workers,
                                 "model_max_length": 256, "max_tokens_per_pack": 256})
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: reject \(strict mode\): {re.escape(str(tmp_path / 'data.json'))} entry 5, id 's5': "
                        rf"image: .*{re.escape(str(tmp_path / 'images' / 'gone.png'))}.*", last), last
    assert not (tmp_path / "out" / "final").exists()
