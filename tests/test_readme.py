"""The README's first example runs as written, on the default model, in a fresh folder."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
SCRIPTS = Path(sys.executable).parent


def _example(index: int) -> list[list[str]]:
    """The commands of the README's ``index``-th bash block, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for line in blocks[index].splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_first_example_runs_as_written(tmp_path):
    commands = _example(1)  # block 0 is `make demo` / `make test`
    assert [c[0] for c in commands] == ["imagefolder-export", "imagefolder", "imagefolder"]
    for command in commands:
        result = subprocess.run(
            [str(SCRIPTS / command[0]), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (command, result.stderr)
    image = np.asarray(Image.open(tmp_path / "out.png"))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 5  # a picture, not a blank
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report and json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_generated_outputs_are_ignored_by_git():
    ignored = (README.parent / ".gitignore").read_text().splitlines()
    for output in ("/bundle/", "/out.png", "/profile.json", "/trace.json", "/d17/", "demo-out/"):
        assert output in ignored, output
