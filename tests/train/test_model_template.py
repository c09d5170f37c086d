"""A model is prompted in the template it was trained in: the export records the run's data.template
(final/fastllava.json), and chat and eval read it when --template is not given (both defaulted to vicuna_v1
before, so a model trained in another template, a Qwen model in `qwen`, was prompted in Vicuna's)."""

import json

import pytest

from fastllava import chat
from fastllava.eval import run as eval_run

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
