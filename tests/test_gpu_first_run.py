"""``scripts/gpu_first_run.sh`` runs end to end on the fakes, so the script a person first runs on a GPU works.

Every command of the script is a new process; a ``sitecustomize`` module put on their path installs the
TensorRT and cuda-python fakes (tests/fakes) in each, on the same fake GPU, so engines built by one step
load in the next. The script runs from a folder without ``tests/``, which skips its last step (the GPU
tests, run on the fakes by tests/test_trt_on_fakes.py already). What the numbers mean on a real GPU is
docs/gpu-first-run.md's business; here the steps must succeed and the summary must read the reports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = "from tests.fakes import installed\nFAKES = installed()\nFAKES.__enter__()\n"


def test_the_first_run_script_runs_on_the_fakes(tmp_path):
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from tests.models import randomized

    bundle = export_bundle(tmp_path / "bundle", *randomized(tiny()), tiny(), progress=False)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    env = dict(os.environ, RUNS="2", BANDWIDTH_TBS="0.2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path / "site")])
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_first_run.sh"), str(bundle), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for expected in (
        "tensorrt module  10.3.0",
        "1 GPU(s); device 0: {'name': 'Fake Orin'",
        "wrote engines to",
        "ar_step     TensorRT 10.3.0's parser: ok",
        "wrote the engine inspector's layer dumps",
        "CUDA graphs off batch 1: step p50 host",  # per-stage times from the eager runs
        "CUDA graph batch 1: generation p50 device",  # the whole generation as one replayed CUDA graph
        "memory floor at 0.2 TB/s",
    ):
        assert expected in output, expected
    assert " NO" not in output and (tmp_path / "out" / "class-3.png").is_file()
