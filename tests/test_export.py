"""ONNX export: I/O equals the specs, parity with PyTorch per dtype, operators, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from imagefolder.configs import tiny
from imagefolder.core import specs as S
from imagefolder.core.bundle import onnx_io
from imagefolder.core.sampler import default_candidates
from imagefolder.core.schedule import scale_spans
from imagefolder.errors import ExportError
from imagefolder.export.check import check_bundle
from imagefolder.export.onnx_export import export_bundle
from imagefolder.export.opcheck import check_operators
from tests.models import randomized


@pytest.fixture(scope="module")
def models():
    config = tiny()
    tokenizer, generator = randomized(config)
    return config, tokenizer, generator


@pytest.fixture(scope="module")
def bundle_fp32(models, tmp_path_factory):
    config, tokenizer, generator = models
    return export_bundle(tmp_path_factory.mktemp("b32"), tokenizer, generator, config, dtype="fp32", progress=False)


def test_bundle_io_equals_specs(bundle_fp32, models):
    config = models[0]
    manifest = json.loads((bundle_fp32 / "manifest.json").read_text())
    assert manifest["schema_version"] == S.SCHEMA_VERSION and manifest["dtype"] == "fp32"
    specs = S.graph_specs(config.to_dict())
    assert set(manifest["graphs"]) == set(S.GRAPH_NAMES)
    for name, spec in specs.items():
        entry = manifest["graphs"][name]
        io = onnx_io(bundle_fp32 / entry["file"])
        assert io["inputs"] == entry["inputs"] == [t.to_dict("float32") for t in spec.inputs]
        assert io["outputs"] == entry["outputs"] == [t.to_dict("float32") for t in spec.outputs]
    # The spec's fixed dims are the model's: the cache as L = 4 layers of (N, H, P, D) for the tiny preset.
    step_inputs = {t["name"]: t["shape"] for t in manifest["graphs"]["ar_step"]["inputs"]}
    cache = [name for name in step_inputs if name.startswith("past_")]
    assert cache == [f"past_keys_{i}" for i in range(4)] + [f"past_values_{i}" for i in range(4)]
    assert all(step_inputs[name] == ["N", 4, 66, 32] for name in cache)
    assert set(manifest["files"]) == {f"{n}.onnx" for n in S.GRAPH_NAMES} | {"weights.bin"}


def test_no_weight_is_stored_twice(bundle_fp32, models):
    """The default-size tiny model: every weight once on disk, within 2% of the parameters' bytes."""
    from imagefolder.export.weights import weight_report

    config, tokenizer, generator = models
    manifest = json.loads((bundle_fp32 / "manifest.json").read_text())
    report = weight_report(bundle_fp32, {name: entry["file"] for name, entry in manifest["graphs"].items()})
    parameters = sum(p.numel() * 4 for model in (tokenizer, generator) for p in model.parameters())
    assert report["duplicated"] == 0 and manifest["weight_storage"]["duplicated_bytes"] == 0
    assert report["stored"] <= 1.02 * parameters, (report["stored"], parameters)
    assert (bundle_fp32 / "weights.bin").stat().st_size <= 1.03 * parameters  # alignment padding included
    graphs = report["graphs"]
    assert graphs == {name: entry["weights"]["bytes"] for name, entry in manifest["graphs"].items()}
    # The codebooks serve encoder, decoder and fold: read by three graphs, stored once.
    assert sum(graphs.values()) > report["stored"]
    ada = sum(p.numel() * 4 for b in generator.blocks for p in b.ada_lin.parameters())
    assert graphs["ar_prefill"] >= ada  # the AdaLN weights live in the prefill ...
    assert graphs["ar_step"] < sum(p.numel() * 4 for p in generator.parameters()) - ada  # ... and not in the step
    for name, entry in manifest["graphs"].items():
        assert entry["external_data"] == ["weights.bin"] or graphs[name] == 0, name


def test_onnx_runtime_fuses_every_mlp_activation_into_one_kernel(bundle_fp32, models, tmp_path):
    """The step graph's tanh GELU stays in the form ORT's FastGelu fusion matches, one kernel per block;
    the exported model's own GELU modules are untouched."""
    import onnxruntime as ort
    import torch

    config, _, generator = models
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ar_step.optimized.onnx")
    ort.InferenceSession(str(bundle_fp32 / "ar_step.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    ops = [node.op_type for node in optimized.graph.node]
    assert ops.count("FastGelu") == config.generator.depth and "Tanh" not in ops
    assert all(isinstance(block.ffn.act, torch.nn.GELU) for block in generator.blocks)


def test_fp32_parity_recorded_below_tolerance(bundle_fp32):
    manifest = json.loads((bundle_fp32 / "manifest.json").read_text())
    for name, entry in manifest["graphs"].items():
        for output, result in entry["parity"]["outputs"].items():
            assert result["ok"], (name, output, result)
            limit = 1e-4 if result["metric"] == "max_rel" else 0.005  # relative error, or code choices that flip
            assert result["value"] <= limit, (name, output, result)


def test_every_graph_passes_the_operator_check(bundle_fp32):
    for name in S.GRAPH_NAMES:
        report = check_operators(bundle_fp32 / f"{name}.onnx")
        assert report.ok, (name, report.summary())
        assert report.opset == 17
        assert "If" not in report.counts and "Resize" not in report.counts  # no branches, resampling by MatMul
    sampler = check_operators(bundle_fp32 / "sampler.onnx")
    assert "TopK" in sampler.counts and "Multinomial" not in sampler.counts


def test_operator_check_flags_unsupported_graphs(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1, 1])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    graph = helper.make_graph(
        [helper.make_node("Multinomial", ["x"], ["y"]), helper.make_node("TopK", ["x", "k"], ["v", "i"])],
        "bad",
        [x],
        [y],
        initializer=[k],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)]), path)
    report = check_operators(path)
    assert not report.ok
    assert report.unsupported == ["Multinomial"]
    assert any("K=4000" in p for p in report.problems) and any("opset 22" in p for p in report.problems)


def test_fp16_bundle_matches_fp32_torch_within_tolerance(models, tmp_path):
    config, tokenizer, generator = models
    out = export_bundle(tmp_path / "b16", tokenizer, generator, config, dtype="fp16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state_dtype"] == "float16"
    step = {t["name"]: t["dtype"] for t in manifest["graphs"]["ar_step"]["inputs"]}
    assert step["past_keys_0"] == step["past_values_3"] == "float16" and step["positions"] == "int64"
    # Stated tolerance for fp16 against fp32 PyTorch: relative error below 2e-2 on every float output.
    for entry in manifest["graphs"].values():
        for result in entry["parity"]["outputs"].values():
            assert result["ok"] and result.get("max_rel", 0) < 2e-2


def test_bf16_bundle_is_valid_onnx_with_fp32_boundary(models, tmp_path):
    config, tokenizer, generator = models
    out = export_bundle(tmp_path / "bf", tokenizer, generator, config, dtype="bf16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state_dtype"] == "float32"
    for name in S.GRAPH_NAMES:
        onnx.checker.check_model(str(out / f"{name}.onnx"))
        assert "skipped" in manifest["graphs"][name]["parity"]["outputs"]


def test_check_command_compares_every_scale(bundle_fp32, models, tmp_path):
    from imagefolder.checkpoints import save_checkpoint

    config, tokenizer, generator = models
    ckpt = save_checkpoint(tmp_path / "m.safetensors", config, tokenizer.state_dict(), generator.state_dict())
    report = check_bundle(bundle_fp32, checkpoint=ckpt)
    assert report.ok, report.table()
    scales = {g: {r["scale"] for r in report.rows if r["graph"] == g} for g in ("ar_step", "sampler", "fold")}
    num_scales = len(config.generator.scales)
    assert scales == {
        "ar_step": set(range(num_scales)),
        "sampler": set(range(num_scales)),
        "fold": set(range(num_scales - 1)),
    }  # scale 0 of the step included: its start-token path
    assert "ar_step" in report.table()


def test_failed_export_keeps_the_previous_bundle_and_leaves_nothing_behind(models, tmp_path, monkeypatch):
    config, tokenizer, generator = models
    import imagefolder.export.onnx_export as module

    good = export_bundle(tmp_path / "b", tokenizer, generator, config, progress=False)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = {"n": 0}
    real = module.check_parity

    def broken(*args, **kwargs):
        calls["n"] += 1
        report = real(*args, **kwargs)
        if calls["n"] == 3:  # the third graph "fails" its parity check
            report = {k: {**v, "ok": False, "value": 1.0} for k, v in report.items()}
        return report

    monkeypatch.setattr(module, "check_parity", broken)
    with pytest.raises(ExportError, match="tolerance"):
        export_bundle(tmp_path / "b", tokenizer, generator, config, progress=False)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # the old bundle, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging folder, no lock file left


def test_candidates_follow_trt_topk_limit():
    assert default_candidates(256) == 256
    assert default_candidates(4096) == 1024
    assert default_candidates(4096, 750) == 750
    with pytest.raises(ValueError, match="candidates"):
        default_candidates(4096, 3900)


def test_fold_graph_matches_tokenizer_at_every_scale(models):
    import torch

    from imagefolder.export.graphs import FoldGraph

    config, tokenizer, _ = models
    fold = FoldGraph(tokenizer)
    rng = torch.Generator().manual_seed(0)
    k = config.tokenizer.latent_size
    f_hat = torch.zeros(2, config.generator.folded_dim, k, k)
    spans = scale_spans(config.generator.scales)
    for si, (_, q) in enumerate(spans):
        tokens = torch.randint(0, config.generator.codebook_size, (2, q, 2), generator=rng, dtype=torch.int32)
        start, q_next = spans[min(si + 1, len(spans) - 1)]
        with torch.no_grad():
            f_out, x_next = fold(tokens, f_hat, torch.tensor([si]), torch.arange(start, start + q_next))
            expected = f_hat + tokenizer.embed_scale(tokens.long(), si)
        np.testing.assert_allclose(f_out.numpy(), expected.numpy(), atol=1e-5)
        if si + 1 < len(spans):
            ref_next = tokenizer.next_scale_input(expected, si + 1).repeat(2, 1, 1)
            np.testing.assert_allclose(x_next.numpy(), ref_next.numpy(), atol=1e-5)
        f_hat = f_out


def test_default_bundle_passes_the_tensorrt_operator_check(tmp_path):
    """The bundle of the shipped default model: every graph parses on TensorRT 10.3 (operator check)."""
    from imagefolder.default_model import load_default_or_checkpoint

    config, tokenizer, generator, source = load_default_or_checkpoint()
    out = export_bundle(tmp_path / "default", tokenizer, generator, config, source=source, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == "default"
    for name in S.GRAPH_NAMES:
        report = check_operators(out / f"{name}.onnx")
        assert report.ok, (name, report.summary())
        assert manifest["graphs"][name]["operators"]["ok"]
