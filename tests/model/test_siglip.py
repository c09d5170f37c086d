"""The SigLIP tower against transformers' SiglipVisionModel, alone and inside LlavaForConditionalGeneration."""

import pytest
import torch
from safetensors.torch import load_file
from test_hf_interop import save_as_llama
from tiny_llava import hf_logits_per_sample, make_samples, pack, rel_err
from transformers import LlavaForConditionalGeneration, SiglipConfig, SiglipModel, SiglipVisionModel

from fastllava import Llava
from fastllava.model import LlavaConfig
from fastllava.testing import tiny_config, tiny_hf_llava

SIGLIP = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
PATCHES = 4  # 28 px / 14 px patches, no CLS


def siglip_config(layer=-2, **text):
    return tiny_config(vision=SIGLIP, text=text, vision_feature_layer=layer)


def logits(model, samples):
    with torch.no_grad():
        return model(pack(samples, PATCHES), return_logits=True).logits


# 32 px in 14 px patches: 2 x 2 patches and 4 pixels the convolution drops, as so400m-patch14-384's 27 x 27 do
@pytest.mark.parametrize("layer,size", [(-2, 28), (-1, 28), (1, 28), (-2, 32)])
def test_tower_features_are_the_hidden_state_llava_selects(tmp_path, layer, size):
    config = siglip_config(layer)
    config.vision.image_size = size
    hf = tiny_hf_llava(config)
    hf.save_pretrained(tmp_path)
    model = Llava.from_pretrained(tmp_path)
    assert model.num_image_tokens == PATCHES and not hasattr(model.vision_tower.embeddings, "class_embedding")
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.vision_tower(pixels)
        out = hf.model.vision_tower(pixels, output_hidden_states=True)
    expected = out.hidden_states[layer]  # transformers' Llava: every token for "full", no post_layernorm
    assert ours.shape == expected.shape == (3, PATCHES, 32)
    assert rel_err(ours, expected) <= 1e-6
    if layer == -1:  # the last hidden state is taken before post_layernorm, which pooling alone uses
        assert rel_err(ours, out.last_hidden_state) > 0.1


@pytest.mark.parametrize("layer,tie", [(-2, False), (-1, True)])
def test_packed_logits_match_transformers_and_export_reads_back(tmp_path, layer, tie):
    hf = tiny_hf_llava(siglip_config(layer, num_key_value_heads=2, tie_word_embeddings=tie))
    assert type(hf.model.vision_tower).__name__ == "SiglipVisionModel"
    assert hf.config.vision_feature_select_strategy == "full"
    hf.save_pretrained(tmp_path / "hf")
    model = Llava.from_pretrained(tmp_path / "hf").eval()
    samples = make_samples()
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, PATCHES)) <= 1e-5

    model.save_pretrained(tmp_path / "ours")
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for a, b in zip(hf.state_dict().values(), back.state_dict().values()):  # the carried head and norm too
        assert torch.equal(a, b)
    assert rel_err(logits(model, samples), hf_logits_per_sample(back.eval(), samples, PATCHES)) <= 1e-5


@pytest.mark.parametrize("whole", [False, True], ids=["SiglipVisionModel", "SiglipModel"])
def test_from_components_reads_siglip_and_llama_directories(tmp_path, whole):
    hf = tiny_hf_llava(siglip_config())
    hf.save_pretrained(tmp_path / "hf")
    prefix = "model.vision_tower."
    state = {k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    if whole:  # both towers: the text half is skipped
        tower = SiglipModel(SiglipConfig(vision_config=hf.config.vision_config.to_dict(), text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)))
        tower.vision_model.load_state_dict(state, strict=True)
    else:
        tower = SiglipVisionModel(hf.config.vision_config)
        tower.load_state_dict(state, strict=True)
    tower.save_pretrained(tmp_path / "siglip")
    save_as_llama(hf, tmp_path / "llama")

    model = Llava.from_components(tmp_path / "siglip", tmp_path / "llama", image_token_id=hf.config.image_token_index)
    assert model.config.vision.model_type == "siglip_vision_model" and model.num_image_tokens == PATCHES
    # The stage-1 model has a new projector; with the llava-hf one in its place it is the llava-hf model.
    model.projector.load_state_dict(Llava.from_pretrained(tmp_path / "hf").projector.state_dict())
    samples = make_samples(2)
    assert rel_err(logits(model.eval(), samples), hf_logits_per_sample(hf, samples, PATCHES)) <= 1e-5


def test_model_from_scratch_exports_completely(tmp_path):
    model = Llava.from_config(siglip_config(), seed=3)
    model.save_pretrained(tmp_path)
    assert "vision_tower.vision_model.head.probe" in load_file(tmp_path / "model.safetensors")
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    samples = make_samples(4)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf.eval(), samples, PATCHES)) <= 1e-5


def test_selections_that_need_a_cls_token_are_refused():
    with pytest.raises(ValueError, match="'cls_patch' needs a CLS token.*siglip_vision_model"):
        tiny_config(vision=SIGLIP, vision_feature_select="cls_patch")
    hf_config = siglip_config().to_hf_llava()
    with pytest.raises(ValueError, match="must be 'full' for a siglip_vision_model tower, got 'default'"):
        LlavaConfig.from_hf_llava({**hf_config, "vision_feature_select_strategy": "default"})


@pytest.mark.parametrize("vision", [{}, SIGLIP], ids=["clip", "siglip"])
def test_flop_model_counts_the_tower_as_it_runs(vision):
    """FlopModel's frozen-tower FLOPs per image equal FlopCounterMode's count of the tower's forward: a
    SigLIP tower has no CLS token, so it runs on the patches alone (counted as CLIP's patches + 1, the audit
    and the plan would credit work that never runs)."""
    from fastllava.flop_audit import _count  # FlopCounterMode with a formula for CPU SDPA, as the audit counts
    from fastllava.flops import FlopModel

    config = tiny_config(vision=vision)
    model = Llava(config)
    pixels = torch.randn(2, 3, config.vision.image_size, config.vision.image_size)
    with torch.no_grad():
        counted = _count(lambda: model.vision_tower(pixels))["total"]
    flop_model = FlopModel.build(config, "finetune")
    assert counted == 2 * (flop_model.vision_matmul_per_image + flop_model.vision_attn_per_image)


def _state_equal(a, b):
    """Same keys and the same tensors, names and values."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("use_head", [False, True])
def test_vision_use_head_round_trips(tmp_path, use_head):
    """A SigLIP tower without the pooling head (vision_use_head false, as PaliGemma's and Gemma 3's) loads and
    exports without a stand-in head, and the export says so: transformers reads it back with no key missing or
    unexpected; with the head, the head travels."""
    config = siglip_config()
    config.vision.vision_use_head = use_head
    hf = tiny_hf_llava(config)
    assert hasattr(hf.model.vision_tower, "head") == use_head
    hf.save_pretrained(tmp_path / "hf")
    model = Llava.from_pretrained(tmp_path / "hf").eval()
    assert model.config.vision.vision_use_head is use_head
    model.save_pretrained(tmp_path / "ours")
    written = load_file(tmp_path / "ours" / "model.safetensors")
    assert any(".head." in k for k in written) == use_head
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.config.vision_config.vision_use_head is use_head and _state_equal(hf, back)
    samples = make_samples(3)
    assert rel_err(logits(model, samples), hf_logits_per_sample(back.eval(), samples, PATCHES)) <= 1e-5

    scratch = Llava.from_config(model.config, seed=2)  # a model from scratch makes up a head only if it has one
    assert any(".head." in k for k in scratch.carried) == use_head


def test_head_tensors_against_a_headless_config_are_refused(tmp_path):
    hf = tiny_hf_llava(siglip_config())  # with a head
    hf.config.vision_config.vision_use_head = False
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head.*vision_use_head false"):
        Llava.from_pretrained(tmp_path)


def test_vision_use_head_is_siglips():
    with pytest.raises(ValueError, match="vision_use_head is SigLIP's pooling head; a clip_vision_model tower"):
        tiny_config(vision={"vision_use_head": False})
    assert "vision_use_head" not in tiny_config().vision.to_hf()  # CLIP configs stay CLIPVisionConfig's


@pytest.mark.parametrize("model_type", ["siglip2", "siglip2_vision_model"])
def test_siglip2_naflex_is_refused_by_name(tmp_path, model_type):
    """SigLIP2's NaFlex towers (transformers' Siglip2VisionModel) are refused saying why; the fixed-resolution
    SigLIP2 checkpoints are SiglipModel directories, which test_from_components_reads_siglip_and_llama_directories
    reads (the same model_type and layout)."""
    from transformers import Siglip2Config, Siglip2VisionConfig, Siglip2VisionModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_patches=16)
    if model_type == "siglip2":
        Siglip2Config(vision_config=vision).save_pretrained(tmp_path / "tower")
    else:
        Siglip2VisionModel(Siglip2VisionConfig(**vision)).save_pretrained(tmp_path / "tower")
    hf = tiny_hf_llava(siglip_config())
    save_as_llama(hf, tmp_path / "llama")
    expected = f"{model_type!r} is a SigLIP2 NaFlex tower.*fixed-resolution.*model_type 'siglip'"
    with pytest.raises(ValueError, match=expected):
        Llava.from_components(tmp_path / "tower", tmp_path / "llama")
