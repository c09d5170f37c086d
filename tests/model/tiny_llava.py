"""Tiny transformers LLaVA models (fastllava.testing's shape) and packed batches shared by the model tests."""

import torch

from fastllava import PackedBatch
from fastllava.testing import TINY_IMAGE_TOKEN as IMAGE_TOKEN
from fastllava.testing import TINY_TEXT, tiny_config, tiny_hf_llava

VOCAB = TINY_TEXT["vocab_size"]
ROPES = {
    "default": {},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


def make_hf_llava(*, kv_heads=4, rope="default", tie=False, select="default", seed=0):
    config = tiny_config(text={"num_key_value_heads": kv_heads, "tie_word_embeddings": tie, **ROPES[rope]},
                         vision_feature_select={"default": "patch", "full": "cls_patch"}[select])
    return tiny_hf_llava(config, seed=seed)


def make_samples(seed=0, image_size=28):
    """Three samples: one image + a multi-turn text, text only, two images."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, IMAGE_TOKEN, (n,), generator=g)

    def pixels(n):
        return torch.randn(n, 3, image_size, image_size, generator=g)

    s1 = torch.cat([torch.tensor([1]), text(3), torch.tensor([IMAGE_TOKEN]), text(9)])
    s2 = torch.cat([torch.tensor([1]), text(11)])
    s3 = torch.cat([torch.tensor([1, IMAGE_TOKEN]), text(4), torch.tensor([IMAGE_TOKEN]), text(6)])
    samples = []
    for ids, n_img in ((s1, 1), (s2, 0), (s3, 2)):
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        labels[ids == IMAGE_TOKEN] = -100
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels(n_img) if n_img else None})
    return samples


def pack(samples, num_image_tokens):
    return PackedBatch.from_samples(samples, image_token_id=IMAGE_TOKEN, num_image_tokens=num_image_tokens)


@torch.no_grad()
def hf_logits_per_sample(hf_model, samples, num_image_tokens):
    """transformers run on each sample alone, logits concatenated in pack order."""
    out = []
    for s in samples:
        single = pack([s], num_image_tokens)
        kwargs = {"pixel_values": s["pixel_values"]} if s["pixel_values"] is not None else {}
        out.append(hf_model(input_ids=single.input_ids[None], **kwargs).logits[0].float())
    return torch.cat(out)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, samples):
    """Our Llava's (T, V) fp32 logits of `samples` packed into one sequence."""
    with torch.no_grad():
        return model(pack(samples, model.num_image_tokens), return_logits=True).logits


def read_back(path):
    """transformers' LlavaForConditionalGeneration of a directory we wrote, checked complete (no missing,
    unexpected or mis-shaped key), in eval mode."""
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def write_components(hf_model, ours, path):
    """Split a transformers Llava into what Llava.from_components reads: path/"tower" (its vision class),
    path/"llm" (the decoder's own *ForCausalLM, LM head included even when tied) and our projector file."""
    from transformers import AutoModelForCausalLM

    state = hf_model.state_dict()
    tower = type(hf_model.model.vision_tower)(hf_model.config.vision_config)
    prefix = "model.vision_tower."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    tower.save_pretrained(path / "tower")
    llm = AutoModelForCausalLM.from_config(hf_model.config.text_config)
    prefix = "model.language_model."
    decoder = {"model." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    llm.load_state_dict({**decoder, "lm_head.weight": hf_model.lm_head.weight}, strict=True)
    llm.save_pretrained(path / "llm")
    ours.save_projector(path / "projector.safetensors")
    return path / "tower", path / "llm", path / "projector.safetensors"


def greedy_prompts_and_expected(hf_model, samples, num_image_tokens, max_new_tokens=10):
    """(prompts for Llava.generate, transformers' greedy generate of each sample alone): no EOS, so every
    sequence runs max_new_tokens, wherever the random model would stop."""
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    prompts, expected = [], []
    for sample in samples:
        ids = pack([sample], num_image_tokens).input_ids[None]
        extra = {} if sample["pixel_values"] is None else {"pixel_values": sample["pixel_values"]}
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, **extra)
        expected.append(out[0, ids.shape[1]:].tolist())
        prompts.append({"input_ids": sample["input_ids"].tolist(), "pixel_values": sample["pixel_values"]})
    return prompts, expected


def components_read_back(model, hf_model, path, architecture):
    """Our save_components' decoder directory, which transformers must load completely as `architecture` and
    which must compute hf_model's text-only logits; returns transformers' model of it."""
    import json

    from transformers import AutoModelForCausalLM

    model.save_components(path / "tower_out", path / "llm_out")
    assert json.loads((path / "llm_out" / "config.json").read_text())["architectures"] == [architecture]
    back, info = AutoModelForCausalLM.from_pretrained(path / "llm_out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(3, IMAGE_TOKEN, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(back.eval()(input_ids=ids).logits, hf_model(input_ids=ids).logits) <= 1e-5
    return back


def randomize_adapters(model, seed):
    """Draw every LoRA tensor of `model` from N(0, 0.1^2): B starts at zero, and a zero B would make any
    adapter format pass a comparison."""
    from fastllava.layers.lora import is_adapter

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
