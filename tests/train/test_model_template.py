"""A model is prompted and its images preprocessed as it was trained: the export records the run's data.template
(final/fastllava.json) and image processor (final/preprocessor_config.json), and chat and eval read them (both
prompted in vicuna_v1 with CLIP's processor before, whatever the model was trained with)."""

import json

import pytest
from transformers import AutoImageProcessor

from fastllava import chat
from fastllava.data.images import Preprocess
from fastllava.eval import run as eval_run
from fastllava.generate.inputs import image_processor

from train_tiny import ToyDataset, run, tiny_config


def _eval_args(model, tmp_path, *extra):
    return eval_run.parse_args(["--model", str(model), "--task", "pope", "--data", str(tmp_path),
                                "--output", str(tmp_path / "out"), *extra])


def test_export_records_the_template_and_chat_and_eval_prompt_in_it(tmp_path):
    r = run(tiny_config(tmp_path / "run", "data.template=v0", "train.max_steps=1"), dataset=ToyDataset(8))
    assert json.loads((r.export / "fastllava.json").read_text()) == {"template": "v0"}
    assert chat.parse_args(["--model", str(r.export)]).template == "v0"
    assert _eval_args(r.export, tmp_path).template == "v0"
    # Told otherwise, they do as told.
    assert chat.parse_args(["--model", str(r.export), "--template", "plain"]).template == "plain"
    assert _eval_args(r.export, tmp_path, "--template", "vicuna_v1").template == "vicuna_v1"


def test_a_directory_without_the_record_is_prompted_in_vicuna_v1_with_a_note(tmp_path, capsys):
    """llava-hf's own releases (LLaVA-1.5, trained in vicuna_v1) record nothing."""
    assert chat.parse_args(["--model", str(tmp_path)]).template == "vicuna_v1"
    assert f"{tmp_path / 'fastllava.json'} does not name the model's conversation template" in capsys.readouterr().err
    assert _eval_args(tmp_path, tmp_path).template == "vicuna_v1"


@pytest.mark.parametrize("record", ['{"template": "nope"}', '{"other": 1}', "not json"])
def test_a_bad_record_is_named(tmp_path, capsys, record):
    (tmp_path / "fastllava.json").write_text(record)
    for parse in (lambda: chat.parse_args(["--model", str(tmp_path)]), lambda: _eval_args(tmp_path, tmp_path)):
        with pytest.raises(SystemExit) as e:
            parse()
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{tmp_path / 'fastllava.json'}: expected" in err and record[:8] in err, err


def test_export_writes_the_runs_image_processor(tmp_path):
    """A run told to preprocess with its own processor file (data.image_processor) exports it, so that chat and
    eval preprocess the same way, and transformers reads it as the same processor."""
    custom = tmp_path / "preprocessor_config.json"
    custom.write_text(json.dumps({"image_processor_type": "SiglipImageProcessor", "size": {"height": 28, "width": 28},
                                  "image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.6, 0.7], "resample": 2}))
    r = run(tiny_config(tmp_path / "run", f"data.image_processor={custom}", "train.max_steps=1"), dataset=ToyDataset(8))
    expected = Preprocess.from_file(custom, 28)
    assert image_processor(r.model.config, r.export) == expected
    assert image_processor(r.model.config, tmp_path / "run") != expected  # a directory without it: CLIP's
    hf = AutoImageProcessor.from_pretrained(r.export)
    assert type(hf).__name__.startswith("SiglipImageProcessor") and list(hf.image_mean) == [0.2, 0.3, 0.4]
    assert hf.resample == 2 and hf.size == {"height": 28, "width": 28}
