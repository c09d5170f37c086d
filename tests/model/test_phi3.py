"""A CLIP tower with a Phi-3 decoder against transformers' LlavaForConditionalGeneration (text_config a
Phi3Config), on tiny random configs with random norms. Phi-3 stores q/k/v in one qkv_proj and gate/up in one
gate_up_proj, which our decoder keeps apart: a part split at the wrong rows (k and v have the same shape under
GQA) shows in the logits, and transformers loads an export only if the parts are written stacked again."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_llava import (randomize_adapters, IMAGE_TOKEN, components_read_back, greedy_prompts_and_expected, hf_logits_per_sample, logits, make_samples,
                        read_back, rel_err, write_components)
from transformers import LlavaForConditionalGeneration

from fastllava import Llava
from fastllava.config import LoRAConfig
from fastllava.layers.lora import LORA_TARGETS, apply_lora
from fastllava.model.hf import plan_llava
from fastllava.model.peft import save_peft_adapter
from fastllava.model.safetensors_io import checkpoint_files
from fastllava.testing import tiny_config, tiny_hf_llava
from fastllava.train.freeze import set_trainable

# Phi-3-mini-4k's kind of config: rms_norm_eps 1e-5 and a sliding window (2047 there), here 32: longer than
# every test sample and its 10 generated tokens, so transformers' window masks nothing the test compares.
PHI3 = dict(model_type="phi3", rms_norm_eps=1e-5, sliding_window=32, eos_token_id=3)
QKV = "language_model.model.layers.{}.self_attn.qkv_proj.weight"
GATE_UP = "language_model.model.layers.{}.mlp.gate_up_proj.weight"


def make_hf_phi3_llava(kv_heads: int, seed: int = 0, **text):
    return tiny_hf_llava(tiny_config(text={**PHI3, "num_key_value_heads": kv_heads, **text}), seed=seed)


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as shard:
            shapes.update({k: tuple(shard.get_slice(k).get_shape()) for k in shard.keys()})
    return shapes


@pytest.fixture(params=[2, 4], ids=["gqa", "mha"])
def hf_phi3_dir(request, tmp_path):
    hf = make_hf_phi3_llava(request.param)
    hf.save_pretrained(tmp_path / "hf", max_shard_size=100_000)  # several shards, the stacked tensors among them
    return tmp_path / "hf", hf


def test_packed_logits_match_transformers_per_sample(hf_phi3_dir):
    path, hf = hf_phi3_dir
    assert type(hf.model.language_model).__name__ == "Phi3Model"
    kv = hf.config.text_config.num_key_value_heads
    shapes = checkpoint_shapes(path)
    assert shapes[QKV.format(0)] == (64 + 2 * kv * 16, 64) and shapes[GATE_UP.format(1)] == (2 * 96, 64)
    model = Llava.from_pretrained(path).eval()
    assert model.config.text.model_type == "phi3" and model.config.text.sliding_window == 32
    attn = model.language_model.layers[0].self_attn
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv * 16, 64)
    samples = make_samples()
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, model.num_image_tokens)) <= 1e-5


def test_save_pretrained_writes_stacked_tensors_read_back_by_transformers(hf_phi3_dir, tmp_path):
    path, hf = hf_phi3_dir
    model = Llava.from_pretrained(path)
    model.save_pretrained(tmp_path / "out", max_shard_bytes=100_000)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "phi3" and config["text_config"]["sliding_window"] == 32
    decoder = [{k: shape for k, shape in checkpoint_shapes(p).items() if k.startswith("language_model.")}
               for p in (tmp_path / "out", path)]
    assert decoder[0] == decoder[1]  # qkv_proj and gate_up_proj as transformers wrote them; no q_proj
    again = read_back(tmp_path / "out")
    state = again.state_dict()
    for name, p in hf.state_dict().items():
        assert torch.equal(state[name], p), name  # every stacked row where it came from
    samples = make_samples(3)
    assert rel_err(hf_logits_per_sample(again, samples, 4), hf_logits_per_sample(hf, samples, 4)) <= 1e-5
    assert rel_err(logits(Llava.from_pretrained(tmp_path / "out"), samples), logits(model, samples)) == 0


def test_from_components_clip_and_phi3_directories(hf_phi3_dir, tmp_path):
    """A CLIPVisionModel and a Phi3ForCausalLM directory plus the projector give the LLaVA they came from;
    save_components writes a Phi3ForCausalLM directory (stacked tensors) that transformers loads completely."""
    path, hf = hf_phi3_dir
    tower, llm, projector = write_components(hf, Llava.from_pretrained(path), tmp_path)
    assert "model.layers.0.self_attn.qkv_proj.weight" in checkpoint_shapes(llm)
    model = Llava.from_components(vision=tower, llm=llm, projector_weights=projector, image_token_id=IMAGE_TOKEN)
    samples = make_samples(5)
    assert rel_err(logits(model, samples), hf_logits_per_sample(hf, samples, 4)) <= 1e-5

    components_read_back(model, hf, tmp_path, "Phi3ForCausalLM")


def test_lazy_parts_read_only_their_rows(hf_phi3_dir):
    """The sharded loader's view (LoadPlan.resolved(lazy=True)): each part of a stacked tensor is a RowReader
    over its own rows, so a rank's rows of k_proj are rows of qkv_proj past q's, read without the rest;
    every row range of every part equals the one-process load's parameter."""
    path, _ = hf_phi3_dir
    plan = plan_llava(path)
    model = plan.build(Llava)
    plan.load(model, None, "cpu")
    params = dict(model.named_parameters())
    parts = {name: (source, reader) for name, _, source, reader in plan.resolved(True) if name and "layers.1." in name}
    (_, q_rows), (source, k_rows) = (parts[f"language_model.layers.1.self_attn.{p}_proj.weight"] for p in "qk")
    assert source.endswith(f"key {QKV.format(1)!r} rows 64:{64 + k_rows.shape[0]}")
    # k's rows start in the file where q's 64 rows end: nothing before them is read for k.
    assert k_rows.file == q_rows.file and k_rows.offset == q_rows.offset + 64 * 64 * k_rows.dtype.itemsize
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        name = f"language_model.layers.1.{name}.weight"
        reader, full = parts[name][1], params[name]
        assert tuple(reader.shape) == tuple(full.shape), name
        for start, stop in ((0, full.shape[0]), (0, 5), (5, full.shape[0] - 3), (full.shape[0] - 1, full.shape[0])):
            assert torch.equal(reader[start:stop], full[start:stop].detach()), (name, start, stop)


def test_bad_configs_and_tensors_are_refused(hf_phi3_dir, tmp_path):
    path, _ = hf_phi3_dir
    config = json.loads((path / "config.json").read_text())
    for rope, message in (
        ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
         "Phi-3 rope_scaling 'longrope' .*128k-context variants.* not supported"),
        ({"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.75},
         "Phi-3 partial_rotary_factor 0.75 is not supported"),
    ):
        bad = json.loads(json.dumps(config))
        bad["text_config"]["rope_parameters"] = rope
        (path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            Llava.from_pretrained(path)
    # transformers 4.x spells them rope_scaling {"type": "su"} and a top-level partial_rotary_factor.
    from fastllava.model.families.phi3 import read_config

    with pytest.raises(ValueError, match="'su'"):
        read_config({**config["text_config"], "rope_parameters": None, "rope_scaling": {"type": "su"}})
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        read_config({**config["text_config"], "rope_parameters": None, "partial_rotary_factor": 0.5})
    (path / "config.json").write_text(json.dumps(config))

    # A qkv_proj whose rows do not add up to this config's q + k + v: named with the sizes expected.
    from safetensors.torch import load_file, save_file

    model = Llava.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    tensors[QKV.format(0)] = tensors[QKV.format(0)][:-16]
    save_file(tensors, tmp_path / "out" / "model.safetensors")
    kv = model.config.text.num_key_value_heads * 16
    with pytest.raises(ValueError, match=rf"key '{QKV.format(0)}': shape \({64 + 2 * kv - 16}, 64\) but this config "
                                         rf"stacks q_proj 64 \+ k_proj {kv} \+ v_proj {kv} rows there"):
        Llava.from_pretrained(tmp_path / "out")
    del tensors[QKV.format(0)]
    save_file(tensors, tmp_path / "out" / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing tensors {QKV.format(0)};"):  # named once, as stored
        Llava.from_pretrained(tmp_path / "out")


def test_sample_longer_than_the_sliding_window_is_refused(tmp_path):
    """Phi-3's window is never attended past: a pack whose longest sample exceeds it is refused, naming
    both lengths; at the window's length the logits still equal transformers' (which masks nothing yet)."""
    hf = make_hf_phi3_llava(2, sliding_window=17)
    hf.save_pretrained(tmp_path / "hf")
    model = Llava.from_pretrained(tmp_path / "hf").eval()
    first, _, third = make_samples()  # 17 and 19 tokens once their image tokens are expanded
    assert rel_err(logits(model, [first]), hf_logits_per_sample(hf, [first], 4)) <= 1e-5
    with pytest.raises(ValueError, match="19 tokens, more than the decoder's sliding_window of 17"):
        logits(model, [first, third])


def test_greedy_generation_matches_transformers_generate(hf_phi3_dir):
    """KV-cache decoding with the split projections: greedy tokens equal transformers' generate."""
    path, hf = hf_phi3_dir
    prompts, expected = greedy_prompts_and_expected(hf, make_samples(9), 4)
    assert Llava.from_pretrained(path).eval().generate(prompts, max_new_tokens=10) == expected

# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (as in tests/train/test_lora.py).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q_proj", "v_proj", "up_proj")], ids=["all", "some_parts"])
def test_lora_adapter_equals_peft_on_the_stacked_linears(targets, tmp_path):
    """PEFT adapts Phi-3's qkv_proj and gate_up_proj, not q_proj...: the adapter we write joins our per-part
    adapters into one of rank n r (zero blocks for a part that is not a target) that PeftModel applies to
    the stacked Linear, giving our adapted forward."""
    peft = pytest.importorskip("peft")
    hf = make_hf_phi3_llava(2, seed=4)
    hf.save_pretrained(tmp_path / "base")
    model = Llava.from_pretrained(tmp_path / "base")
    apply_lora(model, 4, 8.0, targets=targets)
    set_trainable(model, "finetune")
    randomize_adapters(model, seed=2)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    save_peft_adapter(model.config, tmp_path / "adapter", trained,
                      LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=list(targets)))
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    qkv = adapted.base_model.model.model.language_model.layers[0].self_attn.qkv_proj
    assert qkv.r["default"] == 12 and qkv.scaling["default"] == 2.0  # rank 3 x 4, alpha / r unchanged
    samples = make_samples(6)
    ours = logits(model.eval(), samples)
    assert rel_err(ours, hf_logits_per_sample(adapted, samples, 4)) <= 1e-5
    assert rel_err(ours, hf_logits_per_sample(LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                              samples, 4)) > 1e-2  # the adapters changed the model
