"""python -m fastllava.eval end to end on every task's small LLaVA-layout data: answers file in LLaVA's
format, scores written, prompts as LLaVA's scripts build them, 2 processes = 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import layout_bench
import layout_vqa
from fastllava.data.templates import VICUNA_SYSTEM
from fastllava.eval.run import main
from fastllava.eval.tasks import TASKS, make_task
from fastllava.generate.inputs import load_model, load_pixels

MAKERS = {name: getattr(module, f"make_{name}") for module in (layout_vqa, layout_bench)
          for name in TASKS if hasattr(module, f"make_{name}")}


def _run(task, llava_dir, data, out, *extra):
    return main(["--model", str(llava_dir), "--task", task, "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "3", *extra])


def _answers(out):
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def test_every_task_has_a_layout():
    assert sorted(MAKERS) == sorted(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_end_to_end(task, llava_dir, tmp_path):
    data = MAKERS[task](tmp_path / "data")
    out = tmp_path / "out"
    assert _run(task, llava_dir, data, out) == 0
    questions = make_task(task).load(data)
    answers = _answers(out)
    assert len(answers) == len(questions)
    for q, a in zip(questions, answers):
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(a)
        assert a["question_id"] == q.record.get("question_id", q.question_id)
        assert a["model_id"] == llava_dir.name
    scores = json.loads((out / "scores.json").read_text())
    assert scores["task"] == task and scores["speed"]["questions"] == len(questions)
    assert (out / "scores.md").is_file()


def test_answers_are_llava_prompts_decoded_greedily(llava_dir, tmp_path):
    """The first VQAv2 answer equals transformers' greedy answer to the prompt LLaVA's model_vqa_loader builds."""
    data = layout_vqa.make_vqav2(tmp_path / "data")
    out = tmp_path / "out"
    assert _run("vqav2", llava_dir, data, out) == 0
    q = make_task("vqav2").load(data)[0]
    _, tokenizer = load_model(llava_dir)
    text = f"{VICUNA_SYSTEM} USER: <image>\n{q.text} ASSISTANT:"
    before, after = text.split("<image>")
    ids = tokenizer(before)["input_ids"] + [tokenizer.convert_tokens_to_ids("<image>")] + tokenizer(after)["input_ids"][1:]
    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    ids = torch.tensor(ids)
    ids = ids.repeat_interleave(torch.where(ids == hf.config.image_token_index, hf.config.image_seq_length, 1))[None]
    gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=load_pixels(q.images, 28),
                      do_sample=False, max_new_tokens=3, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    assert _answers(out)[0]["text"] == tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_two_processes_write_what_one_writes(llava_dir, tmp_path):
    data = layout_vqa.make_pope(tmp_path / "data")
    assert _run("pope", llava_dir, data, tmp_path / "one") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "fastllava.eval",
           "--model", str(llava_dir), "--task", "pope", "--data", str(data), "--output", str(tmp_path / "two"),
           "--max-new-tokens", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "answers.jsonl").read_text() == (tmp_path / "one" / "answers.jsonl").read_text()
    one, two = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    assert one["scores"] == two["scores"]


def test_bad_input_is_named(llava_dir, tmp_path, capsys):
    data = layout_vqa.make_pope(tmp_path / "data")
    with pytest.raises(SystemExit):
        main(["--model", str(llava_dir), "--task", "nope", "--data", str(data), "--output", str(tmp_path / "o")])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    questions = data / "pope" / "llava_pope_test.jsonl"
    lines = questions.read_text().splitlines()
    questions.write_text("\n".join(lines + [lines[0]]) + "\n")  # a duplicate question id
    assert _run("pope", llava_dir, data, tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "llava_pope_test.jsonl" in err and str(len(lines) + 1) in err


@pytest.mark.parametrize("task", ["vqav2", "vizwiz"])
def test_val_split_is_scored(task, llava_dir, tmp_path):
    data = getattr(layout_vqa, f"make_{task}_val")(tmp_path / "data")
    out = tmp_path / "out"
    assert _run(task, llava_dir, data, out, "--split", "val") == 0
    questions = make_task(task, split="val").load(data)
    answers = _answers(out)
    assert [a["question_id"] for a in answers] == [q.question_id for q in questions]
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert scores == make_task(task, split="val").score(questions, [a["text"] for a in answers], tmp_path / "again")
    assert set(scores) == {"val_accuracy"} and 0 <= scores["val_accuracy"] <= 100
    # No published test number is printed next to the val metric: the row's reference cells are empty.
    (row,) = [line for line in (out / "scores.md").read_text().splitlines() if line.startswith("| val_accuracy |")]
    assert row.endswith(" |  |  |")


def test_unknown_split_names_the_known_ones(llava_dir, tmp_path, capsys):
    data = layout_vqa.make_vqav2(tmp_path / "data")
    assert _run("vqav2", llava_dir, data, tmp_path / "out", "--split", "nope") == 1
    err = capsys.readouterr().err
    assert "'nope'" in err and "test-dev, val" in err
    assert not (tmp_path / "out").exists()  # refused before the model was loaded or anything written
    data = layout_vqa.make_pope(tmp_path / "data")
    assert _run("pope", llava_dir, data, tmp_path / "out", "--split", "random") == 1
    assert "task pope has no such split (it has one split)" in capsys.readouterr().err
