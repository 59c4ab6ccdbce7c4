"""Triton model repository: layout, config.pbtxt valid against Triton's ModelConfig schema, and the model served.

Schema validation parses every generated config.pbtxt with protobuf's text parser into Triton's own
``ModelConfig`` message (``model_config_pb2`` shipped by the ``tritonclient`` package). The model runs in
``tests/fakes/triton.py``'s stand-in for Triton's Python backend, on the fake TensorRT (``tests/fakes``)
with engines built from an exported tiny bundle, and every answer is compared with ONNX Runtime on the
same bundle: each request must get exactly what it would get alone.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from imagefolder.configs import tiny
from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import EngineError
from imagefolder.export.triton import Enum, export_triton_repository, to_pbtxt
from tests.fakes import installed
from tests.fakes.triton import Server, TritonError, model_config_pb2
from tests.trt_helpers import fake_build_record, make_manifest, write_fake_bundle

SERVED = [1, 2]
MODEL = "imagefolder_generate"


@pytest.fixture(scope="module")
def pb2():
    module = model_config_pb2()
    if module is None:
        pytest.skip("tritonclient is not installed (pip install tritonclient): no Triton model_config schema")
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


def test_repository_layout_and_schema(bundle, tmp_path, pb2):
    out = tmp_path / "repo"
    assert export_triton_repository(bundle, out, batches=[8], defaults=SamplingParams(cfg=2.0)) == out
    # No engine models: the state never leaves the device. (The writers' lock is a file; Triton reads folders.)
    assert [p.name for p in out.iterdir() if p.is_dir()] == [MODEL]
    folder = out / MODEL
    config = parse(pb2, (folder / "config.pbtxt").read_text())
    assert config.name == MODEL and config.backend == "python" and config.max_batch_size == 64
    assert [i.name for i in config.input] == [
        "class_labels",
        "seed",
        "cfg",
        "top_k",
        "top_p",
        "reference_indices",
        "force_mask",
    ]
    assert [i.optional for i in config.input] == [False, True, True, True, True, True, True]
    positions = sum(pn * pn for pn in tiny().generator.scales)
    # one row per image, after Triton's batch dimension
    assert [list(i.dims) for i in config.input] == [[1]] * 5 + [[2, positions], [positions, 2]]
    assert [o.name for o in config.output] == ["image", "indices"]
    assert list(config.output[1].dims) == [2, sum(p * p for p in tiny().generator.scales)]
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    (group,) = config.instance_group
    assert group.kind == pb2.ModelInstanceGroup.KIND_GPU and group.count == 1
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {
        "backend": "trt",
        "bundle": "bundle",
        "batches": "8",
        "cfg": "2.0",
        "top_k": "750",
        "top_p": "0.95",
        "seed": "0",
    }
    assert "from imagefolder.runtime.triton_model import TritonPythonModel" in (folder / "1" / "model.py").read_text()
    copy = folder / "1" / "bundle"
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in bundle.iterdir())
    plan = copy / "engines" / "ar_step.plan"
    assert os.path.samefile(plan, bundle / "engines" / "ar_step.plan")  # hard-linked, not copied
    export_triton_repository(bundle, out)  # a second export replaces the model folder
    assert parse(pb2, (folder / "config.pbtxt").read_text()).dynamic_batching.preferred_batch_size == [1, 8]


def test_repository_needs_engines(tmp_path):
    manifest = make_manifest(tiny())
    root = write_fake_bundle(tmp_path / "b", manifest)
    with pytest.raises(EngineError, match="imagefolder-export trt"):
        export_triton_repository(root, tmp_path / "repo")


def test_repository_rejects_unbuilt_batch_and_a_small_max_batch_size(bundle, tmp_path):
    with pytest.raises(ValueError, match=r"batches \[4\]"):
        export_triton_repository(bundle, tmp_path / "repo", batches=[4])
    with pytest.raises(ValueError, match="max_batch_size 4 is below"):
        export_triton_repository(bundle, tmp_path / "repo", batches=[8], max_batch_size=4)


# ---------------------------------------------------------------------------------------------------------------------
# The model served: the stand-in Triton, the fake TensorRT, ONNX Runtime as the reference


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """(repository, bundle): a tiny bundle with engines for batches 1 and 2 built on the fake TensorRT."""
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from tests.models import randomized

    config = tiny()
    tokenizer, generator = randomized(config)
    root = export_bundle(tmp_path_factory.mktemp("triton"), tokenizer, generator, config, dtype="fp32", progress=False)
    with installed():
        build_engines(root, batches=SERVED, progress=False, tf32=False)
    repo = tmp_path_factory.mktemp("repo")
    export_triton_repository(root, repo, max_batch_size=8)
    return repo, root


@pytest.fixture
def server(repository, pb2):
    with installed() as gpu, Server(repository[0], pb2) as server:
        server.load(MODEL)
        yield server
        assert not gpu.trt_errors() and not gpu.cuda.faults and gpu.cuda.sticky is None
    assert server.model is None  # finalize ran


@pytest.fixture(scope="module")
def alone(repository):
    """What one image gets from ONNX Runtime alone: (label, seed, index, cfg, top_k, top_p) → (image, indices)."""
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.loop import ImageRequest, run_batch

    backend = OrtBackend(repository[1])
    session = backend.session(1)

    def get(label, seed=0, index=0, cfg=3.25, top_k=750, top_p=0.95):
        params = SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)
        result = run_batch(session, backend.scales, [ImageRequest(label, params, index)])
        return result.images[0], result.indices[0]

    return get


def rows(values, dtype) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def request(labels, **settings) -> dict[str, np.ndarray]:
    """A request: one row per image; a setting given as a scalar is repeated on every row."""
    kinds = {"seed": np.int64, "cfg": np.float32, "top_k": np.int64, "top_p": np.float32}
    out = {"class_labels": rows(labels, np.int64)}
    for name, value in settings.items():
        out[name] = rows(np.broadcast_to(value, (len(labels),)), kinds[name])
    return out


def check(result, alone, labels, **settings) -> None:
    assert not isinstance(result, TritonError), result.message()
    for index, label in enumerate(labels):
        mine = {k: (v[index] if isinstance(v, list) else v) for k, v in settings.items()}
        image, indices = alone(label, index=index, **mine)
        np.testing.assert_array_equal(result["indices"][index], indices)
        np.testing.assert_allclose(result["image"][index], image, atol=1e-6)


CONCURRENT = [
    ([3], {}),  # the model's defaults
    ([1, 2, 5], {"seed": 7, "cfg": 2.0, "top_k": 20, "top_p": 0.9}),  # split over two sessions
    ([0, 9], {"seed": [4, 11], "cfg": [1.5, 4.0], "top_k": [1, 40], "top_p": [1.0, 0.8]}),  # per-image settings
]


def test_concurrent_requests_get_what_each_gets_alone(server, alone):
    session = server.model.sessions[2]  # 6 images a call: three generations of batch 2
    for _ in range(2):  # eager, then captured and replayed
        results = server.infer([request(labels, **settings) for labels, settings in CONCURRENT])
        for result, (labels, settings) in zip(results, CONCURRENT, strict=True):
            check(result, alone, labels, **settings)
    launches = session.launches
    results = server.infer([request(labels, **settings) for labels, settings in CONCURRENT])
    check(results[1], alone, CONCURRENT[1][0], **CONCURRENT[1][1])
    assert session.graph is not None and session.launches - launches == 3  # one launch per generation


def test_a_request_above_the_largest_batch_is_split(server, alone):
    (result,) = server.infer([request([4, 5, 6, 7, 8], seed=3, top_k=30)])
    check(result, alone, [4, 5, 6, 7, 8], seed=3, top_k=30)
    sessions = server.model.sessions
    assert (sessions[2].generations, sessions[1].generations) == (2, 1)  # 2 + 2 + 1


def test_bad_requests_get_an_error_and_the_others_succeed(server, alone):
    bad_rows = request([1, 2, 3])
    bad_rows["seed"] = rows([1, 2], np.int64)  # a Triton-valid batch of 2 rows in a request of 3
    results = server.infer(
        [
            request([3, 4], seed=1),
            request([10]),  # tiny has 10 classes: 0..9
            request([2, 2], top_k=[5, 0]),
            request([6], top_p=1.5),
            request([7], seed=2),
        ]
    )
    check(results[0], alone, [3, 4], seed=1)
    assert "class id(s) [10] outside [0, 10)" in results[1].message()
    assert "row 1: top_k must be an integer ≥ 1, got 0" in results[2].message()
    assert "top_p must be in (0, 1], got 1.5" in results[3].message()
    check(results[4], alone, [7], seed=2)
    with pytest.raises(Exception, match="batch sizes"):  # Triton itself refuses rows of unequal count
        server.infer([bad_rows])


def test_conditioned_requests_get_what_ort_gives_and_the_others_are_unchanged(server, repository, alone):
    """reference_indices and force_mask are optional: a request with them gets ONNX Runtime's conditioned tokens
    (the forced ones the reference's), a request without them in the same batch what it gets alone, and a
    request with only one of them an error of its own."""
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.loop import generate

    gen = tiny().generator
    rng = np.random.default_rng(3)
    reference = rng.integers(0, gen.codebook_size, (2, 2, gen.positions)).astype(np.int32)
    force = rng.random((2, gen.positions, 2)) < 0.5
    conditioned = {**request([1, 2], seed=5), "reference_indices": reference, "force_mask": force}
    half = {**request([4], seed=5), "force_mask": force[:1]}
    for _ in range(2):
        results = server.infer([conditioned, request([3], seed=6), half])
        want = generate(OrtBackend(repository[1]), [1, 2], SamplingParams(seed=5), reference=reference, force=force)
        np.testing.assert_array_equal(results[0]["indices"], want.indices)
        forced = force.transpose(0, 2, 1)
        np.testing.assert_array_equal(results[0]["indices"][forced], reference[forced])
        check(results[1], alone, [3], seed=6)
        assert isinstance(results[2], TritonError) and "give both or neither" in results[2].message()


def test_the_model_refuses_to_load_without_engines(repository, pb2, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository[0], repo)
    shutil.rmtree(repo / MODEL / "1" / "bundle" / "engines")
    with installed(), Server(repo, pb2) as server, pytest.raises(EngineError, match="imagefolder-export trt"):
        server.load(MODEL)


def test_a_last_partial_batch_is_padded_and_the_padding_dropped(repository, pb2, alone, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository[0], repo)
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "1,2"', 'string_value: "2"'))  # serve batch 2 only
    with installed(), Server(repo, pb2) as server:
        server.load(MODEL)
        assert list(server.model.sessions) == [2]
        results = server.infer([request([5], seed=1), request([6, 7], seed=2)])  # 3 images: 2 + (1 + padding)
        check(results[0], alone, [5], seed=1)
        check(results[1], alone, [6, 7], seed=2)
        assert server.model.sessions[2].generations == 2


def test_the_export_command_writes_the_repository(bundle, tmp_path, pb2):
    from click.testing import CliRunner

    from imagefolder.cli.export import main

    args = ["triton", str(bundle), "--out", str(tmp_path / "repo"), "--batch", "8", "--max-batch-size", "16"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = parse(pb2, (tmp_path / "repo" / MODEL / "config.pbtxt").read_text())
    assert config.max_batch_size == 16 and list(config.dynamic_batching.preferred_batch_size) == [8]


# ---------------------------------------------------------------------------------------------------------------------
# The ort repository: KIND_CPU instances on ONNX Runtime (the real server runs it in test_triton_server.py)


@pytest.fixture(scope="module")
def ort_repository(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("ort-repo")
    export_triton_repository(repository[1], repo, backend="ort", instances=2, batches=[1, 2, 4])
    return repo


def test_ort_repository_config_and_files(ort_repository, repository, pb2):
    config = parse(pb2, (ort_repository / MODEL / "config.pbtxt").read_text())
    (group,) = config.instance_group
    assert group.kind == pb2.ModelInstanceGroup.KIND_CPU and group.count == 2
    assert config.max_batch_size == 32 and list(config.dynamic_batching.preferred_batch_size) == []
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["backend"] == "ort" and parameters["batches"] == "1,2,4"
    copy = ort_repository / MODEL / "1" / "bundle"
    assert not (copy / "engines").exists()  # the graphs and the manifest only
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in repository[1].iterdir() if p.is_file())


def test_ort_instances_serve_what_each_image_gets_alone(ort_repository, pb2, alone):
    import os

    with Server(ort_repository, pb2) as server:  # no fake GPU installed: the ort path needs none
        server.load(MODEL, kind="CPU")
        assert sorted(server.model.sessions) == [1, 2, 4]
        threads = server.model.backend._options.intra_op_num_threads
        assert threads == max(1, len(os.sched_getaffinity(0)) // 2)  # two instances share the CPUs
        results = server.infer([request(labels, **settings) for labels, settings in CONCURRENT])
        for result, (labels, settings) in zip(results, CONCURRENT, strict=True):
            check(result, alone, labels, **settings)
        (result,) = server.infer([request([4, 5, 6, 7, 8], seed=3, top_k=30)])  # 4 + 1
        check(result, alone, [4, 5, 6, 7, 8], seed=3, top_k=30)


def test_bad_requests_name_the_input_on_ort(ort_repository, pb2, alone):
    with Server(ort_repository, pb2) as server:
        server.load(MODEL, kind="CPU")
        results = server.infer(
            [request([10]), request([1, 2], cfg=[1.0, float("nan")]), request([5], top_p=0.0), request([3], seed=9)]
        )
        assert results[0].message() == "class_labels: class id(s) [10] outside [0, 10) for this model"
        assert results[1].message() == "row 1: cfg must be a finite number ≥ 0, got nan"
        assert results[2].message() == "row 0: top_p must be in (0, 1], got 0.0"
        check(results[3], alone, [3], seed=9)


def test_the_export_refuses_what_the_backend_cannot_run(repository, tmp_path):
    from click.testing import CliRunner

    from imagefolder.cli.export import main
    from imagefolder.errors import BundleError

    bf16 = write_fake_bundle(tmp_path / "bf16", make_manifest(tiny(), dtype="bf16"))
    with pytest.raises(BundleError, match="a bf16 bundle does not run on ONNX Runtime's CPU provider"):
        export_triton_repository(bf16, tmp_path / "repo", backend="ort")
    with pytest.raises(ValueError, match=r"must lie in \[1, 8\]"):
        export_triton_repository(repository[1], tmp_path / "repo", backend="ort", batches=[16])
    damaged = tmp_path / "damaged"
    shutil.copytree(repository[1], damaged, ignore=shutil.ignore_patterns("engines"))
    graph = damaged / "sampler.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + bytes([graph.read_bytes()[-1] ^ 1]))
    for backend, bundle, reason in (
        ("ort", damaged, "sampler.onnx differs from the manifest (sha256 or size); re-export the bundle"),
        ("trt", damaged, "has no TensorRT engines"),
    ):
        out = tmp_path / f"repo-{backend}"
        args = ["triton", str(bundle), "--out", str(out), "--backend", backend]
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("Error: ") and reason in result.output, result.output
        assert not out.exists()  # nothing half-written


def test_serve_without_the_server_says_how_to_install_it_in_one_line(monkeypatch, tmp_path):
    import importlib.util

    from click.testing import CliRunner

    from imagefolder.cli.main import main
    from imagefolder.runtime import triton_server

    if triton_server.unsupported_platform():
        pytest.skip(triton_server.unsupported_platform())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    result = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert result.exit_code != 0 and result.output == (
        "Error: tritonserver (nvidia-pytriton) is not installed to serve a repository: "
        "pip install --no-deps 'nvidia-pytriton==0.7.0'; docs/triton.md, serve on a CPU machine\n"
    )
