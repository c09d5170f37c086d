"""A CLIP tower with a Mistral decoder against transformers' LlavaForConditionalGeneration (text_config a
MistralConfig), on tiny random configs with 4 query heads per KV head (Mistral-7B's 32:8).

Mistral v0.1's sliding window masks keys `sliding_window` or more positions back; our attention sees the whole
sample, which is the same for a sample no longer than the window. The tests pin that boundary against
transformers' own mask: at a window of the longest sequence everything equals transformers, one token less and
transformers' answer changes while ours is refused with the lengths named, in training and in generation."""

import json

import pytest
import torch
from tiny_llava import (IMAGE_TOKEN, components_read_back, greedy_prompts_and_expected, hf_logits_per_sample, logits,
                        make_samples, pack, read_back, rel_err, write_components)
from transformers import AutoConfig, LlavaForConditionalGeneration

from fastllava import Llava
from fastllava.testing import tiny_config, tiny_hf_llava

MISTRAL = dict(model_type="mistral", num_key_value_heads=1, rms_norm_eps=1e-5)
LONGEST = 19  # make_samples()'s longest sample, its two images expanded (the others: 17, 12)
NEW = 10  # tokens generated: the longest prompt's last decode step attends over LONGEST + NEW - 1 positions


def hf_mistral_dir(path, window):
    """A tiny random transformers Llava with a Mistral decoder of sliding window `window`, saved to `path`."""
    hf = tiny_hf_llava(tiny_config(text={**MISTRAL, "sliding_window": window}), seed=5)
    hf.save_pretrained(path)
    assert type(hf.model.language_model).__name__ == "MistralModel" and hf.config.text_config.sliding_window == window
    return path, hf


def with_window(path, window):
    """transformers' Llava of the directory with its text_config's sliding_window set to `window`."""
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["sliding_window"] = window
    (path / "config.json").write_text(json.dumps(config))
    return LlavaForConditionalGeneration.from_pretrained(path).eval()


@pytest.mark.parametrize("window", [None, LONGEST], ids=["v0.2-no-window", "v0.1-window"])
def test_packed_logits_export_and_components_match_transformers(window, tmp_path):
    path, hf = hf_mistral_dir(tmp_path / "hf", window)
    model = Llava.from_pretrained(path).eval()
    text = model.config.text
    assert text.model_type == "mistral" and text.sliding_window == window
    assert not any(name.endswith("bias") for name, _ in model.language_model.named_parameters())
    samples = make_samples()
    expected = hf_logits_per_sample(hf, samples, model.num_image_tokens)
    assert rel_err(logits(model, samples), expected) <= 1e-5

    # The export keeps the window as it is: a null one written out, or transformers would read its 4096.
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["sliding_window"] == window
    again = read_back(tmp_path / "out")
    assert again.config.text_config.sliding_window == window
    assert rel_err(hf_logits_per_sample(again, samples, 4), expected) <= 1e-5

    tower, llm, projector = write_components(hf, model, tmp_path)
    ours = Llava.from_components(vision=tower, llm=llm, projector_weights=projector, image_token_id=IMAGE_TOKEN)
    assert rel_err(logits(ours, samples), expected) <= 1e-5
    assert components_read_back(ours, hf, tmp_path, "MistralForCausalLM").config.sliding_window == window


def test_missing_sliding_window_reads_as_transformers_default(tmp_path):
    """A MistralForCausalLM config.json without the key has MistralConfig's default window, not none."""
    path, hf = hf_mistral_dir(tmp_path / "hf", None)
    _, llm, _ = write_components(hf, Llava.from_pretrained(path), tmp_path)
    config = json.loads((llm / "config.json").read_text())
    del config["sliding_window"]
    (llm / "config.json").write_text(json.dumps(config))
    model = Llava.from_components(vision=tmp_path / "tower", llm=llm, image_token_id=IMAGE_TOKEN)
    assert model.config.text.sliding_window == AutoConfig.from_pretrained(llm).sliding_window == 4096


def test_a_sample_longer_than_the_window_is_refused(tmp_path):
    path, hf = hf_mistral_dir(tmp_path / "hf", LONGEST - 1)
    model = Llava.from_pretrained(path).eval()
    samples = make_samples()
    with pytest.raises(ValueError, match=f"longest sample of the pack has {LONGEST} tokens, more than the "
                                         f"decoder's sliding_window of {LONGEST - 1}"):
        model(pack(samples, 4))
    shorter = samples[:2]
    assert rel_err(logits(model, shorter), hf_logits_per_sample(hf, shorter, 4)) <= 1e-5
    # What the refusal stands for: transformers' window now hides the first key from the longest sample's last
    # position, and from no other.
    windowed = hf_logits_per_sample(hf, samples[2:], 4)
    full = hf_logits_per_sample(with_window(path, None), samples[2:], 4)
    assert rel_err(windowed[:-1], full[:-1]) <= 1e-5 and rel_err(windowed[-1:], full[-1:]) > 1e-3


@pytest.mark.parametrize("window", [None, LONGEST + NEW - 1])
def test_greedy_generation_matches_transformers_generate(window, tmp_path):
    path, hf = hf_mistral_dir(tmp_path / "hf", window)
    prompts, expected = greedy_prompts_and_expected(hf, make_samples(9), 4, NEW)
    assert Llava.from_pretrained(path).eval().generate(prompts, max_new_tokens=NEW) == expected  # decoded together


def test_generation_past_the_window_is_refused(tmp_path):
    window = LONGEST + NEW - 2
    path, hf = hf_mistral_dir(tmp_path / "hf", window)
    model = Llava.from_pretrained(path).eval()
    prompts, expected = greedy_prompts_and_expected(hf, make_samples(9), 4, NEW - 1)
    assert model.generate(prompts, max_new_tokens=NEW - 1) == expected
    with pytest.raises(ValueError, match=f"the longest prompt \\+ max_new_tokens - 1 has {LONGEST + NEW - 1} tokens, "
                                         f"more than the decoder's sliding_window of {window}"):
        model.generate(prompts, max_new_tokens=NEW)
    # What the refusal stands for: the NEW-th token of the longest prompt is chosen from logits transformers'
    # window changes (its first key hidden), while every earlier step is as without the window.
    sample = make_samples(9)[2]
    ids = pack([sample], 4).input_ids[None]

    def step_logits(hf_model):
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=sample["pixel_values"],
                                max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits)

    windowed, full = step_logits(hf), step_logits(with_window(path, None))
    assert rel_err(windowed[:-1], full[:-1]) <= 1e-5 and rel_err(windowed[-1:], full[-1:]) > 1e-3


def test_a_run_whose_samples_may_exceed_the_window_stops_before_reading_data(tmp_path):
    """build_dataset refuses data.model_max_length above the window before reading the (here absent) data file:
    the run would otherwise stop at its first long pack, possibly hours in."""
    from fastllava.config import load_config
    from fastllava.train.build import build_dataset

    model = Llava(tiny_config(text={**MISTRAL, "sliding_window": 64}))
    parts = ["model.source=components", f"model.vision_path={tmp_path}", f"model.llm_path={tmp_path}",
             f"data.data_path={tmp_path / 'absent.json'}"]
    cfg = load_config(None, parts + ["data.model_max_length=65"])
    with pytest.raises(ValueError, match=r"data.model_max_length \(the longest sample\) has 65 tokens, more than the "
                                         r"decoder's sliding_window of 64"):
        build_dataset(cfg, "unused-tokenizer", model)
    cfg = load_config(None, parts + ["data.model_max_length=64"])
    with pytest.raises(Exception) as e:  # within the window: on to reading the data file
        build_dataset(cfg, "unused-tokenizer", model)
    assert "sliding_window" not in str(e.value)
