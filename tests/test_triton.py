"""Triton model repository: layout, config.pbtxt valid against Triton's ModelConfig schema, the BLS model's loop.

Schema validation parses every generated config.pbtxt with protobuf's text parser into Triton's own
``ModelConfig`` message (``model_config_pb2`` shipped by the ``tritonclient`` package; the module is
loaded from its file because ``tritonclient.grpc`` itself needs grpcio). Unknown fields, wrong
types and bad enum values fail the parse.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from imagefolder.configs import tiny
from imagefolder.errors import EngineError
from imagefolder.export.triton import Enum, export_triton_repository, to_pbtxt
from tests.trt_helpers import fake_build_record, make_manifest, write_fake_bundle


@pytest.fixture(scope="module")
def model_config_pb2():
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (pip install tritonclient): no Triton model_config schema")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse(pb2, text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, pb2.ModelConfig())


@pytest.fixture
def bundle(tmp_path):
    manifest = make_manifest(tiny(), candidates=64)
    root = tmp_path / "bundle"
    write_fake_bundle(root, manifest)
    return write_fake_bundle(root, manifest, fake_build_record(manifest, [1, 8]))


def test_pbtxt_writer():
    text = to_pbtxt(
        {
            "name": 'a "q"',
            "max_batch_size": 0,
            "dims": [1, -1],
            "flag": True,
            "skip": None,
            "empty": [],
            "input": [{"name": "x", "data_type": Enum("TYPE_FP32")}],
            "sub": {"v": 1.5},
        }
    )
    assert text == (
        'name: "a \\"q\\""\nmax_batch_size: 0\ndims: [ 1, -1 ]\nflag: true\n'
        'input {\n  name: "x"\n  data_type: TYPE_FP32\n}\nsub {\n  v: 1.5\n}\n'
    )
    with pytest.raises(ValueError):
        to_pbtxt({"bad key": 1})


def test_repository_layout_and_schema(bundle, tmp_path, model_config_pb2):
    out = tmp_path / "repo"
    assert export_triton_repository(bundle, out, batches=[8]) == out
    graphs = ("encoder", "decoder", "ar_prefill", "ar_step", "sampler", "fold")
    assert {p.name for p in out.iterdir()} == {f"imagefolder_{g}" for g in graphs} | {"imagefolder_generate"}
    record = json.loads((bundle / "engines" / "build.json").read_text())
    for g in graphs:
        folder = out / f"imagefolder_{g}"
        assert (folder / "1" / "model.plan").read_bytes() == (bundle / "engines" / f"{g}.plan").read_bytes()
        config = parse(model_config_pb2, (folder / "config.pbtxt").read_text())
        assert config.name == f"imagefolder_{g}" and config.platform == "tensorrt_plan"
        assert config.max_batch_size == 0
        manifest_entry = json.loads((bundle / "manifest.json").read_text())["graphs"][g]
        assert [i.name for i in config.input] == [t["name"] for t in manifest_entry["inputs"]]
        assert [o.name for o in config.output] == [t["name"] for t in manifest_entry["outputs"]]
        for tensor, spec in zip(config.input, manifest_entry["inputs"], strict=True):
            assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in spec["shape"]]
        # Only the batch-8 profiles are served.
        want = [str(p["index"]) for p in record["graphs"][g]["profiles"] if p["batch"] == 8]
        (group,) = config.instance_group
        assert list(group.profile) == want and group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    step = parse(model_config_pb2, (out / "imagefolder_ar_step" / "config.pbtxt").read_text())
    assert step.input[0].data_type == model_config_pb2.TYPE_FP32
    assert step.input[1].data_type == model_config_pb2.TYPE_INT64

    gen = out / "imagefolder_generate"
    config = parse(model_config_pb2, (gen / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert [i.name for i in config.input] == ["class_labels", "seed", "cfg", "top_k", "top_p"]
    assert [o.name for o in config.output] == ["image", "indices"]
    assert list(config.output[1].dims) == [-1, 2, sum(p * p for p in tiny().generator.scales)]
    compile((gen / "1" / "model.py").read_text(), "model.py", "exec")
    settings = json.loads((gen / "1" / "imagefolder.json").read_text())
    assert settings["models"]["ar_step"] == "imagefolder_ar_step" and settings["batch_max"] == 8


def test_repository_needs_engines(tmp_path):
    manifest = make_manifest(tiny())
    root = write_fake_bundle(tmp_path / "b", manifest)
    with pytest.raises(EngineError, match="imagefolder-export trt"):
        export_triton_repository(root, tmp_path / "repo")


def test_repository_rejects_unbuilt_batch(bundle, tmp_path):
    with pytest.raises(ValueError, match=r"batches \[4\]"):
        export_triton_repository(bundle, tmp_path / "repo", batches=[4])


# ---------------------------------------------------------------------------------------------------------------------
# The BLS model's loop, against fake engine models that record each call


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


def fake_pb_utils(engines, calls):
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonModelException(Exception):
        pass

    class Response:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.err = output_tensors, error

        def has_error(self):
            return self.err is not None

        def error(self):
            return self.err

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, **kwargs):
            self.model, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            calls.append((self.model, {k: v.shape for k, v in feeds.items()}))
            result = engines[self.model](**feeds)
            return Response([FakeTensor(n, result[n]) for n in self.outputs])

    pb.TritonModelException = TritonModelException
    pb.TritonError = str
    pb.Tensor = FakeTensor
    pb.InferenceRequest = InferenceRequest
    pb.InferenceResponse = Response
    pb.get_output_tensor_by_name = lambda r, n: next((t for t in r.output_tensors if t.name() == n), None)
    pb.get_input_tensor_by_name = lambda r, n: r.get(n)
    return pb


def test_generate_model_runs_the_loop(bundle, tmp_path, monkeypatch):
    cfg = tiny()
    gen = cfg.generator
    scales = gen.scales
    P, L, H, D, V2 = sum(p * p for p in scales), gen.depth, gen.heads, gen.width // gen.heads, 2 * gen.codebook_size
    spans = [(sum(p * p for p in scales[:i]), scales[i] ** 2) for i in range(len(scales))]
    step_positions, cache_fill = [], []

    def prefill(labels):
        n = labels.shape[0]
        return {
            "cond_start": np.zeros((n, 1, gen.width), np.float32),
            "cond_blocks": np.zeros((n, L, 6, gen.width), np.float32),
            "cond_head": np.zeros((n, 2, gen.width), np.float32),
        }

    def sampler(logits, guidance, top_k, top_p, uniforms):
        b, q = uniforms.shape[:2]
        assert logits.shape == (2 * b, q, V2) and guidance.shape == top_k.shape == top_p.shape == (b,)
        return {"tokens": np.broadcast_to(np.arange(q, dtype=np.int32)[None, :, None], (b, q, 2)).copy()}

    def fold(tokens, f_hat, scale_index, next_positions):
        b = tokens.shape[0]
        return {"f_hat_out": f_hat + 1, "x_next": np.zeros((2 * b, next_positions.shape[0], 32), np.float32)}

    def step(x_folded, positions, cond_start, cond_blocks, cond_head, past_keys, past_values):
        n, q = x_folded.shape[0], positions.shape[0]
        step_positions.append(positions.tolist())
        # The cache holds every earlier scale (filled with its scale number + 1) and zeros after.
        filled = int((past_keys[0, 0, 0, :, 0] != 0).sum())
        cache_fill.append(filled)
        kv = np.full((L, n, H, q, D), float(len(step_positions) + 1), np.float32)
        return {"logits": np.zeros((n, q, V2), np.float32), "keys": kv, "values": kv}

    def decoder(indices):
        return {"image": np.zeros((indices.shape[0], 3, 64, 64), np.float32)}

    engines = {
        "imagefolder_ar_prefill": prefill,
        "imagefolder_sampler": sampler,
        "imagefolder_fold": fold,
        "imagefolder_ar_step": step,
        "imagefolder_decoder": decoder,
    }
    calls: list = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(engines, calls))
    export_triton_repository(bundle, tmp_path / "repo")
    version = tmp_path / "repo" / "imagefolder_generate" / "1"
    spec = importlib.util.spec_from_file_location("_imagefolder_triton_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(version.parent), "model_version": "1"})

    request = {"class_labels": FakeTensor("class_labels", np.array([3, 7], np.int64))}
    (response,) = model.execute([request])
    assert response.err is None, response.err
    outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
    assert outputs["image"].shape == (2, 3, 64, 64)
    indices = outputs["indices"]
    assert indices.shape == (2, 2, P)
    for start, q in spans:  # each scale's tokens (0..q-1 here) land at its positions, per branch
        assert (indices[:, :, start : start + q] == np.arange(q)).all()
    assert step_positions == [list(range(s, s + q)) for s, q in spans]
    assert cache_fill == [s for s, _ in spans]  # step si sees exactly the positions before its scale
    assert [c[0] for c in calls] == (
        ["imagefolder_ar_prefill"]
        + [
            m
            for si in range(len(scales))
            for m in ("imagefolder_ar_step", "imagefolder_sampler")
            + (("imagefolder_fold",) if si < len(scales) - 1 else ())
        ]
        + ["imagefolder_decoder"]
    )
    assert calls[0][1] == {"labels": (4,)}  # CFG: conditional rows, then the null class
