"""Optional packages (fastllava/extras.py): a feature asked for without its package stops with one line that
names the feature and the extra to install, exit status 2 and no traceback. Each command line runs in a
subprocess with the package made unimportable (sys.modules[name] = None, what Python does for a package
that is not installed), whether or not it is installed here; the table of extras agrees with pyproject.toml."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fastllava import extras
from fastllava.extras import MissingExtra, require

ROOT = Path(__file__).resolve().parents[1]


def missing_line(feature: str, package: str, command: str) -> str:
    return f"error: {feature} needs the {package} package, which is not installed: {command}"


def run_without(blocked: list[str], target: str, *args: str, cwd: Path, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    """`python -m target args` (or `python target args` for a .py path) with the `blocked` modules unimportable
    (`env`: variables added to this process's environment)."""
    run = (f"runpy.run_path({target!r}, run_name='__main__')" if target.endswith(".py")
           else f"runpy.run_module({target!r}, run_name='__main__', alter_sys=True)")
    code = (f"import runpy, sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            f"sys.argv = [{target!r}, *{list(args)!r}]\n{run}\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def assert_stops_with(proc: subprocess.CompletedProcess, line: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [line], proc.stderr
    assert proc.returncode == 2, proc.stderr


# ----------------------------------------------------------------------------- the command lines


def test_datagen_without_openai_stops_before_any_work(tmp_path):
    """--kind detail writes brief samples before its first request: the check comes before them."""
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text(json.dumps({"image": "a.jpg", "captions": ["A cat on a mat."], "boxes": []}) + "\n")
    out = tmp_path / "out" / "detail.jsonl"
    proc = run_without(["openai"], "fastllava.datagen", "--annotations", str(annotations), "--kind", "detail",
                       "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out), cwd=tmp_path)
    assert_stops_with(proc, missing_line("python -m fastllava.datagen", "openai", 'pip install "fastllava[datagen]"'))
    assert not (tmp_path / "out").exists()


def test_datagen_demo_without_openai_stops_before_drawing(tmp_path):
    proc = run_without(["openai"], "fastllava.datagen.demo", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert_stops_with(proc, missing_line("python -m fastllava.datagen", "openai", 'pip install "fastllava[datagen]"'))
    assert not (tmp_path / "demo").exists()


RECIPE_CASES = [  # override, module made unimportable, pip package, install command
    ("logging.tensorboard=true", "tensorboard", "tensorboard", 'pip install "fastllava[logging]"'),
    ("logging.wandb=true", "wandb", "wandb", 'pip install "fastllava[logging]"'),
    ("model.backends.attention=flash_attn", "flash_attn", "flash-attn",
     'pip install --no-build-isolation "fastllava[flash-attn]"'),
    ("model.backends.attention=xformers", "xformers", "xformers", 'pip install "fastllava[xformers]"'),
]


@pytest.mark.parametrize("override, blocked, package, command", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_asking_for_a_missing_package_stops_at_configuration(tmp_path, override, blocked, package, command):
    """Checked with the configuration, before anything is built: the data file need not even exist."""
    config = tmp_path / "run.yaml"
    config.write_text("model: {source: scratch, architecture: {}}\n"
                      "data: {data_path: missing.json}\n"
                      "train: {stage: finetune}\n")
    proc = run_without([blocked], str(ROOT / "recipes" / "finetune.py"), "--config", str(config), override,
                       cwd=tmp_path)
    assert_stops_with(proc, missing_line(override, package, command))


def test_scienceqa_demo_asking_for_a_missing_package_stops_before_training(tmp_path):
    """The ScienceQA demo builds its configuration itself, after its release, conversion and components
    (whose progress lines come first): the same check runs there, before any model is built."""
    out = tmp_path / "run"
    proc = run_without(["wandb"], "fastllava.demo.scienceqa", "--out", str(out), "--train", "8", "--test", "4",
                       "--steps", "1", "--no-progress", "demo.samples=16", "demo.eval_samples=1",
                       "demo.tower_steps=1", "demo.tower_batch=8", "logging.wandb=true", cwd=tmp_path,
                       env={"FASTLLAVA_CACHE": str(tmp_path / "cache")})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == missing_line("logging.wandb=true", "wandb",
                                                                'pip install "fastllava[logging]"')
    assert proc.returncode == 2, proc.stderr
    assert not (out / "train").exists()


# ----------------------------------------------------------------------------- the features without a command


def test_end_of_run_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    """The plot is a by-product of every run: without matplotlib the run ends normally and says so."""
    from fastllava.train.metrics import Meter, StepRecord

    meter = Meter(total_steps=1, start_step=0, world_size=1, peak_tflops=None, show_progress=False)
    meter.update(StepRecord(1, 2.0, 1e-3, 1.0, 10, 1, 1.0, 0.1), log=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert meter.plot(tmp_path / "run.png") == 'no plot: matplotlib is not installed (pip install "fastllava[plot]")'
    assert not (tmp_path / "run.png").exists()


def test_dali_backend_without_dali_says_what_to_install(tmp_path, monkeypatch):
    """backend="dali" is asked for explicitly (from Python; "auto" falls back to Pillow, as documented)."""
    from fastllava.data import images

    monkeypatch.setattr(images, "HAS_DALI", False)
    monkeypatch.setattr(images, "_DALI_ERROR", ModuleNotFoundError("No module named 'nvidia'", name="nvidia"))
    with pytest.raises(MissingExtra) as e:
        images.load_image(tmp_path / "a.png", backend="dali")
    assert f"error: {e.value}" == missing_line("image backend 'dali'", "nvidia-dali-cuda120",
                                                         'pip install "fastllava[dali]"')


# ----------------------------------------------------------------------------- the module itself


def test_a_package_that_fails_to_import_says_why(tmp_path, monkeypatch):
    """Installed but broken (a CUDA library missing, a version clash): the message keeps the import's reason."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    with pytest.raises(MissingExtra, match=re.escape(
            "attention needs the flash-attn package, which fails to import (libcudart.so.12: cannot open shared "
            'object file): pip install --no-build-isolation "fastllava[flash-attn]"')):
        require("flash_attn", "attention")


def test_submodules_find_their_package_and_unknown_modules_are_refused(monkeypatch):
    # An earlier test may have imported the submodule: import_module would then hand it back from
    # sys.modules without looking at its blocked parent.
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=re.escape('pip install "fastllava[plot]"')):
        require("matplotlib.backends.backend_agg", "the plot")
    with pytest.raises(KeyError, match="not an optional package of fastllava"):
        extras.install_command("no_such_package_here")


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_extra_in_the_table_is_in_pyproject_and_back():
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (package, extra) in extras.EXTRAS.items():
        assert extra in optional, f"{module}: extra {extra!r} is not in pyproject.toml"
        assert package in {_requirement_name(r) for r in optional[extra]}, f"{module}: {package} not in [{extra}]"
    assert set(optional) - {"test"} == {extra for _, extra in extras.EXTRAS.values()}
