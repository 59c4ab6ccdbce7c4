"""The two commands end to end on real files, and their answers to bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagefolder.checkpoints import save_checkpoint
from imagefolder.cli.export import main as export_main
from imagefolder.cli.main import main
from imagefolder.configs import tiny
from imagefolder.install import install_command
from tests.models import randomized
from tests.official_files import write_official_ar_checkpoint


def run(command, args, ok=True):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = tiny()
    tokenizer, generator = randomized(config, seed=5)
    checkpoint = save_checkpoint(root / "model.safetensors", config, tokenizer.state_dict(), generator.state_dict())
    run(export_main, ["onnx", "--checkpoint", checkpoint, "--out", root / "bundle", "--batch-max", 4])
    return root, checkpoint


def test_generate_grid_and_indices(workspace, tmp_path):
    root, _ = workspace
    out = tmp_path / "grid.png"
    result = run(
        main,
        [
            "generate",
            "--bundle",
            root / "bundle",
            "--backend",
            "ort",
            "--class",
            "1,2,3,4",
            "--seed",
            3,
            "-o",
            out,
            "--indices",
            tmp_path / "idx.npy",
        ],
    )
    assert "wrote" in result.output
    with Image.open(out) as img:
        assert img.size == (2 * 64 + 2, 2 * 64 + 2)  # 2×2 grid with a 2 px gap
    indices = np.load(tmp_path / "idx.npy")
    assert indices.shape == (4, 2, 66) and indices.max() < 256


def test_generate_same_tokens_on_torch_and_ort(workspace, tmp_path):
    root, checkpoint = workspace
    args = ["generate", "--class", "7", "--seed", 9, "--top-k", 20]
    run(
        main,
        args
        + ["--bundle", root / "bundle", "--backend", "ort", "-o", tmp_path / "a.png", "--indices", tmp_path / "a.npy"],
    )
    run(
        main,
        args
        + ["--checkpoint", checkpoint, "--backend", "torch", "-o", tmp_path / "b.png", "--indices", tmp_path / "b.npy"],
    )
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_profile_prints_table_and_writes_json_and_trace(workspace, tmp_path):
    root, _ = workspace
    result = run(
        main,
        [
            "profile",
            "--bundle",
            root / "bundle",
            "--backend",
            "ort",
            "--batch",
            "1,2",
            "--runs",
            3,
            "--warmup",
            1,
            "--json",
            tmp_path / "p.json",
            "--trace",
            tmp_path / "t.json",
        ],
    )
    for word in ("p50", "p90", "p99", "first scale", "images/s"):
        assert word in result.output, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report  # structure checked in test_profiler
    trace = json.loads((tmp_path / "t.json").read_text())
    events = trace["traceEvents"]
    names = {e["name"] for e in events}
    assert {"prefill", "decode"} <= names and any(n.startswith("step") for n in names)
    assert all({"ph", "ts", "dur", "pid", "tid"} <= set(e) for e in events if e["ph"] == "X")


def test_reconstruct_prints_psnr(workspace, tmp_path):
    root, _ = workspace
    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(picture)
    result = run(
        main, ["reconstruct", "--bundle", root / "bundle", "--backend", "ort", picture, "-o", tmp_path / "r.png"]
    )
    assert "PSNR" in result.output and (tmp_path / "r.png").exists()


def test_convert_official_checkpoint(tmp_path):
    config = tiny()
    tokenizer, generator = randomized(config, seed=2)
    official = tmp_path / "ar-ckpt-last.pth"
    write_official_ar_checkpoint(official, config, generator, tokenizer)
    run(main, ["convert", official, tmp_path / "ours.safetensors"])
    assert (tmp_path / "ours.safetensors").exists() and (tmp_path / "ours.json").exists()


def test_export_check_passes(workspace):
    root, checkpoint = workspace
    result = run(export_main, ["check", root / "bundle", "--checkpoint", checkpoint])
    assert "ar_step" in result.output and "NO" not in result.output.split("TensorRT")[0]


def test_trt_without_tensorrt_exits_with_install_hint(workspace):
    pytest.importorskip("onnx")
    if __import__("importlib").util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    root, _ = workspace
    result = run(export_main, ["trt", root / "bundle"], ok=False)
    hints = [install_command(extra) for extra in ("gpu-cu12", "gpu-cu13")] + ["apt install python3-libnvinfer"]
    hint = any(h in result.output for h in hints)
    assert result.exit_code != 0 and hint, result.output


# -- bad input: a clear message, exit code != 0, nothing written ---------------------------------------


def _copy_bundle(root, tmp_path):
    return shutil.copytree(root / "bundle", tmp_path / "bundle")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: (b / "fold.onnx").unlink(), "fold.onnx"),
        (lambda b: (b / "ar_step.onnx").write_bytes((b / "ar_step.onnx").read_bytes()[:-7] + b"garbage"), "ar_step"),
        (
            lambda b: (b / "manifest.json").write_text(
                json.dumps({**json.loads((b / "manifest.json").read_text()), "schema_version": 99})
            ),
            "newer",
        ),
    ],
    ids=["missing-file", "modified-file", "newer-schema"],
)
def test_broken_bundles_are_refused(workspace, tmp_path, damage, message):
    bundle = _copy_bundle(workspace[0], tmp_path)
    damage(bundle)
    out = tmp_path / "out.png"
    result = run(main, ["generate", "--bundle", bundle, "--backend", "ort", "-o", out], ok=False)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "10"], "class"),
        (["--class", "-1"], "class"),
        (["--top-p", "0"], "top_p"),
    ],
    ids=["class-too-big", "class-negative", "bad-top-p"],
)
def test_bad_generation_requests(workspace, tmp_path, args, message):
    out = tmp_path / "out.png"
    result = run(
        main, ["generate", "--bundle", workspace[0] / "bundle", "--backend", "ort", "-o", out, *args], ok=False
    )
    assert result.exit_code != 0 and message in result.output.lower(), result.output
    assert not out.exists()


def test_unknown_backend_is_refused(workspace, tmp_path):
    out = tmp_path / "out.png"
    result = run(main, ["generate", "--bundle", workspace[0] / "bundle", "--backend", "cuda", "-o", out], ok=False)
    assert result.exit_code == 2 and "cuda" in result.output
    assert not out.exists()


def test_corrupted_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint at all")
    result = run(export_main, ["onnx", "--checkpoint", bad, "--out", tmp_path / "b"], ok=False)
    assert result.exit_code != 0 and "bad.pth" in result.output
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_console_scripts_are_installed():
    for script in ("imagefolder", "imagefolder-export"):
        path = shutil.which(script) or str(__import__("pathlib").Path(sys.executable).parent / script)
        result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "Usage" in result.stdout


def test_layer_profile_needs_trt(workspace):
    result = run(main, ["profile", "--bundle", workspace[0] / "bundle", "--backend", "ort", "--layers"], ok=False)
    assert result.exit_code == 2 and "trt backend" in result.output


def test_ort_providers_are_selectable_and_checked(workspace, tmp_path):
    bundle = workspace[0] / "bundle"
    ok = run(main, ["generate", "--bundle", bundle, "--backend", "ort", "--providers", "cpu", "-o", tmp_path / "a.png"])
    assert "wrote" in ok.output
    missing = run(
        main,
        ["generate", "--bundle", bundle, "--backend", "ort", "--providers", "tensorrt,cpu", "-o", tmp_path / "b.png"],
        ok=False,
    )
    assert missing.exit_code == 1 and "TensorrtExecutionProvider" in missing.output and "available" in missing.output
    bad = run(main, ["generate", "--bundle", bundle, "--providers", "rocm", "-o", tmp_path / "c.png"], ok=False)
    assert bad.exit_code == 2 and "rocm" in bad.output
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_generate_with_no_other_argument_uses_the_default_model(tmp_path, monkeypatch):
    """`imagefolder generate --class 3 -o out.png` on a fresh install: the shipped model, a class-3 picture."""
    import torch

    from imagefolder.core.images import load_images
    from imagefolder.train.classifier import default_classifier_path, load_classifier

    monkeypatch.chdir(tmp_path)
    result = run(main, ["generate", "--class", "3", "-o", "out.png"])
    assert "classes [3]" in result.output
    judge = load_classifier(default_classifier_path())
    with torch.no_grad():
        logits = judge(torch.from_numpy(load_images([tmp_path / "out.png"], 64)))
    assert int(logits.argmax()) == 3  # the shipped classifier sees a plus sign (class 3)


def test_export_and_profile_the_default_model(tmp_path):
    run(export_main, ["onnx", "--out", tmp_path / "bundle"])  # no --checkpoint: the shipped default model
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == "default" and manifest["name"] == "tiny"
    result = run(
        main,
        [
            "profile",
            "--bundle",
            tmp_path / "bundle",
            "--backend",
            "ort",
            "--runs",
            2,
            "--warmup",
            1,
            "--json",
            tmp_path / "p.json",
            "--trace",
            tmp_path / "t.json",
        ],
    )
    assert "p50" in result.output and "images/s" in result.output
    report = json.loads((tmp_path / "p.json").read_text())
    trace = json.loads((tmp_path / "t.json").read_text())
    assert report and any(e["name"].startswith("step") for e in trace["traceEvents"])
