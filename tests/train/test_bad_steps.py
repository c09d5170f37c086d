"""Faults of a step (issue 23): a NaN in one sample's pixels skips that step and only that step (the run equals
one that never saw the step), `train.max_bad_steps` bad steps in a row stop the run with a checkpoint of the
last good weights, an export refuses non-finite weights, two gloo ranks skip the same step when the NaN is
on one of them, and an out-of-memory step names the pack size, the checkpointing mode and the memory plan.

Run as `torchrun --nproc_per_node=2 test_bad_steps.py OUT` it is the two-rank worker."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny import ToyDataset, tiny_config, tiny_model  # noqa: E402

from fastllava.train import Trainer  # noqa: E402
from fastllava.train.faults import NonFiniteError, sample_names  # noqa: E402

HERE = Path(__file__).parent


class Poisoned(ToyDataset):
    """ToyDataset with one NaN pixel in the first image of each sample in `bad`."""

    def __init__(self, n: int, bad=(), **kw):
        super().__init__(n, **kw)
        self.bad = set(bad)

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        if i in self.bad:
            assert sample["pixel_values"] is not None, f"sample {i} has no image to poison"
            sample["pixel_values"][0, 0, 0, 0] = float("nan")
        return sample


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _params(model) -> dict:
    return {n: _full(p) for n, p in model.named_parameters()}


def _steps_of(trainer) -> list[list[int]]:
    """The sample indices of each optimizer step, all ranks, as the trainer's loader plans them."""
    return [[i for mb in trainer.loader.plan(s).micro_batches for pack in mb for i in pack]
            for s in range(trainer.run_steps)]


def test_nan_sample_skips_only_its_step(tmp_path, capsys):
    """One NaN pixel in sample 7: its step updates nothing, is logged with sample #7 and counted; the run ends
    normally, its export is finite, and every parameter equals that of a clean run that leaves the step out."""
    cfg = tiny_config(tmp_path / "nan", "optim.schedule=constant")
    trainer = Trainer(cfg, tiny_model(), Poisoned(24, bad=[7]))
    bad_step = next(s for s, samples in enumerate(_steps_of(trainer)) if 7 in samples)
    r = trainer.run()

    assert sorted(r.bad_steps) == [bad_step + 1]
    assert "#7" in r.bad_steps[bad_step + 1] and "update skipped" in r.bad_steps[bad_step + 1]
    assert f"non-finite step {bad_step + 1}:" in capsys.readouterr().out
    assert r.summary["bad_steps"] == 1 and r.summary["steps"] == trainer.run_steps == 3
    # No optimizer or scheduler step for the bad one.
    assert trainer.scheduler.last_epoch == trainer.run_steps - 1
    assert all(int(s["step"]) == trainer.run_steps - 1 for s in trainer.optimizer.state.values())
    exported = {k: v for f in sorted(Path(r.export).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert exported and all(torch.isfinite(v).all() for v in exported.values())

    # The reference never sees the bad step's pack (nor a NaN): the same trainer steps, that one left out.
    clean = Trainer(tiny_config(tmp_path / "clean", "optim.schedule=constant"), tiny_model(), Poisoned(24))
    clean.model.train()
    for step, micro_batches in clean.loader:
        if step != bad_step:
            _, _, bad = clean.train_step(step, micro_batches, False)
            assert bad is None
    expected = _params(clean.model)
    for name, value in _params(r.model).items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path):
    """Steps 2 and 3 each hold a NaN sample; train.max_bad_steps=2: the run stops at step 3 with a checkpoint
    holding the weights after step 1 and a message naming the samples."""
    dataset = Poisoned(32)
    cfg = tiny_config(tmp_path / "run", "train.max_bad_steps=2")
    trainer = Trainer(cfg, tiny_model(), dataset)
    steps = _steps_of(trainer)
    assert len(steps) == 4
    poison = [next(i for i in steps[s] if i % dataset.text_every) for s in (1, 2)]  # one with an image
    dataset.bad.update(poison)
    with pytest.raises(NonFiniteError) as err:
        trainer.run()
    message = str(err.value)
    assert "2 optimizer steps in a row" in message and "Stopped at step 3: " in message
    assert f"#{poison[0]}" in message and f"#{poison[1]}" in message
    checkpoint = cfg.checkpoint_dir() / "step_00000003"
    assert str(checkpoint) in message and (checkpoint / "COMPLETE").exists()

    # One clean step is the last good state; a run resumed from the checkpoint starts from exactly that.
    good = Trainer(tiny_config(tmp_path / "good", "train.max_steps=1"), tiny_model(), Poisoned(32))
    expected = _params(good.run().model)
    resumed = Trainer(tiny_config(tmp_path / "resumed", f"checkpoint.resume={checkpoint}"), tiny_model(), Poisoned(32))
    assert resumed.start_step == 3 and resumed.scheduler.last_epoch == 1
    for name, value in _params(resumed.model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_export_refuses_non_finite_weights(tmp_path):
    """A weight made NaN after the last step (as an overflowing update would): finish() names it and
    writes no final/ directory."""
    cfg = tiny_config(tmp_path, "train.max_steps=1")
    trainer = Trainer(cfg, tiny_model(), ToyDataset(16))
    step = trainer.train_step

    def step_then_poison(*args):
        out = step(*args)
        with torch.no_grad():
            trainer.model.projector.linears[0].weight.to_local()[0, 0] = float("nan")
        return out

    trainer.train_step = step_then_poison
    with pytest.raises(NonFiniteError, match=r"not exported: 1 weight tensor\(s\).*projector\.linears\.0\.weight"):
        trainer.run()
    assert not (Path(cfg.train.output_dir) / "final").exists()


def test_out_of_memory_names_pack_checkpointing_and_plan(tmp_path, monkeypatch):
    """torch.OutOfMemoryError in a step is re-raised naming the pack, data.max_tokens_per_pack, the
    checkpointing mode, the settings to try and a memory-plan command that fastllava.plan parses."""
    cfg = tiny_config(tmp_path, "data.max_tokens_per_pack=128", "train.max_steps=1")
    trainer = Trainer(cfg, tiny_model(), ToyDataset(16))

    def forward(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(torch.OutOfMemoryError) as err:
        trainer.run()
    message = str(err.value)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert re.search(r"micro-step 1/\d of step 1 on rank 0: a pack of \d+ tokens and \d image\(s\)", message)
    assert "data.max_tokens_per_pack=128, parallel.activation_checkpointing=none" in message
    assert "Try data.max_tokens_per_pack=64 or parallel.activation_checkpointing=selective" in message
    command = message.split("fits: ")[1].replace("<GPU>", "H100-80G").split()
    assert command[:3] == ["python", "-m", "fastllava.plan"]

    from fastllava import plan

    parsed = []
    monkeypatch.setattr(plan, "_memory", lambda parser, args: parsed.append(args))
    plan.main(command[3:])
    (args,) = parsed
    assert args.memory and args.gpus == 1 and args.stages == ["finetune"] and args.pack_tokens == [64, 128]


def test_samples_are_named_by_id_and_file_entry(tmp_path):
    """A LlavaDataset's samples are named with their id and their entry in the file, which counts the
    entries validation rejected (here entry 1), so the name finds the record a user has to fix."""
    from fastllava.data.dataset import LlavaDataset
    from fastllava.testing import write_llama_tokenizer

    def conv(question, answer):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    entries = [{"id": "first", "conversations": conv("Name a colour.", "Blue.")},
               {"id": "reversed", "conversations": conv("Hi.", "Hello.")[::-1]},
               {"id": "third", "conversations": conv("Name a fruit.", "A pear.")}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    dataset = LlavaDataset(path, None, str(write_llama_tokenizer(tmp_path / "tok")), "vicuna_v1", verbose=False,
                           num_image_tokens=4, cache_dir=None)
    assert len(dataset) == 2
    assert sample_names(dataset, [1, 0]) == f"#1 ({path} entry 2, id 'third'), #0 ({path} entry 0, id 'first')"
    assert sample_names(ToyDataset(9), list(range(9)), limit=3) == "#0, #1, #2 and 6 more"


def test_max_bad_steps_is_checked(tmp_path):
    with pytest.raises(ValueError, match="train.max_bad_steps must be > 0, got 0"):
        tiny_config(tmp_path, "train.max_bad_steps=0")


@pytest.mark.slow
def test_two_ranks_skip_the_same_step(tmp_path):
    """The NaN sample is on rank 1 only: both ranks skip its step (no rank waits in a collective the other
    skipped), rank 0's log names it, and the weights stay finite and equal on both ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    bad_step, micro, poisoned = results[0]["poisoned"]
    for res in results:
        assert sorted(res["bad_steps"]) == [bad_step + 1]
        assert f"rank 1 micro-step {micro + 1} (loss sum nan): samples" in res["bad_steps"][bad_step + 1]
        assert f"#{poisoned}" in res["bad_steps"][bad_step + 1]
        assert all(torch.isfinite(v).all() for v in res["params"].values())
    for name, value in results[0]["params"].items():
        torch.testing.assert_close(results[1]["params"][name], value, rtol=0, atol=0, msg=name)
    assert f"non-finite step {bad_step + 1}:" in proc.stdout


def _worker(out: Path) -> None:
    """Two ranks: poison a sample that rank 1 packs at step 2, train 3 steps, save each rank's view."""
    dataset = Poisoned(24)
    trainer = Trainer(tiny_config(out, "train.max_steps=3"), tiny_model(), dataset)
    micro, poisoned = next((m, i) for m, pack in enumerate(trainer.loader.plan(1).rank(1)) for i in pack
                           if i % dataset.text_every)
    dataset.bad.add(poisoned)
    r = trainer.run()
    torch.save({"poisoned": (1, micro, poisoned), "bad_steps": r.bad_steps, "params": _params(r.model)},
               out / f"rank{trainer.env.rank}.pt")


if __name__ == "__main__":
    from fastllava.train.distributed import destroy_distributed

    try:
        _worker(Path(sys.argv[1]))
    finally:
        destroy_distributed()
