"""python -m fastllava.chat against transformers' generate on prompts built here by hand, LLaVA's way."""

import argparse
import io

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from fastllava.chat import Chat, main
from fastllava.data.templates import VICUNA_SYSTEM
from fastllava.generate.inputs import load_model, load_pixels


def _llava_ids(tokenizer, text):
    """LLaVA's tokenizer_image_token, written out: chunks around <image> tokenized alone, BOS kept once."""
    chunks = text.split("<image>")
    ids = tokenizer(chunks[0])["input_ids"]
    for chunk in chunks[1:]:
        ids += [tokenizer.convert_tokens_to_ids("<image>")] + tokenizer(chunk)["input_ids"][1:]
    return ids


def _hf_answer(llava_dir, tokenizer, text, image, max_new_tokens):
    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    ids = torch.tensor(_llava_ids(tokenizer, text))
    ids = ids.repeat_interleave(torch.where(ids == hf.config.image_token_index, hf.config.image_seq_length, 1))[None]
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=load_pixels([image], 28),
                      do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=0)[0, ids.shape[1]:]
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def test_prompt_answers_once_like_transformers(llava_dir, image_file, capsys):
    code = main(["--model", str(llava_dir), "--image", str(image_file), "--prompt", "What is it?",
                 "--temperature", "0", "--max-new-tokens", "7"])
    assert code == 0
    _, tokenizer = load_model(llava_dir)
    expected = _hf_answer(llava_dir, tokenizer, f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:", image_file, 7)
    assert capsys.readouterr().out.strip() == expected


def test_second_turn_sees_the_first(llava_dir, image_file):
    model, tokenizer = load_model(llava_dir)
    args = argparse.Namespace(template="vicuna_v1", max_new_tokens=5, temperature=0.0, top_p=1.0, seed=0)
    chat = Chat(model, tokenizer, [str(image_file)], args)
    first = chat.reply("Describe the image.", io.StringIO())
    out = io.StringIO()
    second = chat.reply("Is there a dog?", out)
    assert out.getvalue().strip() == second
    text = f"{VICUNA_SYSTEM} USER: <image>\nDescribe the image. ASSISTANT: {first}</s>USER: Is there a dog? ASSISTANT:"
    assert second == _hf_answer(llava_dir, tokenizer, text, image_file, 5)


def test_bad_arguments_exit_with_a_reason(llava_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(llava_dir), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"])
    assert e.value.code == 2 and "missing.png: no such file" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt", "hi"]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert f"--model {tmp_path / 'nope'}: does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", str(llava_dir), "--device", "tpu", "--prompt", "hi"])
    assert e.value.code == 2 and "--device: invalid choice: 'tpu'" in capsys.readouterr().err
