"""Tiny random transformers LLaVA models and packed batches shared by the model tests."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from fastllava import PackedBatch

IMAGE_TOKEN = 120
VOCAB = 128
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def make_hf_llava(*, kv_heads=4, rope="default", tie=False, select="default", seed=0):
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rope_parameters=dict(ROPES[rope]), tie_word_embeddings=tie,
        max_position_embeddings=64,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy=select, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # transformers' init leaves norms at 1 and biases at 0, which would hide mistakes in them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.2) + ("norm" in name and name.endswith("weight")))
    return model


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
