"""A CLIP tower with a Qwen3 decoder against transformers' LlavaForConditionalGeneration (text_config a
Qwen3Config), on tiny random configs: the per-head q/k norms and (with attention_bias) the biases are random, so
a missed or misplaced one shows, and the head width (24) is not hidden_size / heads (16), as in Qwen3-0.6B."""

import json

import pytest
from tiny_llava import (IMAGE_TOKEN, components_read_back, greedy_prompts_and_expected, hf_logits_per_sample, logits,
                        make_samples, read_back, rel_err, write_components)

from fastllava import Llava
from fastllava.testing import tiny_config, tiny_hf_llava

QWEN3 = dict(model_type="qwen3", qk_norm=True, head_dim=24, rope_theta=1e6, num_key_value_heads=2, rms_norm_eps=1e-6,
             bos_token_id=None, eos_token_id=3)
VARIANTS = {"untied": {}, "tied": {"tie_word_embeddings": True}, "attention_bias": {"attention_bias": True}}


@pytest.fixture(params=VARIANTS)
def hf_qwen3_dir(request, tmp_path):
    hf = tiny_hf_llava(tiny_config(text={**QWEN3, **VARIANTS[request.param]}), seed=len(request.param))
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", hf


def test_packed_logits_match_transformers_per_sample(hf_qwen3_dir):
    path, hf = hf_qwen3_dir
    assert type(hf.model.language_model).__name__ == "Qwen3Model"
    assert (hf.model.language_model.layers[0].self_attn.k_norm.weight - 1).abs().min() > 0  # random, not ones
    model = Llava.from_pretrained(path).eval()
    text = model.config.text
    assert text.model_type == "qwen3" and text.qk_norm and not text.qkv_bias and text.attention_head_dim == 24
    attn = model.language_model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (24,) and attn.q_proj.weight.shape == (96, 64)
    assert (attn.q_proj.bias is not None) == (attn.o_proj.bias is not None) == text.attention_bias
    assert (model.lm_head.weight is model.language_model.embed_tokens.weight) == text.tie_word_embeddings
    samples = make_samples()
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, model.num_image_tokens)) <= 1e-5


def test_save_pretrained_read_back_by_transformers(hf_qwen3_dir, tmp_path):
    path, hf = hf_qwen3_dir
    model = Llava.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    text_config = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert text_config["model_type"] == "qwen3" and text_config["head_dim"] == 24 and "qk_norm" not in text_config
    again = read_back(tmp_path / "out")
    assert type(again.model.language_model).__name__ == "Qwen3Model"
    samples = make_samples(3)
    assert rel_err(hf_logits_per_sample(again, samples, 4), hf_logits_per_sample(hf, samples, 4)) <= 1e-5
    assert rel_err(logits(Llava.from_pretrained(tmp_path / "out"), samples), logits(model, samples)) == 0


def test_from_components_clip_and_qwen3_directories(hf_qwen3_dir, tmp_path):
    """A CLIPVisionModel and a Qwen3ForCausalLM directory plus the projector give the LLaVA they came from;
    save_components writes a Qwen3ForCausalLM directory transformers loads completely."""
    path, hf = hf_qwen3_dir
    tower, llm, projector = write_components(hf, Llava.from_pretrained(path), tmp_path)
    model = Llava.from_components(vision=tower, llm=llm, projector_weights=projector, image_token_id=IMAGE_TOKEN)
    samples = make_samples(5)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, 4)) <= 1e-5
    components_read_back(model, hf, tmp_path, "Qwen3ForCausalLM")


def test_greedy_generation_matches_transformers_generate(hf_qwen3_dir):
    """KV-cache decoding normalizes and rotates each new key as the prefill did: greedy tokens equal
    transformers' generate, the three prompts decoded together."""
    path, hf = hf_qwen3_dir
    prompts, expected = greedy_prompts_and_expected(hf, make_samples(9), 4)
    assert Llava.from_pretrained(path).eval().generate(prompts, max_new_tokens=10) == expected


def test_sliding_window_refused_only_when_turned_on(hf_qwen3_dir):
    """Released Qwen3 configs carry a sliding_window number with use_sliding_window false (transformers then
    has no window): such a config runs samples longer than that number. Turned on, it is refused."""
    path, hf = hf_qwen3_dir
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(use_sliding_window=False, sliding_window=8)  # shorter than every sample
    (path / "config.json").write_text(json.dumps(config))
    model = Llava.from_pretrained(path).eval()
    assert model.config.text.sliding_window is None
    samples = make_samples(2)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, 4)) <= 1e-5
    config["text_config"]["use_sliding_window"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Qwen3 config with use_sliding_window true .*window 8.* not supported"):
        Llava.from_pretrained(path)
