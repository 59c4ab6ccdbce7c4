"""``imagefolder-export check --backend trt`` through polygraphy, on the fakes (tests/fakes).

polygraphy's ``Comparator`` drives our engine runner (``TrtGraphRunner`` over ``TrtBackend.run_graph``) and
its own ``OnnxrtRunner`` for every graph and scale; the verdicts are ``core.compare``'s tolerances. A
deliberately corrupted engine output fails exactly its rows, and ``--debug`` saves what bisects it: the
inputs, ONNX Runtime's outputs with every tensor marked (polygraphy's ``ModifyOutputs``), and the
polygraphy command that compares them layer by layer on a GPU. The operator report asks the fake
TensorRT's parser through polygraphy's ``inspect capability`` where TensorRT imports, and falls back
to the static listing where it does not.
"""

from __future__ import annotations

import shlex
import shutil
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from tests.fakes import installed


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The tiny model exported (fp32) with engines of the fake TensorRT 10.3 for batch 1."""
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from tests.models import randomized

    config = tiny()
    tokenizer, generator = randomized(config)
    root = export_bundle(tmp_path_factory.mktemp("check"), tokenizer, generator, config, progress=False)
    with installed():
        build_engines(root, batches=[1], progress=False, tf32=False)
    return root


@pytest.fixture
def gpu():
    with installed() as fake:
        yield fake
        assert not fake.trt_errors() and not fake.cuda.faults


def test_polygraphy_compares_every_graph_at_every_scale(bundle, gpu, monkeypatch):
    from polygraphy.comparator import Comparator

    from imagefolder.core.bundle import load_bundle
    from imagefolder.runtime.engine_check import check_engines

    runs = []
    original = Comparator.run
    monkeypatch.setattr(
        Comparator, "run", lambda runners, **kw: runs.append([r.name for r in runners]) or original(runners, **kw)
    )
    report = check_engines(bundle)
    loaded = load_bundle(bundle)
    expected = [(g, si) for g, spec in loaded.specs.items() for si in spec.served_scales(loaded.num_scales)]
    assert len(runs) == len(expected) and report.ok
    assert ["trt:ar_step@3", "onnxrt:ar_step"] in runs and ["trt:decoder", "onnxrt:decoder"] in runs
    assert {(r["graph"], r["scale"]) for r in report.rows} == {(g, "-" if si is None else si) for g, si in expected}


@pytest.fixture
def corrupt_ar_step_logits(monkeypatch):
    """The engine of ar_step at scale 2 returns logits off by a tenth of their range; everything else is exact."""
    from imagefolder.runtime.backends.trt import TrtBackend

    original = TrtBackend.run_graph

    def run_graph(self, graph, inputs, batch, scale_index=None):
        outputs = original(self, graph, inputs, batch, scale_index)
        if (graph, scale_index) == ("ar_step", 2):
            logits = outputs["logits"]
            outputs["logits"] = logits + 0.1 * np.abs(logits).max()
        return outputs

    monkeypatch.setattr(TrtBackend, "run_graph", run_graph)


def test_a_mismatch_fails_its_rows_and_debug_saves_what_bisects_it(bundle, gpu, corrupt_ar_step_logits, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from imagefolder.cli.export import main

    debug = tmp_path / "debug"
    result = CliRunner().invoke(main, ["check", str(bundle), "--backend", "trt", "--debug", str(debug)])
    assert result.exit_code == 1 and "exceed their tolerance" in result.output, result.output
    failing = [line.split()[:3] for line in result.output.splitlines() if line.endswith(" NO")]
    assert failing == [["ar_step", "2", "logits"]], result.output
    saved = debug / "ar_step-s2"
    assert sorted(p.name for p in debug.iterdir() if p.is_dir()) == ["ar_step-s2"]  # only the failing run
    (feeds,) = load_json(str(saved / "inputs.json"))
    assert feeds["positions"].tolist() == list(range(5, 14))  # scale 2 of the tiny model: 3x3 after 1 + 4
    (name, (ort_result,)) = RunResults.load(str(saved / "onnxrt-outputs.json"))[0]
    graph_outputs = {"logits", "keys", "values"}
    assert name == "onnxrt:ar_step" and graph_outputs < set(ort_result.keys())
    assert len(ort_result.keys()) > 20  # every tensor of the graph, for layer-by-layer comparison
    command = next(line for line in result.output.splitlines() if "polygraphy run" in line)
    argv = shlex.split(command.split(": ", 2)[-1])
    assert argv[:4] == ["polygraphy", "run", str(bundle / "ar_step.onnx"), "--trt"]
    assert argv[argv.index("--trt-outputs") + 1] == "*" and str(saved / "inputs.json") in argv
    shapes = argv[argv.index("--input-shapes") + 1 : argv.index("--load-inputs")]
    assert "positions:[9]" in shapes and len(shapes) == 5 + 2 * 4  # ar_step's inputs: 4 layers' keys and values


def test_debug_with_nothing_failing_saves_only_the_marked_graphs(bundle, gpu, tmp_path):
    from imagefolder.runtime.engine_check import check_engines

    report = check_engines(bundle, debug_dir=tmp_path / "debug")
    assert report.ok and not report.notes
    marked = onnx.load(str(tmp_path / "debug" / "fold.all-outputs.onnx"), load_external_data=False)
    assert len(marked.graph.output) > 2


def _graph_with(op_type: str, path) -> None:
    """A one-node ONNX graph (opset 17) of ``op_type`` on a float vector."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    node = helper.make_node(op_type, ["x"], ["y"], name=f"the_{op_type.lower()}")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


@pytest.mark.parametrize("fake_gpu", ["10.3.0", "11.4.0"], indirect=True)
def test_the_operator_report_asks_tensorrts_parser(fake_gpu, tmp_path):
    from imagefolder.export.trt_capability import parser_report

    _graph_with("Relu", tmp_path / "ok.onnx")
    _graph_with("Unique", tmp_path / "unique.onnx")  # onnx-tensorrt: no importer
    assert parser_report(tmp_path / "ok.onnx").ok
    report = parser_report(tmp_path / "unique.onnx")
    assert not report.ok and report.tensorrt_version == fake_gpu.trt.__version__
    assert report.rejected == ["Unique node the_unique: No importer registered for op: Unique"]
    assert report.summary().startswith(f"TensorRT {fake_gpu.trt.__version__}'s parser: 1 nodes NOT SUPPORTED")


def test_without_tensorrt_the_operator_report_is_the_static_listing(bundle, monkeypatch):
    from imagefolder.core.bundle import load_bundle
    from imagefolder.export.trt_capability import operator_reports

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    reports = operator_reports(load_bundle(bundle))
    assert set(reports) == {"encoder", "decoder", "ar_prefill", "ar_step", "sampler", "fold"}
    assert all(r.ok and r.summary().startswith("static list of TensorRT 10.3's parser") for r in reports.values())


def test_the_check_table_names_the_parser_it_asked(bundle, gpu, tmp_path):
    from imagefolder.cli.export import main

    copy = shutil.copytree(bundle, tmp_path / "bundle")
    result = CliRunner().invoke(main, ["check", str(copy), "--backend", "trt"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ar_step     TensorRT 10.3.0's parser: ok" in result.output
    assert "[I]" not in result.output and "[W]" not in result.output  # polygraphy stays quiet without -vv
