"""python -m fastllava.datagen.demo: demo-world scenes -> rule-based loopback endpoint -> datagen's main()."""

import json
import math
import os

import pytest
from PIL import Image

from fastllava.data.files import RejectLog, load_records
from fastllava.datagen.demo import main, rule_based_answer
from fastllava.datagen.messages import KINDS
from fastllava.datagen.validate import to_conversations
from fastllava.demo.world import COLORS, POSITIONS


def pixel_truth(path):
    """(colour, occupied cell names) read from the JPEG itself: each shape is centred in its grid cell, so a
    cell holds a shape iff its centre pixel has a shape colour (backgrounds are neutral grey tones)."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    colors, cells = set(), []
    for cell, name in enumerate(POSITIONS):
        row, col = divmod(cell, 2)
        px = image.getpixel((col * (w // 2) + w // 4, row * (h // 2) + h // 4))
        dist = {c: sum(abs(a - b) for a, b in zip(px, rgb)) for c, rgb in COLORS.items()}
        best = min(dist, key=dist.get)
        if dist[best] < 90:
            colors.add(best)
            cells.append(name)
    assert len(colors) == 1, (path, colors)
    return colors.pop(), cells


def test_demo_writes_true_conversations_for_every_image(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FASTLLAVA_DATAGEN_API_KEY", raising=False)
    monkeypatch.setenv("FASTLLAVA_PROGRESS_INTERVAL", "0")
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--images", "6"]) == 0
    err = capsys.readouterr().err
    assert "datagen: 6 written, 0 rejected, 0 failed, 0 already done of 6 images" in err
    assert "FASTLLAVA_DATAGEN_API_KEY" not in os.environ  # the dummy key was only set for the run

    annotations = [json.loads(line) for line in open(out / "annotations.jsonl")]
    assert len(annotations) == 6
    for ann in annotations:
        assert ann["captions"] and ann["boxes"]
        assert all(0 <= v <= 1 for b in ann["boxes"] for v in b["bbox"])
    written = [json.loads(line) for line in open(out / "conversation.jsonl")]
    assert sorted(r["id"] for r in written) == [a["id"] for a in annotations]  # each image once
    assert not (out / "conversation.rejects.jsonl").read_text().strip()

    records = load_records([str(out / "conversation.jsonl")], rejects=RejectLog(strict=True), verbose=False,
                           image_folder=str(out / "images"), check_images=True)
    assert len(records) == 6
    for r in written:
        color, cells = pixel_truth(out / "images" / r["image"])
        # The boxes agree with the pixels ...
        ann = next(a for a in annotations if a["id"] == r["id"])
        assert len(ann["boxes"]) == len(cells) and all(b["category"].startswith(color + " ") for b in ann["boxes"])
        # ... and so do the answers: the colours named, the count and the positions.
        gpt = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        assert len(gpt) >= 3
        text = " ".join(gpt).lower()
        assert {c for c in COLORS if c in text} == {color}
        assert f"there {'is' if len(cells) == 1 else 'are'} {len(cells)} {color} " in gpt[0].lower()
        where = next(a for a in gpt if a.endswith("of the image."))
        named = [p for p in POSITIONS if p in where]
        assert named == cells, (where, cells)

    # A second run draws the same scenes and asks for nothing.
    assert main(["--out", str(out), "--images", "6"]) == 0
    assert "0 written, 0 rejected, 0 failed, 6 already done of 6 images" in capsys.readouterr().err


def test_demo_detail_writes_descriptions_and_caption_briefs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FASTLLAVA_DATAGEN_API_KEY", raising=False)
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--images", "3", "--kind", "detail"]) == 0
    assert f"brief descriptions: {out / 'detail.brief.jsonl'}" in capsys.readouterr().err
    captions = {a["id"]: a["captions"] for a in map(json.loads, open(out / "annotations.jsonl"))}
    for name in ("detail.jsonl", "detail.brief.jsonl"):
        records = load_records([str(out / name)], rejects=RejectLog(strict=True), verbose=False,
                               image_folder=str(out / "images"), check_images=True)
        assert sorted(records.ids) == sorted(captions)
    for brief in map(json.loads, open(out / "detail.brief.jsonl")):
        assert brief["conversations"][1]["value"] in captions[brief["id"]]


def test_runs_as_is_into_outputs_datagen_demo(tmp_path, monkeypatch, capsys):
    """`python -m fastllava.datagen.demo` with no arguments (the README's command) writes under the current
    folder's outputs/datagen-demo, which its --help names."""
    monkeypatch.delenv("FASTLLAVA_DATAGEN_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    written = [json.loads(line) for line in open(tmp_path / "outputs" / "datagen-demo" / "conversation.jsonl")]
    assert len(written) == 8 and (tmp_path / "outputs" / "datagen-demo" / "images" / written[0]["image"]).is_file()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "default outputs/datagen-demo" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("kind", KINDS)
def test_rule_based_answers_parse_for_every_kind(kind):
    context = "Two red circles.\n\nred circle: [0.1, 0.1, 0.4, 0.4]\nred circle: [0.6, 0.6, 0.9, 0.9]"
    turns = to_conversations(kind, "x", rule_based_answer(kind, context))
    gpt = " ".join(t["value"] for t in turns if t["from"] == "gpt")
    assert "2 red circles" in gpt and "top left and bottom right" in gpt
    assert to_conversations(kind, "x", rule_based_answer(kind, "Just a caption."))  # no boxes: still valid


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    for argv, message in ((["--out", str(tmp_path), "--images", "0"], "--images must be >= 1"),
                          (["--out", str(tmp_path), "--kind", "poem"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "file")])
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind, data, stage, template", [
    ("conversation", "conversation.jsonl", "finetune", "vicuna_v1"),
    ("detail", "detail.brief.jsonl", "align", "plain"),
], ids=["conversations-stage2", "brief-stage1"])
def test_generated_data_trains_through_the_finetune_pipeline(tmp_path, monkeypatch, llava_dir, kind, data, stage,
                                                             template):
    """The generated files are ordinary training data: train() (what recipes/finetune.py runs) reads the
    conversations as stage-2 data (vicuna_v1) and the brief descriptions as stage-1 data (plain), rejects
    nothing (strict) and trains a tiny llava-hf checkpoint on each."""
    from fastllava.config import load_config
    from fastllava.train import train

    monkeypatch.delenv("FASTLLAVA_DATAGEN_API_KEY", raising=False)
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--images", "8", "--kind", kind]) == 0
    cfg = load_config(None, [
        "model.source=pretrained", f"model.pretrained_path={llava_dir}", f"train.stage={stage}",
        f"data.data_path={out / data}", f"data.image_folder={out / 'images'}", f"data.template={template}",
        "data.strict=true", "data.num_workers=0",
        "data.model_max_length=512", "data.max_tokens_per_pack=512", "train.global_batch_size=4", "train.max_steps=2",
        "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "parallel.activation_checkpointing=none",
        "logging.progress=false", "checkpoint.every_steps=0"])
    result = train(cfg)
    assert sorted(result.losses) == [1, 2] and all(math.isfinite(v) for v in result.losses.values())
    # stage 1 exports the projector alone, stage 2 a llava-hf checkpoint
    assert (result.export.is_file() if stage == "align" else (result.export / "config.json").is_file())
