"""Options are honoured or refused, and bad inputs end in one ``Error:`` line with nothing left behind.

Each case: exit code 1, exactly one ``Error:`` line naming the option or file at fault and what would work,
no traceback, and no output file (or temporary file) left in the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imagefolder.cli.export import main as export_main
from imagefolder.cli.main import main
from imagefolder.core.gpu_stack import gpu_extra
from imagefolder.install import install_command
from tests.test_cli_errors import _ok, _refused, workspace  # noqa: F401 - the fixture


def _nothing_written(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before, sorted({p.name for p in folder.iterdir()} - before)


def test_official_sampling_with_a_bundle_is_refused(workspace, tmp_path):  # noqa: F811
    args = ["generate", "--sampling", "official", "--bundle", workspace["bundle"], "-o", tmp_path / "out.png"]
    line = _refused(main, args, "--sampling official", "--bundle")
    assert "drop --bundle" in line
    _nothing_written(tmp_path, set())


@pytest.fixture(scope="module")
def few_candidates(workspace) -> Path:  # noqa: F811
    """A bundle whose sampler ranks 64 of the 256 codes."""
    out = workspace["root"] / "bundle-64"
    _ok(export_main, ["onnx", "--checkpoint", workspace["checkpoint"], "--out", out, "--candidates", 64])
    return out


@pytest.mark.parametrize("command", ["generate", "profile"])
def test_a_top_k_above_the_candidates_is_refused(few_candidates, tmp_path, command):
    out = ["-o", tmp_path / "out.png"] if command == "generate" else ["--json", tmp_path / "p.json"]
    args = [command, "--bundle", few_candidates, "--backend", "ort", "--top-k", 100, *out]
    line = _refused(main, args, "--top-k 100", "64 candidates", "--top-k 64 or less", "--candidates 100")
    assert "256 codes" in line
    _nothing_written(tmp_path, set())


def test_a_top_k_within_the_candidates_runs(few_candidates, tmp_path):
    _ok(main, ["generate", "--bundle", few_candidates, "--backend", "ort", "--top-k", 64, "-o", tmp_path / "o.png"])
    assert (tmp_path / "o.png").is_file()


def test_a_missing_provider_says_what_installs_it(workspace, tmp_path):  # noqa: F811
    args = ["generate", "--bundle", workspace["bundle"], "--backend", "ort", "--providers", "cuda"]
    line = _refused(main, [*args, "-o", tmp_path / "o.png"], "--providers", "CUDAExecutionProvider")
    assert "onnxruntime-gpu" in line and install_command(gpu_extra()) in line
    _nothing_written(tmp_path, set())


def test_an_unwritable_safetensors_destination_is_one_error_line(workspace):  # noqa: F811
    """/proc takes no new files: the safetensors writer's own error type (not an OSError) becomes the line."""
    _refused(main, ["convert", workspace["official"], "/proc/imagefolder-test.safetensors"], "cannot write")


def test_a_manifest_with_more_classes_than_the_graph_is_refused(workspace, tmp_path):  # noqa: F811
    bundle = shutil.copytree(workspace["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["generator"]["num_classes"] = 20
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    line = _refused(main, ["generate", "--bundle", bundle, "--backend", "ort", "--class", 15, "-o", tmp_path / "o.png"])
    assert "20 classes" in line and "11 rows" in line and "re-export" in line
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_an_absurd_profile_batch_is_refused_before_anything_is_allocated(workspace, tmp_path, backend):  # noqa: F811
    args = ["profile", "--bundle", workspace["bundle"], "--backend", backend, "--batch", "1,1000000000"]
    _refused(main, [*args, "--json", tmp_path / "p.json"], "1000000000", "outside [1, ")
    _nothing_written(tmp_path, set())


def test_generate_writes_neither_output_when_one_cannot_be_written(workspace, tmp_path):  # noqa: F811
    (tmp_path / "a-file").write_text("not a folder")
    args = ["generate", "--bundle", workspace["bundle"], "--backend", "ort", "-o", tmp_path / "out.png"]
    _refused(main, [*args, "--indices", tmp_path / "a-file" / "idx.npy"], "a-file")
    _nothing_written(tmp_path, {"a-file"})


def test_generate_writes_both_outputs_when_both_can_be_written(workspace, tmp_path):  # noqa: F811
    args = ["generate", "--bundle", workspace["bundle"], "--backend", "ort", "--class", "1,2"]
    _ok(main, [*args, "-o", tmp_path / "out.png", "--indices", tmp_path / "new" / "idx.npy"])
    assert (tmp_path / "out.png").stat().st_size > 0 and (tmp_path / "new" / "idx.npy").stat().st_size > 0
    _nothing_written(tmp_path, {"out.png", "new"})
