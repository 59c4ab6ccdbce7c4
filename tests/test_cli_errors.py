"""Bad input through the command line, one test per kind: a clear one-line error, and nothing lost.

Each refusal must be: exit code 1, exactly one ``Error:`` line naming the culprit (the path, the
value, the field), no traceback, no output file left behind, and a previous good output intact.
Images and checkpoints have their own files (``test_images.py``, ``test_cli_refusals.py``). The
interrupt tests run the installed console scripts in a subprocess and send a real SIGINT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imagefolder.checkpoints import save_checkpoint
from imagefolder.cli.export import main as export_main
from imagefolder.cli.main import main
from imagefolder.configs import tiny
from imagefolder.core.bundle import load_bundle
from imagefolder.io import folder_lock
from tests.models import randomized
from tests.official_files import write_official_ar_checkpoint

SCRIPTS = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors")
    tokenizer, generator = randomized(tiny(), seed=5)
    checkpoint = save_checkpoint(root / "model.safetensors", tiny(), tokenizer.state_dict(), generator.state_dict())
    official = write_official_ar_checkpoint(root / "ar-ckpt-last.pth", tiny(), generator, tokenizer)
    _ok(export_main, ["onnx", "--checkpoint", checkpoint, "--out", root / "bundle", "--batch-max", 4])
    return {"root": root, "checkpoint": checkpoint, "official": official, "bundle": root / "bundle"}


def _ok(command, args: list) -> str:
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _refused(command, args: list, *culprits: str) -> str:
    """Run a command that must be refused with one ``Error:`` line naming every culprit; returns that line."""
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for culprit in culprits:
        assert culprit in errors[0], errors[0]
    return errors[0]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- outputs that cannot be written ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["-o", "--indices", "--json", "convert", "export"])
def test_unwritable_output_paths_are_one_line_errors(workspace, tmp_path, target):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder")
    inside = blocker / "out.safetensors"  # a name every command accepts (convert wants the suffix)
    bundle = ["--bundle", workspace["bundle"], "--backend", "ort"]
    commands = {
        "-o": (main, ["generate", *bundle, "-o", inside]),
        "--indices": (main, ["generate", *bundle, "-o", tmp_path / "ok.png", "--indices", inside]),
        "--json": (main, ["profile", *bundle, "--runs", 1, "--warmup", 0, "--json", inside]),
        "convert": (main, ["convert", workspace["official"], inside]),
        "export": (export_main, ["onnx", "--checkpoint", workspace["checkpoint"], "--out", inside]),
    }
    command, args = commands[target]
    line = _refused(command, args, str(blocker))
    assert "not a folder" in line
    assert blocker.read_text() == "I am a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ok.png") == ["a-file"]


# -- values out of range, refused identically on every path -----------------------------------------------------


@pytest.mark.parametrize("path", ["ort", "torch", "official"])
@pytest.mark.parametrize(
    "option, value, culprit",
    [
        ("--cfg", "inf", "cfg"),
        ("--cfg", "nan", "cfg"),
        ("--cfg", "-1", "cfg"),
        ("--top-k", "0", "top_k"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p"),
        ("--seed", "-5", "seed"),
        ("--seed", str(2**63), "seed"),
        ("--class", str(2**70), str(2**70)),
        ("--class", "10", "[10]"),
    ],
)
def test_sampling_values_are_checked_on_every_path(workspace, tmp_path, path, option, value, culprit):
    out = tmp_path / "out.png"
    out.write_bytes(b"previous")
    where = {
        "ort": ["--bundle", workspace["bundle"], "--backend", "ort"],
        "torch": ["--checkpoint", workspace["checkpoint"], "--backend", "torch"],
        "official": ["--checkpoint", workspace["checkpoint"], "--sampling", "official"],
    }[path]
    _refused(main, ["generate", *where, f"{option}={value}", "-o", out], culprit)
    assert out.read_bytes() == b"previous"


# -- bundles that are damaged or edited -------------------------------------------------------------------------


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, culprit",
    [
        (lambda m: m.update(batch_max="8"), "manifest.batch_max must be int"),
        (lambda m: m["graphs"]["fold"].update(inputs="tokens"), "manifest.graphs.fold.inputs must be a list"),
        (lambda m: m["files"]["decoder.onnx"].update(bytes=None), "manifest.files.decoder.onnx.bytes must be int"),
        (lambda m: m["model"]["generator"].update(scales=[1, "2"]), "manifest.model.generator.scales[1]"),
        (lambda m: m.update(graphs=[]), "manifest.graphs must be an object"),
    ],
    ids=["string-for-int", "string-for-list", "null-size", "bad-scale", "list-for-object"],
)
def test_manifest_fields_of_the_wrong_type_are_named(workspace, tmp_path, edit, culprit):
    bundle = shutil.copytree(workspace["bundle"], tmp_path / "bundle")
    _edit_manifest(bundle, edit)
    _refused(main, ["generate", "--bundle", bundle, "--backend", "ort", "-o", tmp_path / "out.png"], culprit)
    assert not (tmp_path / "out.png").exists()


def test_external_weights_outside_the_bundle_are_refused(workspace, tmp_path):
    """A graph that reads weights from beside the bundle is refused, listed or not."""
    import onnx
    from onnx import numpy_helper

    bundle = shutil.copytree(workspace["bundle"], tmp_path / "bundle")
    secret = tmp_path / "secret.bin"
    path = bundle / "fold.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    numpy_helper.to_array(weight).tofile(secret)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, str(path))
    digest = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    _edit_manifest(bundle, lambda m: m["files"].update({"fold.onnx": digest}))
    args = ["generate", "--bundle", bundle, "--backend", "ort", "-o", tmp_path / "out.png"]
    _refused(main, args, "fold.onnx", "../secret.bin")  # not listed in the manifest
    _edit_manifest(
        bundle,
        lambda m: (
            m["graphs"]["fold"].update(external_data=["../secret.bin"]),
            m["files"].update({"../secret.bin": {"sha256": "0" * 64, "bytes": 1}}),
        ),
    )
    _refused(main, args, "outside the bundle")  # listed, but outside
    assert not (tmp_path / "out.png").exists()


# -- exports: never a mixture, never a lost bundle ---------------------------------------------------------------


def test_export_into_a_folder_another_writer_holds_is_refused(workspace, tmp_path):
    bundle = shutil.copytree(workspace["bundle"], tmp_path / "bundle")
    before = _digest(bundle)
    with folder_lock(bundle):
        _refused(
            export_main,
            ["onnx", "--checkpoint", workspace["checkpoint"], "--out", bundle],
            str(bundle),
            "another process",
        )
    assert _digest(bundle) == before


def test_export_refuses_to_replace_a_folder_that_is_not_a_bundle(workspace, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    _refused(
        export_main, ["onnx", "--checkpoint", workspace["checkpoint"], "--out", folder], str(folder), "not a bundle"
    )
    assert (folder / "holiday.jpg").read_bytes() == b"precious"


def _export_process(checkpoint: Path, out: Path) -> subprocess.Popen:
    command = [SCRIPTS / "imagefolder-export", "onnx", "--checkpoint", checkpoint, "--out", out]
    return subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_exports_into_one_folder_never_mix(workspace, tmp_path):
    """Two models exported at once into one folder: one model's complete bundle (or a clean refusal)."""
    checkpoints = []
    for seed in (11, 12):
        tokenizer, generator = randomized(tiny(), seed=seed)
        checkpoints.append(
            save_checkpoint(tmp_path / f"m{seed}.safetensors", tiny(), tokenizer.state_dict(), generator.state_dict())
        )
    out = tmp_path / "bundle"
    processes = [_export_process(c, out) for c in checkpoints]
    results = [(p.wait(timeout=600), *p.communicate()) for p in processes]
    succeeded = [i for i, (code, _, _) in enumerate(results) if code == 0]
    for code, _, stderr in results:
        assert code == 0 or (code == 1 and "another process" in stderr and "Traceback" not in stderr), stderr
    assert succeeded
    bundle = load_bundle(out)  # every file hashes to the manifest
    source = bundle.manifest["source"]["sha256"]
    assert source in {hashlib.sha256(Path(c).read_bytes()).hexdigest() for c in checkpoints}
    from imagefolder.export.check import check_bundle

    report = check_bundle(out, checkpoint=bundle.manifest["source"]["checkpoint"])
    assert report.ok, report.table()  # every graph is the recorded model's
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no lock, no staging left


@pytest.mark.parametrize("ending", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_interrupted_export_keeps_the_previous_bundle(workspace, tmp_path, ending):
    """Any signal that ends the export (Ctrl-C, kill, a closed terminal) leaves the old bundle and no staging."""
    bundle = shutil.copytree(workspace["bundle"], tmp_path / "bundle")
    before = _digest(bundle)
    process = _export_process(workspace["checkpoint"], bundle)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".bundle.staging-*/*.onnx")):  # interrupt once graphs are being written
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(ending)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + ending and stderr.rstrip().endswith("Aborted"), stderr
    assert "Traceback" not in stderr
    assert _digest(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder, no lock file


# -- Ctrl-C anywhere -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.2, 0.6, 2.0])
def test_ctrl_c_in_a_torch_command_aborts_cleanly(workspace, tmp_path, delay):
    """SIGINT while torch is imported or the model runs: exit 130 and 'Aborted', no crash, no output."""
    out = tmp_path / "profile.json"
    command = [
        SCRIPTS / "imagefolder",
        "profile",
        "--backend",
        "torch",
        "--checkpoint",
        workspace["checkpoint"],
        "--runs",
        100000,
        "--json",
        out,
    ]  # runs far longer than the delay
    process = subprocess.Popen(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr)
    assert stderr.rstrip().endswith("Aborted") and "Traceback" not in stderr and "Fatal" not in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".profile.json.*"))


def test_indices_output_is_valid_numpy(workspace, tmp_path):
    """The good path of --indices, so the error tests above are not passing by never writing."""
    _ok(
        main,
        [
            "generate",
            "--bundle",
            workspace["bundle"],
            "--backend",
            "ort",
            "--class",
            "1,2",
            "-o",
            tmp_path / "g.png",
            "--indices",
            tmp_path / "i.npy",
        ],
    )
    assert np.load(tmp_path / "i.npy").shape == (2, 2, 66)


def test_very_verbose_shows_the_traceback_of_a_user_error(workspace, tmp_path, monkeypatch):
    # -vv raises the process-wide verbosity for good; the monkeypatch puts it back for the tests after this one
    monkeypatch.setattr("imagefolder.cli.common._verbosity", 0)
    args = ["generate", "--bundle", workspace["bundle"], "--backend", "ort", "--class", "10", "-o", tmp_path / "x.png"]
    quiet = CliRunner().invoke(main, [str(a) for a in args])
    loud = CliRunner().invoke(main, ["-vv", *map(str, args)])
    assert quiet.exit_code == loud.exit_code == 1
    assert "Traceback" not in quiet.output and "Traceback" in loud.output and "InputError" in loud.output
    assert loud.output.rstrip().splitlines()[-1] == quiet.output.rstrip().splitlines()[-1]  # the same one line
