"""Our Llava against transformers' LlavaForConditionalGeneration, on packed batches."""

import pytest
import torch
import torch.nn.functional as F
from tiny_llava import hf_logits_per_sample, make_hf_llava, make_samples, pack, rel_err
from transformers import LlavaForConditionalGeneration

from fastllava import Llava

CASES = {
    "mha-default-untied-patch": dict(kv_heads=4, rope="default", tie=False, select="default"),
    "gqa-llama3-tied-patch": dict(kv_heads=2, rope="llama3", tie=True, select="default"),
    "gqa-linear-untied-cls": dict(kv_heads=1, rope="linear", tie=False, select="full"),
    "mha-llama3-tied-cls": dict(kv_heads=4, rope="llama3", tie=True, select="full"),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_logits_match_transformers_per_sample(case, tmp_path):
    hf = make_hf_llava(**CASES[case])
    hf.save_pretrained(tmp_path)
    model = Llava.from_pretrained(tmp_path).eval()
    n_img = model.num_image_tokens
    assert n_img == (5 if CASES[case]["select"] == "full" else 4)

    samples = make_samples()
    batch = pack(samples, n_img)
    with torch.no_grad():
        out = model(batch, return_logits=True)
    expected = hf_logits_per_sample(hf, samples, n_img)
    assert out.logits.shape == expected.shape
    assert rel_err(out.logits, expected) <= 1e-5

    # The loss is a sum over label tokens, shifted inside each sample, with its count alongside.
    targets = batch.shifted_labels()
    ref_sum = F.cross_entropy(expected, targets, ignore_index=-100, reduction="sum")
    assert torch.allclose(out.loss_sum, ref_sum, rtol=1e-5)
    assert int(out.num_label_tokens) == int((targets != -100).sum()) > 0


def test_loss_without_logits_equals_loss_from_logits(hf_llava_dir):
    path, _ = hf_llava_dir
    model = Llava.from_pretrained(path)
    batch = pack(make_samples(1), model.num_image_tokens)
    with torch.no_grad():
        fused = model(batch)
        full = model(batch, return_logits=True)
    assert fused.logits is None
    assert torch.allclose(fused.loss_sum, full.loss_sum, rtol=1e-6)


def test_pack_equals_per_sample_forwards(hf_llava_dir):
    path, _ = hf_llava_dir
    model = Llava.from_pretrained(path)
    samples = make_samples(2)
    with torch.no_grad():
        packed = model(pack(samples, 4), return_logits=True)
        single = torch.cat([model(pack([s], 4), return_logits=True).logits for s in samples])
        loss_single = sum(model(pack([s], 4)).loss_sum for s in samples)
    assert rel_err(packed.logits, single) <= 1e-6
    assert torch.allclose(packed.loss_sum, loss_single, rtol=1e-6)


def test_text_only_pack_runs_no_vision(hf_llava_dir):
    path, _ = hf_llava_dir
    model = Llava.from_pretrained(path)
    calls = []
    model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    text_only = [s for s in make_samples() if s["pixel_values"] is None]
    model(pack(text_only, 4))
    assert calls == []
    model(pack(make_samples(), 4))
    assert calls == [1]  # one CLIP call for all images of the pack


def test_layers_after_feature_layer_are_not_built_but_exported(tmp_path, hf_llava_dir):
    from safetensors.torch import load_file

    path, hf = hf_llava_dir
    model = Llava.from_pretrained(path)
    assert len(model.vision_tower.layers) == 2  # 3 layers, features from -2
    model.save_pretrained(tmp_path / "out")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    original = hf.state_dict()
    for name in ("encoder.layers.2.mlp.fc1.weight", "post_layernorm.weight"):  # never run, still written
        assert torch.equal(exported["vision_tower.vision_model." + name], original["model.vision_tower." + name])


def test_gradients_flow_to_every_trained_parameter(hf_llava_dir):
    path, _ = hf_llava_dir
    model = Llava.from_pretrained(path)
    out = model(pack(make_samples(), 4))
    out.loss_sum.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The embedding rows used and everything else get gradients; nothing is disconnected.
    assert no_grad == []


def test_from_config_trains_from_scratch_and_exports(tmp_path):
    from fastllava.testing import tiny_config

    cfg = tiny_config(text={"num_key_value_heads": 2})
    model = Llava.from_config(cfg, seed=3)
    again = Llava.from_config(cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    model.save_pretrained(tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    samples = make_samples(4)
    with torch.no_grad():
        ours = model(pack(samples, 4), return_logits=True).logits
    assert rel_err(ours, hf_logits_per_sample(hf, samples, 4)) <= 1e-5
