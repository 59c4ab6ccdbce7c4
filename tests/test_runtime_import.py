"""The runtime must run where torch is not installed: importing it never imports torch."""

from __future__ import annotations

import subprocess
import sys

MODULES = (
    "imagefolder.runtime",
    "imagefolder.core.bundle",
    "imagefolder.runtime.loop",
    "imagefolder.runtime.backends.ort",
    "imagefolder.runtime.profiler",
    "imagefolder.core.sampler",
    "imagefolder.core.images",
    "imagefolder.runtime.backends.trt",
    "imagefolder.cli.main",  # the runtime commands start without torch; train/eval load it lazily
    "imagefolder.cli.export",
)


def test_runtime_imports_no_torch():
    code = f"import {', '.join(MODULES)}; import sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
