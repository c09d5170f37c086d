"""1 process = 2 processes (gloo, torchrun): same losses, same parameters, for a stage-2 run with
gradient accumulation and a stage-1 run with the frozen LLM replicated."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from dist_worker import run_all

HERE = Path(__file__).parent


def test_one_and_two_processes_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "dist_worker.py"), str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "results.pt", weights_only=False)
    one = run_all(tmp_path / "one")
    for name in ("finetune", "align"):
        assert sorted(one[name]["losses"]) == sorted(two[name]["losses"]) and one[name]["losses"]
        for step, loss in one[name]["losses"].items():
            assert abs(loss - two[name]["losses"][step]) <= 1e-5 * abs(loss), (name, step)
            # Adam hides a wrong gradient scale in the parameters; the norm does not.
            norm = one[name]["grad_norms"][step]
            assert abs(norm - two[name]["grad_norms"][step]) <= 1e-5 * norm, (name, step)
        assert one[name]["params"].keys() == two[name]["params"].keys()
        for key, value in one[name]["params"].items():
            torch.testing.assert_close(two[name]["params"][key], value, rtol=1e-5, atol=2e-5, msg=f"{name} {key}")
    # The runs did train: parameters moved away from the initialization.
    from train_tiny import tiny_model
    init = dict(tiny_model().named_parameters())
    moved = one["finetune"]["params"]["language_model.layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(moved, init["language_model.layers.0.mlp.up_proj.weight"])
    # Both exports exist: stage 1 the projector file, stage 2 a llava-hf directory.
    assert Path(two["align"]["export"]).name == "projector.safetensors" and Path(two["align"]["export"]).is_file()
    assert (Path(two["finetune"]["export"]) / "config.json").is_file()
    assert Path(two["finetune"]["checkpoint"]).name == "step_00000003"
