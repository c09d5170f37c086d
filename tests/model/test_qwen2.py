"""A CLIP tower with a Qwen2 decoder against transformers' LlavaForConditionalGeneration (text_config a
Qwen2Config), on tiny random configs whose q/k/v biases and norms are random, so a missed one shows."""

import json

import pytest
import torch
from tiny_llava import randomize_adapters, IMAGE_TOKEN, components_read_back, hf_logits_per_sample, make_samples, pack, rel_err
from transformers import CLIPVisionModel, LlavaForConditionalGeneration, Qwen2ForCausalLM

from fastllava import Llava
from fastllava.config import LoRAConfig
from fastllava.layers.lora import LORA_TARGETS, apply_lora, is_adapter
from fastllava.model.peft import save_peft_adapter
from fastllava.testing import tiny_config, tiny_hf_llava
from fastllava.train.freeze import set_trainable

QWEN2 = dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, num_key_value_heads=2, rms_norm_eps=1e-6,
             bos_token_id=None, eos_token_id=3)


def make_hf_qwen2_llava(tie: bool, seed: int = 0):
    return tiny_hf_llava(tiny_config(text={**QWEN2, "tie_word_embeddings": tie}), seed=seed)


def logits(model, samples):
    with torch.no_grad():
        return model(pack(samples, model.num_image_tokens), return_logits=True).logits


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def hf_qwen2_dir(request, tmp_path):
    hf = make_hf_qwen2_llava(request.param)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf


def test_packed_logits_match_transformers_per_sample(hf_qwen2_dir):
    path, hf = hf_qwen2_dir
    assert type(hf.model.language_model).__name__ == "Qwen2Model"
    assert hf.model.language_model.layers[0].self_attn.q_proj.bias.abs().min() > 0  # random, not zero
    model = Llava.from_pretrained(path).eval()
    assert model.config.text.model_type == "qwen2" and model.config.text.qkv_bias
    attn = model.language_model.layers[0].self_attn
    assert attn.o_proj.bias is None and attn.k_proj.bias is not None
    tied = model.config.text.tie_word_embeddings
    assert (model.lm_head.weight is model.language_model.embed_tokens.weight) == tied
    samples = make_samples()
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, model.num_image_tokens)) <= 1e-5


def test_save_pretrained_read_back_by_transformers(hf_qwen2_dir, tmp_path):
    path, hf = hf_qwen2_dir
    model = Llava.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2"
    again, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    samples = make_samples(3)
    assert rel_err(hf_logits_per_sample(again.eval(), samples, 4), hf_logits_per_sample(hf, samples, 4)) <= 1e-5
    assert rel_err(logits(Llava.from_pretrained(tmp_path / "out"), samples), logits(model, samples)) == 0


def test_from_components_clip_and_qwen2_directories(hf_qwen2_dir, tmp_path):
    """A CLIPVisionModel and a Qwen2ForCausalLM directory (a tied one stores no lm_head.weight: the head must
    be the embeddings, not left random) plus the projector give the LLaVA they came from; save_components
    writes a Qwen2ForCausalLM directory transformers loads completely."""
    path, hf = hf_qwen2_dir
    prefix = "model.vision_tower."
    clip = CLIPVisionModel(hf.config.vision_config)
    clip.load_state_dict({k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)})
    clip.save_pretrained(tmp_path / "clip")
    qwen = Qwen2ForCausalLM(hf.config.text_config)
    prefix = "model.language_model."
    state = {"model." + k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    qwen.load_state_dict({**state, "lm_head.weight": hf.lm_head.weight}, strict=True)
    qwen.save_pretrained(tmp_path / "qwen")
    Llava.from_pretrained(path).save_projector(tmp_path / "projector.safetensors")

    model = Llava.from_components(vision=tmp_path / "clip", llm=tmp_path / "qwen",
                                  projector_weights=tmp_path / "projector.safetensors", image_token_id=IMAGE_TOKEN)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    samples = make_samples(5)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, 4)) <= 1e-5

    components_read_back(model, hf, tmp_path, "Qwen2ForCausalLM")


def test_sliding_window_and_original_layout_are_refused(hf_qwen2_dir, tmp_path):
    path, _ = hf_qwen2_dir
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(use_sliding_window=True, sliding_window=16)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_sliding_window true .*sliding_window 16.* is not supported"):
        Llava.from_pretrained(path)
    with pytest.raises(ValueError, match="original LLaVA layout holds a LLaMA decoder.*'qwen2'"):
        tiny_config(text=QWEN2, projector_type="linear").to_original_llava("clip")


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (as in tests/train/test_lora.py).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_keeps_qkv_bias_frozen_and_equals_peft(tmp_path):
    """LoRA on every decoder linear: the q/k/v biases stay in the frozen base (PEFT's bias "none") and are
    still applied; our adapted forward equals PeftModel's reading of the adapter we write."""
    peft = pytest.importorskip("peft")
    hf = make_hf_qwen2_llava(tie=True, seed=4)
    hf.save_pretrained(tmp_path / "base")
    model = Llava.from_pretrained(tmp_path / "base")
    apply_lora(model, 4, 8.0)
    set_trainable(model, "finetune")
    for name, p in model.named_parameters():
        assert p.requires_grad == (is_adapter(name) or name.startswith("projector.")), name
    assert model.language_model.layers[1].self_attn.v_proj.bias is not None
    randomize_adapters(model, seed=2)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    save_peft_adapter(model.config, tmp_path / "adapter", trained, LoRAConfig(rank=4, alpha=8.0, dropout=0.0,
                                                                               targets=list(LORA_TARGETS)))
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    samples = make_samples(6)
    ours = logits(model.eval(), samples)
    assert rel_err(ours, hf_logits_per_sample(adapted, samples, 4)) <= 1e-5
    assert rel_err(ours, hf_logits_per_sample(LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                              samples, 4)) > 1e-2  # the adapters changed the model


def test_greedy_generation_matches_transformers_generate(hf_qwen2_dir):
    """KV-cache decoding stores the biased keys and values: greedy tokens equal transformers' generate."""
    path, hf = hf_qwen2_dir
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    model = Llava.from_pretrained(path).eval()
    for sample in make_samples(9):
        prompt = {"input_ids": sample["input_ids"].tolist(), "pixel_values": sample["pixel_values"]}
        ids = pack([sample], 4).input_ids[None]
        extra = {} if sample["pixel_values"] is None else {"pixel_values": sample["pixel_values"]}
        expected = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                               do_sample=False, **extra)[0, ids.shape[1]:].tolist()
        assert model.generate([prompt], max_new_tokens=10) == [expected]
