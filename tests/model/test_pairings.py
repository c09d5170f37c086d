"""Any tower with any decoder: each pairing against transformers' LlavaForConditionalGeneration, on tiny random
configs whose norms and biases are random (fastllava.testing.tiny_hf_llava), so a missed one shows.

Per pairing: the packed logits equal transformers run one sample at a time, the export read back by
transformers gives them again, and greedy KV-cache generation equals transformers' generate token for token.
A new family is one line of TOWERS or DECODERS; PAIRINGS names the combinations run here. Covered elsewhere:
the CLIP pairings (test_llava_parity.py and tests/generate/test_generate.py for LLaMA, test_qwen2.py,
test_qwen3.py, test_mistral.py, test_llama31.py, test_phi3.py).
"""

import pytest
from test_llama31 import LLAMA31
from test_mistral import MISTRAL
from test_phi3 import PHI3
from test_qwen2 import QWEN2
from test_qwen3 import QWEN3
from test_siglip import SIGLIP
from tiny_llava import greedy_prompts_and_expected, hf_logits_per_sample, logits, make_samples, read_back, rel_err

from fastllava import Llava
from fastllava.testing import tiny_config, tiny_hf_llava

# name -> VisionConfig fields over fastllava.testing's TINY_VISION (28 px, 14 px patches: 4 image tokens)
TOWERS = {
    "clip": {},
    "siglip": SIGLIP,
}
# name -> TextConfig fields over TINY_TEXT (the families' own tests' shapes); grouped-query attention everywhere
DECODERS = {
    "llama": {"num_key_value_heads": 2},
    "llama3.1": LLAMA31,  # llama3 RoPE scaling, 8 query heads : 2 KV heads
    "qwen2": {**QWEN2, "tie_word_embeddings": False},
    "qwen2_tied": {**QWEN2, "tie_word_embeddings": True},
    "qwen3": QWEN3,  # per-head q/k norms, head_dim 24 of a 64 width
    "mistral": MISTRAL,  # 4 query heads : 1 KV head, the sliding window (4096) longer than any sample
    "phi3": {**PHI3, "num_key_value_heads": 2},  # q/k/v and gate/up stacked in the checkpoint, window 32
}
PAIRINGS = [
    ("siglip", "llama"),
    ("siglip", "llama3.1"),
    ("siglip", "qwen2"),
    ("siglip", "qwen2_tied"),
    ("siglip", "qwen3"),
    ("siglip", "mistral"),
    ("siglip", "phi3"),
]


def pairing_config(tower: str, decoder: str):
    # SigLIP has no CLS token to drop: llava-hf's "full" (every token) is its only selection, our "patch".
    return tiny_config(vision=TOWERS[tower], text=DECODERS[decoder], vision_feature_layer=-2)


@pytest.fixture(params=PAIRINGS, ids=["-".join(p) for p in PAIRINGS])
def pairing(request, tmp_path):
    """(our model loaded from the saved llava-hf directory, the transformers model it came from, directory)."""
    tower, decoder = request.param
    hf = tiny_hf_llava(pairing_config(tower, decoder), seed=len(tower) * 7 + len(decoder))
    hf.save_pretrained(tmp_path / "hf")
    model = Llava.from_pretrained(tmp_path / "hf").eval()
    # The families read are the ones written: a fallback to CLIP or LLaMA would still run, and wrongly.
    assert type(hf.model.vision_tower).__name__ == {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[tower]
    assert model.config.vision.to_hf()["model_type"] == hf.config.vision_config.model_type
    assert model.config.text.to_hf()["model_type"] == hf.config.text_config.model_type
    assert (model.lm_head.weight is model.language_model.embed_tokens.weight) == decoder.endswith("_tied")
    return model, hf, tmp_path


def test_packed_logits_and_export_match_transformers(pairing):
    model, hf, tmp_path = pairing
    samples = make_samples(1)
    expected = hf_logits_per_sample(hf, samples, model.num_image_tokens)
    assert rel_err(logits(model, samples), expected) <= 1e-5

    model.save_pretrained(tmp_path / "ours")
    back = read_back(tmp_path / "ours")
    assert type(back.model.language_model) is type(hf.model.language_model)
    assert rel_err(hf_logits_per_sample(back, samples, model.num_image_tokens), expected) <= 1e-5


def test_greedy_generation_matches_transformers_generate(pairing):
    model, hf, _ = pairing
    prompts, expected = greedy_prompts_and_expected(hf, make_samples(2), model.num_image_tokens)
    assert model.generate(prompts, max_new_tokens=10) == expected  # the three decoded together
