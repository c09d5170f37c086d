"""LoRA fine-tuning (lora.rank > 0): what trains and what does not, the merged export against PEFT's
reading of the adapter export (transformers + peft as the reference), packed = unpacked, resume = the
uninterrupted run. 1 vs 2 processes: test_train_distributed.py."""

import math

import pytest
import torch
from torch import nn

from fastllava import PackedBatch
from fastllava.config import LoRAConfig
from fastllava.flops import FlopModel
from fastllava.layers.lora import LORA_TARGETS, LoRALinear, apply_lora, init_lora_, is_adapter
from fastllava.train.freeze import set_trainable

from train_tiny import IMAGE_TOKEN, NUM_IMAGE_TOKENS, ToyDataset, run, tiny_config, tiny_model

LORA = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0", "optim.lr=0.02", "optim.projector_lr=0.005"]


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _name(n):
    return n.replace("_checkpoint_wrapped_module.", "")


def test_lora_linear_against_float64_and_its_start():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert layer.weight is base.weight and layer.bias is base.bias  # same parameters, same names
    model = nn.Module()
    model.language_model = nn.Module()
    model.language_model.q_proj = layer
    init_lora_(model, seed=1)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: the base model at the start
    fan_in_bound = 1 / math.sqrt(24)  # kaiming_uniform(a=sqrt(5)) of an (r, in) matrix
    assert layer.lora_a.abs().max() <= fan_in_bound and layer.lora_a.std() > fan_in_bound / 4
    with torch.no_grad():
        layer.lora_b.normal_()
    w, b, a, bb = (t.double() for t in (base.weight, base.bias, layer.lora_a, layer.lora_b))
    expected = x.double() @ w.T + b + 2.0 * (x.double() @ a.T @ bb.T)
    assert (layer(x).double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    merged = x.double() @ (w + layer.delta(layer.lora_a, layer.lora_b).double()).T + b
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)


def test_apply_lora_targets_and_trainable_set():
    model = tiny_model()
    replaced = apply_lora(model, 4, 8.0, targets=("q_proj", "down_proj"))
    layers = len(model.language_model.layers)
    assert sorted(replaced) == sorted([f"language_model.layers.{i}.self_attn.q_proj" for i in range(layers)]
                                      + [f"language_model.layers.{i}.mlp.down_proj" for i in range(layers)])
    counts = set_trainable(model, "finetune")
    for name, p in model.named_parameters():
        assert p.requires_grad == (is_adapter(name) or name.startswith("projector.")), name
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters()
                                      if is_adapter(n) or n.startswith("projector."))
    with pytest.raises(ValueError, match="choose among"):
        apply_lora(tiny_model(), 4, 8.0, targets=("lm_head",))


def test_trains_adapters_and_projector_only_with_the_base_in_the_compute_dtype(tmp_path):
    init = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    r = run(tiny_config(tmp_path, *LORA, "train.max_steps=3", "parallel.param_dtype=bfloat16"), tiny_model(),
            ToyDataset(24))
    model, opt = r.model, r.optimizer
    assert {g["name"]: g["initial_lr"] for g in opt.param_groups} == {"model": 0.02, "projector": 0.005, "projector_no_decay": 0.005}
    adapters = 0
    for name, p in model.named_parameters():
        name = _name(name)
        trained = is_adapter(name) or name.startswith("projector.")
        assert p.requires_grad == trained and (p in opt.state) == trained, name
        # Trainable parameters stay fp32 (FSDP2's one dtype); the frozen base is stored in bf16.
        assert p.dtype == (torch.float32 if trained else torch.bfloat16), name
        if name.endswith(".lora_b"):
            adapters += 1
            assert _full(p).abs().sum() > 0, name  # moved from its zero start
        elif not trained:
            torch.testing.assert_close(_full(p), init[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
    assert adapters == len(LORA_TARGETS) * len(model.language_model.layers)
    assert r.losses[3] < r.losses[1]


# peft 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` (peft_model.py):
# peft's call, not ours, so its FutureWarning is not this test's to show.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_merged_export_equals_the_peft_adapter_on_the_base(tmp_path):
    """The merged llava-hf export and PeftModel.from_pretrained(base, adapter/) give the same logits, and
    they are our trained model's; the adapter alone changes the base's logits."""
    peft = pytest.importorskip("peft")
    from transformers import LlavaForConditionalGeneration

    base_dir = tmp_path / "base"
    tiny_model().save_pretrained(base_dir)
    r = run(tiny_config(tmp_path / "run", *LORA, "train.max_steps=4"), tiny_model(), ToyDataset(24))
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    sample = ToyDataset(3)[1]
    pack = PackedBatch.from_samples([sample], image_token_id=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS)
    with torch.no_grad():
        ours = r.model(pack, return_logits=True).logits
        merged = LlavaForConditionalGeneration.from_pretrained(r.export).eval()
        hf_kwargs = {"input_ids": pack.input_ids[None], "pixel_values": sample["pixel_values"]}
        merged_logits = merged(**hf_kwargs).logits[0]
        base = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
        base_logits = base(**hf_kwargs).logits[0]
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
        adapter_logits = adapted(**hf_kwargs).logits[0]
    scale = merged_logits.abs().max()
    assert (adapter_logits - merged_logits).abs().max() <= 1e-5 * scale
    assert (ours - merged_logits).abs().max() <= 1e-5 * scale
    assert (base_logits - merged_logits).abs().max() > 1e-2 * scale  # training changed the model


def test_packed_equals_unpacked_with_adapters():
    data = ToyDataset(6)
    samples = [data[i] for i in range(6)]
    model = tiny_model()
    apply_lora(model, 4, 8.0)
    init_lora_(model, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_b"):
                p.normal_(0, 0.05)  # a trained adapter, so the update path is exercised
    set_trainable(model, "finetune")
    packed = model(PackedBatch.from_samples(samples, image_token_id=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS))
    packed.loss_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total = 0.0
    for s in samples:
        out = model(PackedBatch.from_samples([s], image_token_id=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS))
        out.loss_sum.backward()
        total += out.loss_sum.item()
    assert packed.loss_sum.item() == pytest.approx(total, rel=1e-6)
    for n, g in packed_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_equals_the_uninterrupted_run(tmp_path):
    common = [*LORA, "lora.dropout=0.1", "train.max_steps=4", "data.max_tokens_per_pack=64"]
    full = run(tiny_config(tmp_path / "a", *common, "checkpoint.every_steps=2", "checkpoint.keep_last=0"),
               tiny_model(), ToyDataset(32))
    step2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    resumed = run(tiny_config(tmp_path / "b", *common, f"checkpoint.resume={step2}"), tiny_model(), ToyDataset(32))
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):  # dropout on: the RNG state comes back with the checkpoint
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6, abs=1e-6), step
    final = {_name(n): _full(p) for n, p in full.model.named_parameters()}
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(_full(p), final[_name(n)], rtol=1e-6, atol=1e-7, msg=n)


def test_flop_model_counts_frozen_base_and_trained_adapters():
    from torch.utils.flop_counter import FlopCounterMode

    from fastllava.flops import pack_stats

    model = tiny_model()
    apply_lora(model, 4, 8.0)
    init_lora_(model, seed=0)
    set_trainable(model, "finetune")
    batch = PackedBatch.from_samples([ToyDataset(6)[i] for i in range(1, 5)], image_token_id=IMAGE_TOKEN,
                                     num_image_tokens=NUM_IMAGE_TOKENS)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss_sum.backward()
    g = counter.get_flop_counts()["Global"]
    tokens, _, _ = pack_stats(batch)
    llm_mm = g[torch.ops.aten.mm] + g[torch.ops.fastllava.fused_linear_cross_entropy]
    fm = FlopModel.build(model.config, "finetune", lora=LoRAConfig(rank=4))
    assert llm_mm == pytest.approx(fm.llm_per_token * tokens, rel=1e-12)


def test_activation_checkpointing_replays_the_dropout_masks(tmp_path):
    """With dropout on, recomputation in backward must draw the forward's masks again: every checkpointing
    mode trains exactly as without checkpointing."""
    runs = {}
    for mode in ("none", "full", "selective"):
        r = run(tiny_config(tmp_path / mode, *LORA, "lora.dropout=0.3", "train.max_steps=2",
                            f"parallel.activation_checkpointing={mode}"), tiny_model(), ToyDataset(16))
        runs[mode] = (r, {_name(n): _full(p) for n, p in r.model.named_parameters()})
    (ref, ref_params) = runs["none"]
    for mode in ("full", "selective"):
        r, params = runs[mode]
        for step in (1, 2):
            assert r.grad_norms[step] == pytest.approx(ref.grad_norms[step], rel=1e-5), (mode, step)
        for n, p in params.items():
            torch.testing.assert_close(p, ref_params[n], rtol=1e-5, atol=1e-6, msg=f"{mode} {n}")
