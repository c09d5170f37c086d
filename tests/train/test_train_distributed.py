"""1 process = 2 processes = 4 processes as HSDP 2 x 2 (gloo, torchrun): same losses, same gradient norms,
same parameters (and exports), for a stage-2 run with gradient accumulation, a LoRA run, a stage-1 run with the frozen LLM
replicated; under HSDP a resume from a checkpoint equals the uninterrupted run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from dist_worker import run_all

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The in-process (world of one) reference, computed once for both comparisons."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # module scope runs before conftest's per-test fixture
        torch.set_num_threads(1)
        try:
            yield run_all(tmp_path_factory.mktemp("one"))
        finally:
            torch.set_num_threads(before)


def _launch(out: Path, nproc: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(HERE / "dist_worker.py"), str(out), *args],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=False)


def _assert_same_run(one: dict, other: dict, name: str) -> None:
    assert sorted(one["losses"]) == sorted(other["losses"]) and one["losses"]
    for step, loss in one["losses"].items():
        assert abs(loss - other["losses"][step]) <= 1e-5 * abs(loss), (name, step)
        # Adam hides a wrong gradient scale in the parameters; the norm does not.
        norm = one["grad_norms"][step]
        assert abs(norm - other["grad_norms"][step]) <= 1e-5 * norm, (name, step)
    assert one["params"].keys() == other["params"].keys()
    for key, value in one["params"].items():
        torch.testing.assert_close(other["params"][key], value, rtol=1e-5, atol=2e-5, msg=f"{name} {key}")


@pytest.mark.slow
def test_one_and_two_processes_agree(tmp_path, one_process):
    two = _launch(tmp_path / "two", 2)
    one = one_process
    for name in ("finetune", "align", "lora"):
        _assert_same_run(one[name], two[name], name)
    # The stage-2 exports, gathered tensor by tensor from the shards of 2 ranks (LoRA: merged), are the
    # 1-process exports.
    from safetensors.torch import load_file
    for name in ("finetune", "lora"):
        exported = [load_file(Path(run[name]["export"]) / "model.safetensors") for run in (one, two)]
        assert exported[0].keys() == exported[1].keys()
        for key, value in exported[0].items():
            torch.testing.assert_close(exported[1][key], value, rtol=1e-5, atol=2e-5, msg=f"{name} {key}")
    assert (Path(two["lora"]["export"]).parent / "adapter" / "adapter_model.safetensors").is_file()
    # The runs did train: parameters moved away from the initialization.
    from train_tiny import tiny_model
    init = dict(tiny_model().named_parameters())
    moved = one["finetune"]["params"]["language_model.layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(moved, init["language_model.layers.0.mlp.up_proj.weight"])
    # Both exports exist: stage 1 the projector file, stage 2 a llava-hf directory.
    assert Path(two["align"]["export"]).name == "projector.safetensors" and Path(two["align"]["export"]).is_file()
    assert (Path(two["finetune"]["export"]) / "config.json").is_file()
    assert Path(two["finetune"]["checkpoint"]).name == "step_00000003"


@pytest.mark.slow
def test_hsdp_two_by_two_agrees_with_one_process_and_resumes(tmp_path, one_process):
    hsdp = _launch(tmp_path / "hsdp", 4, "hsdp")
    for name in ("finetune", "align"):
        # The parameters really were laid out as HSDP: replicated over 2 groups, sharded within each.
        assert hsdp[name]["mesh"] == ((2, 2), ("replicate", "shard"), (Replicate(), Shard(0))), name
        _assert_same_run(one_process[name], hsdp[name], name)
    assert Path(hsdp["finetune"]["checkpoint"]).name == "step_00000002"
    # Step 3 from the HSDP checkpoint of step 2 (DCP save and load on the 2D mesh) = the uninterrupted step 3.
    resumed, full = hsdp["resumed"], hsdp["finetune"]
    assert list(resumed["losses"]) == [3]
    assert resumed["losses"][3] == pytest.approx(full["losses"][3], rel=1e-6, abs=1e-6)
    assert resumed["grad_norms"][3] == pytest.approx(full["grad_norms"][3], rel=1e-6)
    for key, value in full["params"].items():
        torch.testing.assert_close(resumed["params"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    # The full-state exports gather across both mesh dimensions.
    assert (Path(hsdp["resumed"]["export"]) / "config.json").is_file()
    assert Path(hsdp["align"]["export"]).is_file()
