"""The documentation test: every shell command in README.md and docs/*.md runs as written.

Every fenced ```bash block of README.md and docs/*.md is read (a new document or block is picked up by
itself) and split into commands: one per line, a trailing backslash continues it, ``#`` starts a comment.
Each document runs in its own temporary folder, its commands in order, as a newcomer runs them after
``git clone``: with this checkout's virtual environment first on the PATH, and links to the checkout's
``Makefile``, ``pyproject.toml``, ``.venv``, ``docs/``, ``scripts/`` and ``bench/``. Three files stand in
for what a user brings:

- ``bundle/``: the default model's bundle (exported once per test process and copied, so the commands
  that use a bundle before exporting one have it; the export commands still run and replace it);
- ``ar-ckpt-last.pth``: the official release's layout and class count (1000) at the default model's size,
  random generator weights (the 5.5 GB release cannot be downloaded here);
- ``photo.png``: a picture.

Every command must exit 0, unless a comment on it carries one of these markers (visible to readers; a
comment on a line of its own marks every command after it in its block):

- ``# needs a GPU``: the command needs an NVIDIA GPU and TensorRT. An ``imagefolder`` command marked so on
  its own line still runs where they are missing, and must fail with exactly one line, ``Error: ...``,
  naming TensorRT, cuda-python, CUDA or the GPU (where they are present it must succeed); other commands
  (a container, a script for the GPU) and whole marked blocks are not run, and the test checks that this
  machine has no GPU stack.
- ``# needs a Jetson``: set-up of JetPack's system (apt, nvpmodel, JetPack's Python): not run; the test
  checks that this machine is not a Jetson (where it would be).
- ``# not run by the doc test: <why>``: not run (the suite itself, a 20-minute benchmark, a command that
  replaces a file of the checkout); the reason must be given, and ``test_unrun_commands_are_few`` keeps
  the list short and printed.
- ``# the doc test adds <options>``: run with these options appended (click keeps the last value of an
  option), e.g. ``--steps 2`` for a training command that takes an hour as written.

An export repeated with the same options and checkpoint (README and docs/jetson.md export the official
checkpoint in fp16 three times, to different folders) runs once per test process; the repeats copy its bundle
to their ``--out``. ``pip install`` commands are run from the checkout (where ``.`` is) with ``--dry-run --no-
deps`` into a throwaway virtual environment: the requirement must exist and build its metadata, with every
extra named (tests/test_extras.py resolves the extras' dependencies in full). After ``make demo``, the two
lines it prints last (how to put the CLI on the PATH, one command to try) are run too, from a shell whose PATH
does not have the virtual environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagefolder.core.gpu_stack import is_jetson

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # a new document is read by itself
LINKED = ("Makefile", "pyproject.toml", ".venv", "docs", "scripts", "bench", "README.md")
GPU, JETSON, NOT_RUN, ADDS = "needs a GPU", "needs a Jetson", "not run by the doc test:", "the doc test adds "
GPU_ERROR = re.compile(r"TensorRT|cuda-python|CUDA|GPU", re.I)
MAX_UNRUN = 12
NOT_HERE = ("jetson", "not run", "gpu elsewhere")


@dataclasses.dataclass(frozen=True)
class Command:
    document: str
    line: int
    text: str  # the command, comment removed
    comment: str

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    block_note: str = ""  # the comment lines above it in its block

    @property
    def kind(self) -> str:
        """run, pip (dry run), gpu (expect the one-line error), or not run: gpu elsewhere, jetson, not run."""
        notes = f"{self.comment} {self.block_note}"
        if NOT_RUN in notes:
            return "not run"
        if JETSON in notes:
            return "jetson"
        if GPU in self.block_note or (GPU in self.comment and not self.is_ours):
            return "gpu elsewhere"
        if GPU in self.comment:
            return "gpu"
        return "pip" if self.text.startswith("pip install ") else "run"

    @property
    def is_ours(self) -> bool:
        return self.text.split()[0] in ("imagefolder", "imagefolder-export")


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of a shell line: ``#`` at the start of a word, outside quotes, starts the comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def commands(document: Path, root: Path = ROOT) -> list[Command]:
    """The commands of every ```bash block of ``document``, in order."""
    found: list[Command] = []
    lines = document.read_text(encoding="utf-8").splitlines()
    inside, pending, start, note = False, "", 0, ""
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            inside, note = line.strip() == "```bash" if not inside else False, ""
            continue
        if not inside:
            continue
        text, comment = split_comment(line)
        if not text and not pending:  # a comment line: its markers hold for the rest of the block
            note = f"{note} {comment}".strip()
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        whole = (pending + text).strip()
        pending = ""
        if whole:
            found.append(Command(document.relative_to(root).as_posix(), start, whole, comment, note))
    return found


ALL = [command for document in DOCUMENTS for command in commands(document)]
WITH_COMMANDS = list(dict.fromkeys(command.document for command in ALL))


# -- the stand-ins --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> Path:
    """bundle/ (the default model), ar-ckpt-last.pth (official layout, 1000 classes) and photo.png, made once."""
    import torch

    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.models.generator import Generator
    from tests.official_files import write_official_ar_checkpoint

    folder = tmp_path_factory.mktemp("stand-ins")
    config, tokenizer, generator, source = load_default_or_checkpoint()
    export_bundle(folder / "bundle", tokenizer, generator, config, source=source, progress=False)
    official = dataclasses.replace(config, generator=dataclasses.replace(config.generator, num_classes=1000))
    torch.manual_seed(0)
    write_official_ar_checkpoint(folder / "ar-ckpt-last.pth", official, Generator(official.generator), tokenizer)
    x = torch.linspace(0, 255, 96)
    picture = torch.stack([x[:, None].expand(96, 96), x[None, :].expand(96, 96), 255 - x[:, None].expand(96, 96)])
    Image.fromarray(picture.permute(1, 2, 0).to(torch.uint8).numpy()).save(folder / "photo.png")
    return folder


def workspace(stand_ins: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    for name in LINKED:
        if (ROOT / name).exists():
            (folder / name).symlink_to(ROOT / name)
    shutil.copytree(stand_ins / "bundle", folder / "bundle")
    for name in ("ar-ckpt-last.pth", "photo.png"):
        shutil.copy(stand_ins / name, folder / name)
    return folder


def environment(home: Path, with_venv: bool = True) -> dict[str, str]:
    path = os.environ.get("PATH", "").split(os.pathsep)
    path = [p for p in path if p and Path(p) != SCRIPTS]
    # a newcomer's shell: no virtual environment active, and not inside `make test` (whose MAKEFLAGS and
    # MAKELEVEL would make `make demo` print "Entering directory" lines around its output)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    }
    env.update(HOME=str(home), PATH=os.pathsep.join([str(SCRIPTS)] * with_venv + path), NO_COLOR="1")
    return env


def gpu_stack_present() -> bool:
    from tests.gpu_probe import skip_reason

    return skip_reason() is None


def shell(text: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# -- the tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("document", WITH_COMMANDS)
def test_every_command_of_the_document_runs_as_written(document, stand_ins, tmp_path):
    if any(c.text.startswith("make ") for c in ALL if c.document == document and c.kind not in NOT_HERE):
        stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT, capture_output=True, check=False)
        assert stale.returncode == 0, "pyproject.toml or the Makefile changed since the last set-up: run make setup"
    here = workspace(stand_ins, tmp_path)
    env = environment(tmp_path)
    runnable = [c for c in ALL if c.document == document and c.kind not in NOT_HERE]
    with ThreadPoolExecutor(4) as pool:  # the pip dry runs wait on the registry: all of them at once
        throwaway = _throwaway_venv(tmp_path)
        dry_runs = {c: pool.submit(_pip_dry_run, _as_run(c), throwaway, env) for c in runnable if c.kind == "pip"}
        for command in runnable:
            result = dry_runs[command].result() if command in dry_runs else _run(command, here, env, stand_ins)
            context = f"{command.where}: {command.text}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            if command.kind == "gpu" and not gpu_stack_present():
                errors = result.stderr.strip().splitlines()
                assert result.returncode != 0, context
                assert len(errors) == 1 and errors[0].startswith("Error: ") and GPU_ERROR.search(errors[0]), context
                continue
            assert result.returncode == 0, context
            if command.text == "make demo":
                _run_the_next_steps_it_printed(result.stdout, here, tmp_path, context)


def _as_run(command: Command) -> str:
    """The command's text, with the options a ``# the doc test adds ...`` marker appends."""
    if ADDS not in command.comment:
        return command.text
    return f"{command.text} {command.comment.split(ADDS, 1)[1].strip()}"


def _run(command: Command, here: Path, env: dict[str, str], stand_ins: Path) -> subprocess.CompletedProcess:
    """Run a command in ``here``. An export identical to one run before in this process (same options but
    ``--out``, same checkpoint) is not repeated: its bundle is copied to ``--out``, as the export would write it."""
    words = shlex.split(command.text)
    if words[:2] != ["imagefolder-export", "onnx"] or "--out" not in words:
        return shell(_as_run(command), here, env)
    out = words[words.index("--out") + 1]
    key = " ".join(words[: words.index("--out")] + words[words.index("--out") + 2 :])
    cached = stand_ins / "exports" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if cached.is_dir():
        shutil.rmtree(here / out, ignore_errors=True)
        shutil.copytree(cached, here / out)
        return subprocess.CompletedProcess(command.text, 0, f"copied the export of {key}", "")
    result = shell(_as_run(command), here, env)
    if result.returncode == 0:
        shutil.copytree(here / out, cached)
    return result


def _throwaway_venv(tmp_path: Path) -> Path:
    folder = tmp_path / "throwaway-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return folder


def _pip_dry_run(text: str, throwaway: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    arguments = shlex.split(text)[2:]
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(throwaway / "bin" / "python"), "install", "--dry-run"]
        + ["--no-deps", "--quiet", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _run_the_next_steps_it_printed(stdout: str, here: Path, tmp_path: Path, context: str) -> None:
    last = stdout.strip().splitlines()[-2:]
    assert [line.split(":", 1)[0] for line in last] == ["next", "then"], context
    path_line, try_line = (line.split(":", 1)[1].strip() for line in last)
    assert path_line.startswith("source ") and try_line.startswith("imagefolder generate "), last
    without_venv = environment(tmp_path, with_venv=False)
    result = shell(f"{path_line} && {try_line}", here, without_venv)
    assert result.returncode == 0, (last, result.stderr)
    image = Image.open(here / "out.png")
    assert len(np.unique(np.asarray(image.convert("L")))) > 10  # a picture, not a flat image


def test_marked_commands_cannot_run_here():
    """Commands marked for a GPU or a Jetson name a machine this is not (else they would have to run)."""
    jetson = [c.where for c in ALL if c.kind == "jetson"]
    assert jetson and not is_jetson(), jetson
    elsewhere = [c.where for c in ALL if c.kind == "gpu elsewhere"]
    assert not elsewhere or not gpu_stack_present(), elsewhere


def test_unrun_commands_are_few_and_say_why(capsys):
    unrun = [c for c in ALL if c.kind == "not run"]
    for command in unrun:
        why = f"{command.comment} {command.block_note}".split(NOT_RUN, 1)[1].strip()
        assert why, f"{command.where}: say why it is not run"
    with capsys.disabled():
        print("\nnot run by the doc test:", *(f"  {c.where}: {c.text}" for c in unrun), sep="\n")
    assert len(unrun) <= MAX_UNRUN, [c.where for c in unrun]


def test_the_markers_are_spelled_right():
    """A misspelt marker would make a command run (and fail) or, worse, be taken for another kind."""
    near = {
        GPU: r"needs?\s+(an?\s+)?gpu",
        JETSON: r"needs?\s+(an?\s+)?jetson",
        NOT_RUN: r"not\s+run\s+by",
        ADDS: r"test\s+adds",
    }
    for command in ALL:
        for note in (command.comment, command.block_note):
            for marker, pattern in near.items():
                if re.search(pattern, note, re.I):
                    assert marker in note, f"{command.where}: write the marker as {marker!r}"


def test_the_parser_reads_comments_quotes_and_continuations(tmp_path):
    document = tmp_path / "README.md"
    document.write_text(
        "text\n```bash\npython -c \"print('#not a comment')\"   # a comment\nimagefolder profile --batch 1 \\\n"
        "    --runs 2   # needs a GPU\n```\n```python\nnot = 'shell'\n```\n"
        "```bash\n# needs a GPU: in a container\ndocker run --gpus all image\n```\n",
        encoding="utf-8",
    )
    found = [(c.text, c.comment, c.kind) for c in commands(document, tmp_path)]
    assert found == [
        ("python -c \"print('#not a comment')\"", "a comment", "run"),
        ("imagefolder profile --batch 1 --runs 2", "needs a GPU", "gpu"),
        ("docker run --gpus all image", "", "gpu elsewhere"),
    ]
