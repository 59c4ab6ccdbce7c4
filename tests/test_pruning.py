"""Scale-wise token pruning (``--prune``, core/pruning.py, models/pruning.py) on the shipped default model.

A pruned bundle holds a step graph for each pruned scale and the scale before it, generates identical tokens
on the torch reference, ONNX Runtime and TensorRT on the fakes (eager and replayed), keeps the scales before
the first pruned one exactly as the dense bundle has them, and with every ratio at 1 gives the dense bundle's
tokens. Inside a pruned graph, a position that is not kept gets the previous scale's trunk output and
cache entries upsampled; the kept ones are the top of the documented score. Bad specs: one Error line,
nothing written. The manifest, ``imagefolder-export check`` and ``imagefolder profile`` name the spec.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from imagefolder.cli.export import main as export_main
from imagefolder.cli.main import main
from imagefolder.core.bundle import load_bundle
from imagefolder.core.pruning import kept_count, parse_prune
from imagefolder.core.schedule import SamplingParams, scale_spans
from imagefolder.core.specs import example_inputs
from imagefolder.default_model import default_weights_path, load_default_or_checkpoint
from imagefolder.errors import InputError
from imagefolder.export.check import check_bundle
from imagefolder.export.onnx_export import export_bundle
from imagefolder.models.pruning import ScaleStep
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.backends.torch_backend import TorchBackend
from imagefolder.runtime.loop import generate
from tests.fakes import installed

pytestmark = pytest.mark.skipif(not default_weights_path().is_file(), reason="default model weights not built yet")

PRUNE = {3: 0.5, 4: 0.4}  # the default model's scales are 1, 2, 3, 4, 6: its last two
SAMPLED = SamplingParams(cfg=2.0, top_k=20, top_p=0.9, seed=3)
LABELS = [0, 3, 5, 8]


@pytest.fixture(scope="module")
def models():
    return load_default_or_checkpoint()


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory):
    config, tokenizer, generator, source = models
    root = tmp_path_factory.mktemp("pruned")
    return {
        name: export_bundle(root / name, tokenizer, generator, config, prune=prune, source=source, progress=False)
        for name, prune in (("dense", None), ("pruned", PRUNE), ("whole", {3: 1.0, 4: 1.0}))
    }


def test_the_manifest_records_the_spec_and_the_scale_graphs(bundles):
    bundle = load_bundle(bundles["pruned"])  # hashes, and every graph's ONNX I/O against the manifest
    assert bundle.prune == PRUNE
    record = bundle.manifest["prune"]
    assert record["spec"] == "3:0.5,4:0.4"
    assert record["scales"]["4"] == {"ratio": 0.4, "kept": 14, "positions": 36}  # round(0.4 · 36)
    assert [bundle.step_graph(si) for si in range(5)] == [
        "ar_step",
        "ar_step",
        "ar_step_s2",
        "ar_step_s3",
        "ar_step_s4",
    ]
    assert "prev_hidden" not in bundle.specs["ar_step_s2"].input_names  # the dense scale before: output only
    assert bundle.specs["ar_step_s3"].input_names[-1] == "prev_hidden"
    for name in ("ar_step_s2", "ar_step_s3", "ar_step_s4"):
        assert bundle.specs[name].output_names[-1] == "hidden" and bundle.manifest["graphs"][name]["parity"]
    assert "prune" not in load_bundle(bundles["dense"]).manifest


def test_every_backend_gives_identical_tokens_for_a_pruned_bundle(models, bundles, tmp_path):
    _, tokenizer, generator, _ = models
    on_ort = generate(OrtBackend(bundles["pruned"]), LABELS, SAMPLED)
    reference = TorchBackend(tokenizer, generator, load_bundle(bundles["pruned"]).candidates, prune=PRUNE)
    assert np.array_equal(generate(reference, LABELS, SAMPLED).indices, on_ort.indices)
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["pruned"], copy)
    with installed("10.3.0") as gpu:
        from imagefolder.export.trt_build import build_engines
        from imagefolder.runtime.backends.trt import TrtBackend

        build_engines(copy, batches=[len(LABELS)], progress=False, tf32=False)
        with TrtBackend(copy) as backend, backend.session(len(LABELS)) as session:
            runs = [generate(backend, LABELS, SAMPLED, session=session) for _ in range(3)]  # eager, capture, replay
            assert session.graph is not None
        assert all(np.array_equal(run.indices, on_ort.indices) for run in runs)
        assert not gpu.trt_errors() and not gpu.cuda.faults


def test_only_the_pruned_scales_change_and_ratio_one_is_dense(bundles):
    greedy = SamplingParams(cfg=2.0, top_k=1, top_p=1.0, seed=0)
    dense, pruned, whole = (
        generate(OrtBackend(bundles[n]), LABELS, greedy).indices for n in ("dense", "pruned", "whole")
    )
    spans = scale_spans((1, 2, 3, 4, 6))
    for si, (start, q) in enumerate(spans):
        same = float((dense[:, :, start : start + q] == pruned[:, :, start : start + q]).mean())
        assert same == 1.0 if si < 3 else same < 1.0, (si, same)
    assert np.array_equal(whole, dense)  # every position kept: the dense computation, in another order


def test_a_pruned_position_gets_the_previous_scale_upsampled(models, bundles):
    _, _, generator, _ = models
    bundle = load_bundle(bundles["pruned"])
    graph, si = "ar_step_s4", 4
    spec = bundle.specs[graph]
    feeds = example_inputs(spec, bundle.model, 2, si, np.random.default_rng(0))
    session = ort.InferenceSession(str(bundle.graph_path(graph)), providers=["CPUExecutionProvider"])
    out = dict(zip(spec.output_names, session.run(None, feeds), strict=True))
    step = ScaleStep(generator, si, PRUNE[si])
    with torch.no_grad():
        kept = step.scores(torch.from_numpy(feeds["x_folded"])).topk(step.kept, dim=1).indices.numpy()  # (N, k)
    assert kept.shape == (4, kept_count(PRUNE[si], 36))
    up = step.up.numpy()  # (36, 16) bicubic, scale 3 → scale 4
    restored_hidden = up @ feeds["prev_hidden"]  # (N, 36, C)
    start = bundle.spans[si - 1][0]
    restored_keys = up @ np.stack(
        [feeds[f"past_keys_{layer}"][:, :, start : start + 16] for layer in range(bundle.depth)]
    )
    for row in range(4):
        pruned = np.setdiff1d(np.arange(36), kept[row])
        np.testing.assert_allclose(out["hidden"][row, pruned], restored_hidden[row, pruned], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["keys"][:, row, :, pruned], restored_keys[:, row, :, pruned], atol=1e-5)
        # the kept positions went through the trunk: their output is not the upsampled one
        assert np.abs(out["hidden"][row, kept[row]] - restored_hidden[row, kept[row]]).max() > 1e-2
    # the score ranks positions by what this scale adds over the previous grid, ties by raster order
    x = feeds["x_folded"][0]
    score = np.square(x - step.low_pass.numpy() @ x).sum(-1)
    assert set(kept[0]) == set(np.argsort(-score, kind="stable")[: step.kept])


def test_check_and_profile_name_the_spec(bundles, tmp_path):
    report = check_bundle(bundles["pruned"])
    assert report.ok and {row["graph"] for row in report.rows} >= {"ar_step_s2", "ar_step_s3", "ar_step_s4"}
    assert "pruned --prune 3:0.5,4:0.4: scale 3 keeps 8 of 16, scale 4 keeps 14 of 36" in report.table()
    out = tmp_path / "profile.json"
    args = ["profile", "--bundle", str(bundles["pruned"]), "--backend", "ort", "--runs", "1", "--warmup", "0"]
    result = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "pruned --prune 3:0.5,4:0.4" in result.output
    assert all(r["prune"] == "3:0.5,4:0.4" for r in json.loads(out.read_text())["reports"])


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("5:0.5", "scale 5 does not exist"),
        ("0:0.5", "scale 0"),
        ("3:0", "(0, 1]"),
        ("3:1.2", "(0, 1]"),
        ("3:-0.5", "(0, 1]"),
        ("3", "SCALE:RATIO"),
        ("3:0.5,3:0.6", "named twice"),
    ],
)
def test_bad_specs_are_refused_in_one_line_and_nothing_is_written(spec, problem, tmp_path):
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_prune(spec, (1, 2, 3, 4, 6))
    out = tmp_path / "b"
    result = CliRunner().invoke(export_main, ["onnx", "--out", str(out), "--prune", spec])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and problem in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()


def test_quality_check_compares_a_bundle_with_its_dense_one(bundles, tmp_path):
    from imagefolder.configs import tiny
    from tests.models import randomized

    args = ["check", "--quality", str(bundles["pruned"]), "--against", str(bundles["dense"]), "--images", "20"]
    result = CliRunner().invoke(export_main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {int(line.split()[0]): float(line.split()[1][:-1]) for line in lines if line[:5].strip().isdigit()}
    assert [rows[si] for si in range(3)] == [100.0] * 3 and rows[3] < 100 and rows[4] < 100
    assert "class accuracy" in result.output and "Fréchet distance" in result.output  # the default model
    from imagefolder.cli.quality import compare_quality

    same = compare_quality(bundles["dense"], bundles["dense"], images=10)
    assert same.scale_agreement == [1.0] * 5 and min(same.psnr_db) == 100.0
    assert same.classifier["bundle"] == same.classifier["dense"]
    config = tiny()  # another model: refused in one line
    other = export_bundle(tmp_path / "other", *randomized(config), config, progress=False)
    result = CliRunner().invoke(export_main, ["check", "--quality", str(other), "--against", str(bundles["dense"])])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "different models" in errors[0], result.output
