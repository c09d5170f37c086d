"""benchmarks/e2e.py runs at the tiny shape on CPU and reports honestly: both paths train the same samples,
the reference computes exactly the padding of LLaVA's batching and we none, no MFU or GPU memory where they
mean nothing."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fastllava import PackedBatch
from fastllava.data.reference_sampler import reference_batches

E2E = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e", E2E)
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_tiny_shape_both_stages(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    report = e2e.main(["--steps", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["device"] == "cpu" and report["shape"]["name"] == "tiny" and report["reference_attention"] == "sdpa"
    shape = e2e.make_shape("tiny", None)
    cfg = shape.config
    for stage in ("align", "finetune"):
        ref, ours = report["stages"][stage]["reference"], report["stages"][stage]["fastllava"]
        # The samples main() timed (seed 1, one step), measured here by packing each alone.
        samples = e2e.shape_samples(shape, stage, shape.global_batch, seed=1)
        lengths = np.array([PackedBatch.from_samples([s], image_token_id=cfg.image_token_id,
                                                     num_image_tokens=cfg.num_image_tokens).num_tokens
                            for s in samples])
        has_image = np.array([s["pixel_values"] is not None for s in samples])
        assert ref["real_tokens"] == ours["real_tokens"] == lengths.sum()
        assert ours["computed_tokens"] == lengths.sum()  # packs carry no padding
        batches = reference_batches(lengths, has_image, batch_size=16)
        assert ref["computed_tokens"] == sum(len(b) * lengths[b].max() for b in batches) > lengths.sum()
        assert ref["steps"] == ours["steps"] == 1
        assert ref["mfu"] is None and ours["peak_memory_gb"] is None
    printed = capsys.readouterr().out
    assert "| finetune | speedup |" in printed and "MFU and memory are not applicable" in printed
