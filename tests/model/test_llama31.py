"""A CLIP tower with a Llama-3.1-shaped decoder against transformers' LlavaForConditionalGeneration: rope_theta
500000 with llama3 frequency scaling (its original_max_position_embeddings shorter than the samples, so the
scaled frequencies matter), 4 query heads per KV head as Llama-3.1-8B's 32:8, untied LM head."""

import json

from tiny_llava import (ROPES, greedy_prompts_and_expected, hf_logits_per_sample, logits, make_samples, read_back,
                        rel_err)

from fastllava import Llava
from fastllava.testing import tiny_config, tiny_hf_llava

LLAMA31 = dict(num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **ROPES["llama3"])


def test_packed_logits_export_and_generation_match_transformers(tmp_path):
    hf = tiny_hf_llava(tiny_config(text=LLAMA31), seed=7)
    hf.save_pretrained(tmp_path / "hf")
    model = Llava.from_pretrained(tmp_path / "hf").eval()
    assert model.config.text.rope_scaling["rope_type"] == "llama3" and model.config.text.rope_theta == 500000.0
    samples = make_samples(3)
    expected = hf_logits_per_sample(hf, samples, model.num_image_tokens)
    assert rel_err(logits(model, samples), expected) <= 1e-5

    model.save_pretrained(tmp_path / "out")
    rope = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["rope_parameters"]
    assert rope == {**ROPES["llama3"]["rope_scaling"], "rope_theta": 500000.0}
    assert rel_err(hf_logits_per_sample(read_back(tmp_path / "out"), samples, 4), expected) <= 1e-5

    prompts, tokens = greedy_prompts_and_expected(hf, make_samples(9), 4)
    assert model.generate(prompts, max_new_tokens=10) == tokens
