"""One rule for where an answer ends (Template.stop_ids), in every generating path: a model trained on the
`v0` template ends its answers with "###", and eval, chat and the demo's scoring must all stop there.

The model is llava_dir's tiny model rewired by hand so that greedy decoding after any prompt ending in
":" says "Yes", a newline, then "#" forever: its free-running output is known without running it, and runs
past "###" unless the generator is told to stop."""

import argparse
import io
import json

import pytest
import torch
from PIL import Image

import layout_vqa
from fastllava.chat import Chat
from fastllava.data.templates import TEMPLATES, get_template
from fastllava.demo.score import evaluate_vqa
from fastllava.eval.run import main
from fastllava.generate import Generator
from fastllava.generate.inputs import load_model, make_prompt


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.new("RGB", (40, 24), (200, 30, 90)).save(path)
    return path


@pytest.fixture(scope="module")
def v0_model(llava_dir, tmp_path_factory):
    """A llava-hf directory whose model maps each token of the chain ":" -> "▁Y" -> "es" -> "\\n" -> "#" -> "#"
    to the next: every block's output projections are zeroed (the residual stream stays the current
    token's embedding) and lm_head's row of each successor is its predecessor's embedding."""
    model, tokenizer = load_model(llava_dir)
    chain = tokenizer.convert_tokens_to_ids([":", "▁Y", "es", "\n", "<0x23>", "<0x23>"])
    with torch.no_grad():
        for layer in model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.language_model.norm.weight.fill_(1.0)
        embed = model.language_model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for src, dst in zip(chain, chain[1:]):
            model.lm_head.weight[dst] += embed[src]
    path = tmp_path_factory.mktemp("v0_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def test_stop_ids_are_the_training_texts_tokens(llava_dir):
    _, tok = load_model(llava_dir)
    hashes = tok.convert_tokens_to_ids(["<0x23>"] * 3)  # "#" is not in the fixture: byte fallback
    assert get_template("v0").stop_ids(tok) == [[tok.eos_token_id], hashes]
    assert get_template("vicuna_v1").stop_ids(tok) == [[tok.eos_token_id]]  # "</s>" is the EOS
    # plain: "\n" after a word, and the ".\n" token this SentencePiece merges after a period.
    assert get_template("plain").stop_ids(tok) == [[tok.eos_token_id], tok.convert_tokens_to_ids(["\n"]),
                                                   tok.convert_tokens_to_ids([".\n"])]
    for template in TEMPLATES.values():  # no empty sequence, EOS always first
        assert template.stop_ids(tok)[0] == [tok.eos_token_id] and all(template.stop_ids(tok))


def test_the_model_runs_past_the_marker_when_not_stopped(v0_model, image_file):
    model, tok = load_model(v0_model)
    prompt = make_prompt([{"from": "human", "value": "<image>\nIs there a cat?"}], [image_file], tok, model, "v0")
    (ids,) = Generator(model).generate([prompt], max_new_tokens=9)
    assert tok.decode(ids, skip_special_tokens=True) == "Yes\n######"


def test_eval_answers_end_before_the_marker(v0_model, tmp_path):
    data = layout_vqa.make_pope(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["--model", str(v0_model), "--task", "pope", "--data", str(data), "--output", str(out),
                 "--template", "v0", "--max-new-tokens", "9"]) == 0
    answers = [json.loads(line)["text"] for line in (out / "answers.jsonl").read_text().splitlines()]
    assert answers and all(a == "Yes" for a in answers)


def test_chat_and_demo_scoring_stop_there_too(v0_model, image_file):
    model, tok = load_model(v0_model)
    args = argparse.Namespace(template="v0", max_new_tokens=9, temperature=0.0, top_p=1.0, seed=0)
    out = io.StringIO()
    assert Chat(model, tok, [str(image_file)], args).reply("Is there a cat?", out) == "Yes"
    assert out.getvalue().strip() == "Yes"  # streamed: the "\n" before "###" shows, "###" never does
    samples = [{"id": "a", "image": image_file.name, "question_types": ["yes/no"],
                "conversations": [{"from": "human", "value": "<image>\nIs there a cat?"}, {"from": "gpt", "value": "Yes"}]}]
    r = evaluate_vqa(model, samples, image_file.parent, tok, "v0", max_new_tokens=9)
    assert r["accuracy"] == 1.0, r["mistakes"]
