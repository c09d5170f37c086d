"""benchmarks/e2e.py runs at the tiny shape on CPU and reports honestly: the same real tokens on both
paths, padding only on the reference's side, no MFU or GPU memory where they mean nothing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
    assert report["device"] == "cpu" and report["shape"]["name"] == "tiny"
    for stage in ("align", "finetune"):
        ref, ours = report["stages"][stage]["reference"], report["stages"][stage]["fastllava"]
        assert ref["real_tokens"] == ours["real_tokens"] > 0
        assert ours["computed_tokens"] == ours["real_tokens"]  # packs carry no padding
        assert ref["computed_tokens"] >= ref["real_tokens"]
        assert ref["mfu"] is None and ours["peak_memory_gb"] is None
        assert report["stages"][stage]["speedup"] == pytest.approx(ours["real_tokens_per_s"] / ref["real_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "| finetune | speedup |" in printed and "MFU and memory are not applicable" in printed
