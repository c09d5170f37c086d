"""python -m fastllava.chat with a SigLIP + Qwen2 model whose export records the qwen template: the prompt is
ChatML without a BOS, the image is preprocessed as SiglipImageProcessor does (after LLaVA's pad to square in the
tower's mean colour), and the streamed answer equals transformers' generate on the prompt written here by hand,
ending at <|im_end|> as the template's stop rule says."""

import json

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, SiglipImageProcessor

from fastllava.chat import main
from fastllava.data.tokenize import load_tokenizer, prepare_tokenizer
from fastllava.testing import tiny_config, tiny_hf_llava, write_qwen2_tokenizer

SIGLIP = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
QWEN2 = {"model_type": "qwen2", "qkv_bias": True, "rope_theta": 1e6, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "bos_token_id": None}
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
          "<|im_end|>\n<|im_start|>assistant\n")  # LLaVA-NeXT's conv_qwen, written out


def _qwen_llava(path):
    """A tiny SigLIP + Qwen2 llava-hf model (untied head) with a Qwen2-shaped tokenizer saved at `path`, and the
    record of its template; the model is saved by the test."""
    tokenizer = load_tokenizer(write_qwen2_tokenizer(path))
    ids = prepare_tokenizer(tokenizer)
    rows = -(-ids.vocab_size // 64) * 64
    text = {**QWEN2, "vocab_size": rows, "tie_word_embeddings": False, "eos_token_id": tokenizer.eos_token_id}
    config = tiny_config(vision=SIGLIP, text=text, image_token_id=ids.image_token_id, pad_token_id=ids.pad_token_id,
                         vision_feature_layer=-2)
    tokenizer.save_pretrained(str(path))
    (path / "fastllava.json").write_text(json.dumps({"template": "qwen"}))
    return tiny_hf_llava(config, seed=1), tokenizer


def _expand2square(img: Image.Image, fill) -> Image.Image:
    """LLaVA's expand2square, written out."""
    w, h = img.size
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _hf_inputs(hf, tokenizer, image_file):
    """(input_ids (1, L) with the image expanded, pixel_values) of PROMPT, as LLaVA-NeXT builds them."""
    before, after = PROMPT.split("<image>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = tokenizer(before)["input_ids"] + [image_id] + tokenizer(after)["input_ids"]  # no BOS: Qwen adds none
    ids = torch.tensor(ids)
    ids = ids.repeat_interleave(torch.where(ids == image_id, hf.config.image_seq_length, 1))[None]
    processor = SiglipImageProcessor(size={"height": 28, "width": 28})
    square = _expand2square(Image.open(image_file).convert("RGB"), tuple(int(255 * m) for m in processor.image_mean))
    return ids, processor(square, return_tensors="pt")["pixel_values"]


def _greedy(hf, ids, pixels, eos):
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, do_sample=False,
                      max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _end_at(hf, ids, pixels, answer, step, end):
    """Make the model's greedy answer end with `end` at `step` at the latest: the head row of `end` becomes
    that of the token chosen there plus 0.5 / |h|^2 h (h the final hidden state there), so `end` wins by 0.5."""
    prefix = torch.cat([ids, torch.tensor([answer[:step]])], dim=1)
    h = hf(input_ids=prefix, pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0, -1]
    head = hf.lm_head.weight
    head[end] = head[answer[step]] + 0.5 * h / h.dot(h)


def test_chat_prompts_in_the_recorded_qwen_template_and_stops_at_im_end(tmp_path, image_file, capsys):
    path = tmp_path / "model"
    hf, tokenizer = _qwen_llava(path)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, pixels = _hf_inputs(hf, tokenizer, image_file)
    _end_at(hf, ids, pixels, _greedy(hf, ids, pixels, None), 4, end)
    hf.save_pretrained(path)
    tokens = _greedy(hf, ids, pixels, end)
    assert 2 <= len(tokens) <= 5 and tokens[-1] == end and end not in tokens[:-1]  # an answer, ended early
    code = main(["--model", str(path), "--image", str(image_file), "--prompt", "What is it?", "--temperature", "0",
                 "--max-new-tokens", "12"])
    assert code == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(tokens, skip_special_tokens=True).strip()
