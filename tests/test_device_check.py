"""scripts/device_check.py, the prepared GPU check, smoke-tested where CI can: its torch part on the CPU at the
tiny preset, its CUDA part on the fake GPU (tests/fakes), and its FLOP arithmetic against torch's own count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_runs_on_the_cpu_at_the_tiny_preset(device_check, tmp_path, capsys):
    args = ["--device", "cpu", "--preset", "tiny", "--batches", "1,2", "--dtypes", "fp32", "--runs", "1"]
    assert device_check.main([*args, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device-check.json").read_text())
    results = report["results"]
    assert [r["check"] for r in results] == ["torch tiny fp32 batch 1", "torch tiny fp32 batch 2"]
    assert all(r["ok"] and r["eager_ms_per_image"] > 0 and r["floor_ms"] > 0 for r in results)
    assert results[1]["flops"] > results[0]["flops"] and report["peak"] == {"tflops": 790.0, "tbps": 4.8}
    assert "torch tiny fp32 batch 2" in capsys.readouterr().out


def test_the_cuda_part_passes_on_the_fake_gpu(device_check):
    from tests.fakes import installed

    with installed() as gpu:
        results = device_check.check_cuda()
        assert all(r["ok"] for r in results), results
        assert gpu.cuda.sticky is None
    assert "cudaErrorInvalidValue" in results[-1]["detail"]  # the bad free, reported and survived


def test_the_flop_arithmetic_counts_what_torch_computes(device_check):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imagefolder.core.sampler import default_candidates
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.runtime.backends.torch_backend import TorchBackend
    from imagefolder.runtime.loop import generate

    tokenizer, generator = device_check._models("tiny", "cpu")
    backend = TorchBackend(tokenizer, generator, default_candidates(generator.cfg.codebook_size))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generate(backend, [1, 2], SamplingParams())
    cost = device_check.generation_cost(backend.tokenizer, backend.generator, 2, 4)
    # Linears and attention are the work; resampling matrices, convs and the sampler add about 1 % at tiny.
    assert cost["flops"] == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_the_report_is_written_whatever_fails(device_check, tmp_path, monkeypatch):
    """No torch (an ImportError at the first line of the torch part) and no cuda-python: both parts fail, each is
    an error entry of the report, and the script still writes it and exits 1."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setattr(device_check_cuda(), "_cudart", None)
    assert device_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "device-check.json").read_text())
    assert [(r["check"], r["ok"]) for r in report["results"]] == [("cuda", False), ("torch", False)]
    assert "cuda-python" in report["results"][0]["detail"] and "torch" in report["results"][1]["detail"]
    assert report["environment"]["torch"].startswith("unavailable: ModuleNotFoundError")


def device_check_cuda():
    from imagefolder.core import cuda

    return cuda
