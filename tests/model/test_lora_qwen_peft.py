"""LoRA fine-tuning of a CLIP + Qwen2 model through the trainer, against the real peft library: the adapter the
run exports, read by PeftModel onto transformers' LlavaForConditionalGeneration (a Qwen2 text_config), gives
our trained model's logits, and so does the merged export. Qwen2's q/k/v biases stay in the frozen base: not
trained, not in the adapter (PEFT's bias "none"), yet applied by both. test_qwen2.py checks the adapter format
with random adapters; this checks what a run writes after it trained them."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_qwen2 import QWEN2
from transformers import LlavaForConditionalGeneration

from fastllava import Llava, PackedBatch
from fastllava.testing import tiny_hf_llava

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # the training tests' tiny runs
from train_tiny import ARCHITECTURE, IMAGE_TOKEN, NUM_IMAGE_TOKENS, ToyDataset, run, tiny_config  # noqa: E402

LORA = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0", "optim.lr=0.02", "optim.projector_lr=0.005",
        "train.max_steps=3"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """As tests/train/conftest.py: a tiny run on two threads of a busy 2-core machine spin-waits (14 s, not 2)."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # or init_distributed raises it again
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_logits(model, samples):
    """transformers' logits of each sample alone, concatenated in pack order."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = PackedBatch.from_samples([s], image_token_id=IMAGE_TOKEN, num_image_tokens=NUM_IMAGE_TOKENS).input_ids
            extra = {} if s["pixel_values"] is None else {"pixel_values": s["pixel_values"]}
            out.append(model(input_ids=ids[None], **extra).logits[0])
    return torch.cat(out)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (as in tests/train/test_lora.py).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_trained_adapter_read_by_peft_equals_our_model(tmp_path, tie):
    peft = pytest.importorskip("peft")
    text = {k: v for k, v in QWEN2.items() if k != "num_key_value_heads"}  # ARCHITECTURE's GQA (4 : 2)
    config = replace(ARCHITECTURE, text=replace(ARCHITECTURE.text, **text, tie_word_embeddings=tie))
    tiny_hf_llava(config, seed=5).save_pretrained(tmp_path / "base")
    base_state = load_file(tmp_path / "base" / "model.safetensors")
    bias = "language_model.model.layers.1.self_attn.k_proj.bias"
    assert base_state[bias].abs().min() > 0  # random, so a bias dropped anywhere shows

    r = run(tiny_config(tmp_path / "run", *LORA), Llava.from_pretrained(tmp_path / "base"), ToyDataset(24))
    assert sorted(r.losses) == [1, 2, 3]
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["bias"] == "none"
    keys = load_file(adapter / "adapter_model.safetensors")
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) or ".multi_modal_projector." in k for k in keys)
    assert any(k.endswith("self_attn.k_proj.lora_B.weight") for k in keys)
    params = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in r.model.named_parameters()}
    k_bias = params["language_model.layers.1.self_attn.k_proj.bias"]
    assert not k_bias.requires_grad
    assert torch.equal(k_bias.full_tensor() if hasattr(k_bias, "full_tensor") else k_bias, base_state[bias])

    data = ToyDataset(6, seed=1)
    samples = [data[i] for i in range(6)]
    with torch.no_grad():
        ours = r.model(PackedBatch.from_samples(samples, image_token_id=IMAGE_TOKEN,
                                                num_image_tokens=NUM_IMAGE_TOKENS), return_logits=True).logits
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    assert type(base.model.language_model).__name__ == "Qwen2Model"
    base_logits = _hf_logits(base, samples)
    adapted = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert _rel_err(ours, _hf_logits(adapted, samples)) <= 1e-5
    merged = LlavaForConditionalGeneration.from_pretrained(r.export).eval()
    assert _rel_err(ours, _hf_logits(merged, samples)) <= 1e-5
    assert _rel_err(ours, base_logits) > 1e-3  # the 3 steps changed the model
