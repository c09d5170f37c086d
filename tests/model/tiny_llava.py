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
