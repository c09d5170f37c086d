"""Reading and writing Hugging Face checkpoints: llava-hf, original LLaVA, CLIP + LLaMA, projector files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_llava import IMAGE_TOKEN, hf_logits_per_sample, make_samples, pack, rel_err
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

from fastllava import Llava
from fastllava.model.keys import canonical_llava_key


def logits(model, samples):
    with torch.no_grad():
        return model(pack(samples, model.num_image_tokens), return_logits=True).logits


def test_save_pretrained_round_trips_through_transformers_sharded(hf_llava_dir, tmp_path):
    path, hf = hf_llava_dir
    model = Llava.from_pretrained(path)
    out = tmp_path / "ours"
    model.save_pretrained(out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    # Complete: every tensor of the original checkpoint, including the unused last vision layer.
    original = {canonical_llava_key(k) for k in load_file(path / "model.safetensors")}
    assert set(index["weight_map"]) == original

    reloaded_hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    samples = make_samples(5)
    assert rel_err(logits(model, samples), hf_logits_per_sample(reloaded_hf.eval(), samples, 4)) <= 1e-5
    for a, b in zip(hf.state_dict().values(), reloaded_hf.state_dict().values()):
        assert torch.equal(a, b)
    # And our own loader reads the sharded directory back.
    assert torch.equal(logits(Llava.from_pretrained(out), samples), logits(model, samples))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_stored(hf_llava_dir, tmp_path, dtype):
    _, hf = hf_llava_dir
    hf.to(dtype).save_pretrained(tmp_path / "half")
    model = Llava.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert Llava.from_pretrained(tmp_path / "half", dtype=torch.float32).lm_head.weight.dtype == torch.float32


def save_as_clip(hf, path):
    """The llava-hf vision tower saved as a stand-alone CLIPVisionModel directory."""
    clip = CLIPVisionModel(hf.config.vision_config)
    prefix = "model.vision_tower."
    state = {k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    clip.load_state_dict(state, strict=True)
    clip.save_pretrained(path)


def save_as_llama(hf, path):
    llama = LlamaForCausalLM(hf.config.text_config)
    prefix = "model.language_model."
    state = {"model." + k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    state["lm_head.weight"] = hf.lm_head.weight
    llama.load_state_dict(state, strict=True)
    llama.save_pretrained(path)


def original_llava_state(hf):
    """The llava-hf weights renamed to the original LLaVA (LlavaLlamaForCausalLM) layout."""
    state = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            n, leaf = k[len("model.multi_modal_projector.linear_"):].split(".")
            state[f"model.mm_projector.{2 * (int(n) - 1)}.{leaf}"] = v
    state["lm_head.weight"] = hf.lm_head.weight
    return {k: v.contiguous() for k, v in state.items()}


def test_original_llava_layout_with_separate_clip(hf_llava_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _, hf = hf_llava_dir
    # The Hub id in mm_vision_tower below: never downloaded, nor found in this machine's cache.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    save_as_clip(hf, tmp_path / "clip")
    orig = tmp_path / "orig"
    orig.mkdir()
    save_file(original_llava_state(hf), orig / "model.safetensors")
    text = hf.config.text_config.to_dict()
    config = {
        **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")},
        "rope_theta": 10000.0, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": str(tmp_path / "clip"), "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
    }
    (orig / "config.json").write_text(json.dumps(config))
    model = Llava.from_pretrained(orig)
    samples = make_samples(6)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, 4)) <= 1e-5

    (orig / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(ValueError, match="is not in the Hub cache .* pass vision_tower=CLIP_DIR"):
        Llava.from_pretrained(orig)
    assert rel_err(logits(Llava.from_pretrained(orig, vision_tower=tmp_path / "clip"), samples),
                   hf_logits_per_sample(hf, samples, 4)) <= 1e-5

    # LLaVA-NeXT's original-layout classes with other decoders are refused by name, not read as LLaMA
    for architecture, model_type in (("LlavaQwenForCausalLM", "llava_qwen"), ("LlavaMistralForCausalLM", "llava_mistral")):
        (orig / "config.json").write_text(json.dumps({**config, "architectures": [architecture], "model_type": model_type}))
        with pytest.raises(ValueError, match=f"original-layout LLaVA checkpoint of architecture '{architecture}' "
                                             f"\\(model_type '{model_type}'\\); fastllava reads the original layout only"):
            Llava.from_pretrained(orig, vision_tower=tmp_path / "clip")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_from_components_with_projector_file(hf_llava_dir, tmp_path, fmt):
    _, hf = hf_llava_dir
    save_as_clip(hf, tmp_path / "clip")
    save_as_llama(hf, tmp_path / "llama")
    if fmt == "bin":  # LLaVA's stage-1 mm_projector.bin
        proj = {k: v for k, v in original_llava_state(hf).items() if "mm_projector" in k}
        torch.save(proj, tmp_path / "mm_projector.bin")
        proj_file = tmp_path / "mm_projector.bin"
    else:
        Llava.from_pretrained(hf_llava_dir[0]).save_projector(tmp_path / "projector.safetensors")
        proj_file = tmp_path / "projector.safetensors"
    model = Llava.from_components(vision=tmp_path / "clip", llm=tmp_path / "llama", projector_weights=proj_file)
    samples = make_samples(7)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, 4)) <= 1e-5


def test_from_components_new_projector_is_seeded(hf_llava_dir, tmp_path):
    _, hf = hf_llava_dir
    save_as_clip(hf, tmp_path / "clip")
    save_as_llama(hf, tmp_path / "llama")
    a = Llava.from_components(vision=tmp_path / "clip", llm=tmp_path / "llama", seed=1)
    b = Llava.from_components(vision=tmp_path / "clip", llm=tmp_path / "llama", seed=1)
    assert torch.equal(a.projector.linears[0].weight, b.projector.linears[0].weight)
    assert torch.equal(a.language_model.embed_tokens.weight, hf.model.language_model.embed_tokens.weight)
    assert a.config.image_token_id == 128  # the next id after the LLM's vocabulary, for the added <image>


def test_save_components_load_in_transformers_and_back(hf_llava_dir, tmp_path):
    """The tower as a CLIPVisionModel directory and the LLM as a LlamaForCausalLM directory: transformers loads
    them completely and computes what the LLaVA they came from computes; from_components rebuilds it."""
    path, hf = hf_llava_dir
    model = Llava.from_pretrained(path)
    model.save_components(tmp_path / "clip", tmp_path / "llama")
    model.save_projector(tmp_path / "projector.safetensors")
    clip, clip_info = CLIPVisionModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    llama, llama_info = LlamaForCausalLM.from_pretrained(tmp_path / "llama", output_loading_info=True)
    for info in (clip_info, llama_info):
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, IMAGE_TOKEN, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = clip.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert rel_err(features, model.vision_tower(pixels)) <= 1e-5
        assert rel_err(llama.eval()(input_ids=ids).logits, hf(input_ids=ids).logits) <= 1e-5
    rebuilt = Llava.from_components(tmp_path / "clip", tmp_path / "llama", tmp_path / "projector.safetensors",
                                    image_token_id=IMAGE_TOKEN)
    samples = make_samples(8)
    assert torch.equal(logits(rebuilt, samples), logits(model, samples))


def test_new_projectors_start_as_llavas_in_both_paths(hf_llava_dir, tmp_path):
    """One rule for a new projector, from checkpoints or from scratch: nn.Linear's default (Kaiming-uniform,
    bounds 1/sqrt(fan_in)), as LLaVA's stage 1 starts; not the 0.02-normal of the transformer weights."""
    from fastllava.testing import tiny_config

    Llava.from_pretrained(hf_llava_dir[0]).save_components(tmp_path / "clip", tmp_path / "llama")
    scratch = Llava.from_config(tiny_config(), seed=2)
    for model in (Llava.from_components(tmp_path / "clip", tmp_path / "llama", seed=2), scratch):
        for linear in model.projector.linears:
            bound = linear.in_features ** -0.5
            for p in (linear.weight, linear.bias):
                assert p.abs().max() <= bound and p.std() > 0.8 * bound / 3 ** 0.5
    assert abs(scratch.lm_head.weight.std().item() - 0.02) < 0.005


def test_resize_token_embeddings_pads_to_64_with_mean_rows(hf_llava_dir):
    model = Llava.from_pretrained(hf_llava_dir[0])
    old = model.language_model.embed_tokens.weight.clone()
    assert model.resize_token_embeddings(130) == 192
    new = model.language_model.embed_tokens.weight
    assert new.shape == (192, 64) and model.lm_head.weight.shape == (192, 64)
    assert torch.equal(new[:128], old)
    assert torch.allclose(new[128:], old.mean(0).expand(64, -1))
    model(pack(make_samples(), 4))  # still runs


# --- errors ---------------------------------------------------------------------------------------


def rewrite(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_key_is_an_error(hf_llava_dir):
    path, _ = hf_llava_dir
    rewrite(path, lambda s: s.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        Llava.from_pretrained(path)


def test_unexpected_key_is_an_error(hf_llava_dir):
    path, _ = hf_llava_dir
    rewrite(path, lambda s: s.update({"language_model.model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"mystery"):
        Llava.from_pretrained(path)
    rewrite(path, lambda s: (s.pop("language_model.model.layers.0.mystery.weight"),
                             s.update({"something_else.weight": torch.zeros(2)})))
    with pytest.raises(ValueError, match=r"unexpected key 'something_else.weight'"):
        Llava.from_pretrained(path)


def test_shape_mismatch_names_key_and_shapes(hf_llava_dir):
    path, _ = hf_llava_dir
    rewrite(path, lambda s: s.update({"multi_modal_projector.linear_1.weight": torch.zeros(64, 33)}))
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight.*\(64, 33\).*\(64, 32\)"):
        Llava.from_pretrained(path)


def test_unknown_architecture_and_missing_files(hf_llava_dir, tmp_path):
    path, _ = hf_llava_dir
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown architecture"):
        Llava.from_pretrained(path)
    with pytest.raises(ValueError, match="nowhere: does not exist as a local path, and is not a Hugging Face Hub"):
        Llava.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        Llava.from_pretrained(tmp_path)
    (path / "config.json").write_text(json.dumps(config))
    index = {"weight_map": {"language_model.lm_head.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: shard named in .* is missing"):
        Llava.from_pretrained(path)


def test_component_directories_of_no_known_family(hf_llava_dir, tmp_path):
    """A tower or decoder directory is read by the family its model_type names (model/families/): another
    model_type, or a key its family does not know, is an error naming the file."""
    Llava.from_pretrained(hf_llava_dir[0]).save_components(tmp_path / "clip", tmp_path / "llama")
    for part, model_type, expected in (("clip", "dinov2", "'clip' or 'clip_vision_model' or 'siglip' or 'siglip_vision_model'"),
                                       ("llama", "gpt2", "'llama' or 'qwen2'")):
        config_file = tmp_path / part / "config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(ValueError, match=rf"{part}/config.json: model_type '{model_type}', expected {expected}"):
            Llava.from_components(tmp_path / "clip", tmp_path / "llama")
        config_file.write_text(json.dumps(config))
    rewrite(tmp_path / "llama", lambda s: s.update({"transformer.h.0.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected key 'transformer.h.0.weight' in a LLaMA"):
        Llava.from_components(tmp_path / "clip", tmp_path / "llama")


def test_projector_file_errors(hf_llava_dir, tmp_path):
    model = Llava.from_pretrained(hf_llava_dir[0])
    with pytest.raises(ValueError, match="absent.bin: does not exist as a local path, and is not a Hugging Face Hub"):
        model.load_projector(tmp_path / "absent.bin")
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32)}, tmp_path / "half.bin")
    with pytest.raises(ValueError, match="missing projector tensors"):
        model.load_projector(tmp_path / "half.bin")
    torch.save({"model.layers.0.weight": torch.zeros(1)}, tmp_path / "wrong.bin")
    with pytest.raises(ValueError, match="is not a projector weight"):
        model.load_projector(tmp_path / "wrong.bin")
