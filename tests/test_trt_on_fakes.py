"""The TensorRT path of the product end to end on the strict fakes (tests/fakes), for TensorRT 10.3 and 11.4.

``build_engines`` on an exported tiny bundle, ``TrtBackend`` generating eagerly and with its whole generation
replayed as one CUDA graph (tokens identical to ``OrtBackend`` for the same seed, since the fake runs the same
graphs on ONNX Runtime; launches counted by the fake device), a capture the fake refuses, ``imagefolder-export
check --backend trt``, the profiler, plans refused on another GPU or TensorRT, and conditioned generation
(reference tokens and force masks in the captured upload). Every test ends with no
TensorRT error logged and no device fault unless it provokes one: a broken rule anywhere fails it. What the
fakes cannot show (speed, TF32/fp16 rounding, real kernels) is tests/test_trt_gpu.py's job on a real GPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tests.fakes import installed

VERSIONS = ["10.3.0", "11.4.0"]
BATCHES = [1, 4]
GREEDY = {"cfg": 1.5, "top_k": 1, "top_p": 1.0, "seed": 0}
SAMPLED = {"cfg": 2.0, "top_k": 20, "top_p": 0.9, "seed": 3}
LABELS = {1: [4], 4: [1, 7, 0, 9]}
# Four generations of one session, each with other labels or settings: eager, captured, replayed, replayed.
RUNS = {
    batch: [(GREEDY, labels), (SAMPLED, labels), (SAMPLED | {"seed": 4}, [9] * batch), (GREEDY, labels[::-1])]
    for batch, labels in LABELS.items()
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from tests.models import randomized

    config = tiny()
    tokenizer, generator = randomized(config)
    return export_bundle(
        tmp_path_factory.mktemp("fake-trt"), tokenizer, generator, config, dtype="fp32", progress=False
    )


@pytest.fixture(scope="module", params=VERSIONS)
def built(request, exported, tmp_path_factory):
    """(bundle, TensorRT version): the exported bundle with engines built by the fake TensorRT of that version."""
    from imagefolder.export.trt_build import build_engines

    root = tmp_path_factory.mktemp(f"trt-{request.param}") / "bundle"
    shutil.copytree(exported, root)
    with installed(request.param) as gpu:
        build_engines(root, batches=BATCHES, progress=False, tf32=False)
        assert not gpu.trt_errors() and not gpu.cuda.faults
    return root, request.param


@pytest.fixture
def gpu(built):
    """The fakes of the build's TensorRT version on the same fake GPU; no error or fault may be left at the end."""
    with installed(built[1]) as fake:
        yield fake
        assert not fake.trt_errors(), fake.trt_errors()
        assert not fake.cuda.faults, fake.cuda.faults
        assert fake.cuda.sticky is None


@pytest.fixture(scope="module")
def ort_backend(exported):
    from imagefolder.runtime.backends.ort import OrtBackend

    return OrtBackend(exported)


@pytest.fixture(scope="module")
def expected(ort_backend):
    """ONNX Runtime's result for (labels, params), computed once per module."""
    cache = {}

    def get(labels, **params):
        key = (tuple(labels), tuple(sorted(params.items())))
        if key not in cache:
            cache[key] = generate(ort_backend, labels, **params)
        return cache[key]

    return get


def generate(backend, labels, session=None, reference=None, force=None, **params):
    from imagefolder.core.schedule import SamplingParams
    from imagefolder.runtime.loop import generate as run

    return run(backend, labels, SamplingParams(**params), session=session, reference=reference, force=force)


def test_engines_plans_and_record(built, gpu):
    from imagefolder.io import sha256_file

    root, version = built
    record = json.loads((root / "engines" / "build.json").read_text())
    assert record["tensorrt_version"] == version and record["gpu"] == {"name": "Fake Orin", "compute_capability": "8.7"}
    assert set(record["graphs"]) == {"encoder", "decoder", "ar_prefill", "ar_step", "sampler", "fold"}
    assert len(record["graphs"]["ar_step"]["profiles"]) == len(BATCHES) * 5  # tiny: 5 scales, 0 included
    for graph, entry in record["graphs"].items():
        plan = (root / entry["file"]).read_bytes()
        assert sha256_file(root / entry["file"]) == entry["sha256"]
        header = gpu.plan_header(plan)
        assert header["strongly_typed"], f"{graph} was built weakly typed"
        assert "TF32" not in header["flags"] and header["profiling_verbosity"] == "DETAILED"
        assert len(header["profiles"]) == len(entry["profiles"])
    assert (root / "engines" / "timing.cache").stat().st_size > 0


COUNTED = ("kernels", "memcpy", "memset", "graph_launches")  # what FakeCuda.launches sums


def launched(gpu, stream: int) -> dict:
    """A snapshot of what the fake device counted on ``stream`` (kernels, copies, captured work, graph launches)."""
    return dict(gpu.cuda.counters[stream])


def delta(before: dict, after: dict) -> dict:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)
    }


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("use_cuda_graphs", [True, False])
def test_generation_is_token_identical_to_onnx_runtime(built, gpu, expected, batch, use_cuda_graphs):
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(built[0], use_cuda_graphs=use_cuda_graphs) as backend:
        stream = backend.stream.ptr
        session = backend.session(batch)
        counted, results = [], []
        for params, labels in RUNS[batch]:
            before, launches = launched(gpu, stream), session.launches
            result = generate(backend, labels, session=session, **params)
            want = expected(labels, **params)
            np.testing.assert_array_equal(result.indices, want.indices)
            np.testing.assert_allclose(result.images, want.images, atol=1e-6)
            ran = delta(before, launched(gpu, stream))
            assert session.launches - launches == sum(
                ran.get(k, 0) for k in COUNTED
            )  # the product counts as the device
            counted.append(ran)
            results.append((result, want))
        for result, want in results:  # each result is the caller's own: no later generation overwrote it
            np.testing.assert_array_equal(result.indices, want.indices)
    eager, second, *later = counted
    assert eager["kernels"] == 1 + 5 + 5 + 4 + 1 and "captured" not in eager  # prefill, step/sample ×5, fold ×4, decode
    if use_cuda_graphs:
        assert second["captured"] > eager["kernels"] and second == {"captured": second["captured"], "graph_launches": 1}
        assert all(ran == {"graph_launches": 1} for ran in later)  # one launch per generation, nothing else
    else:
        assert all(ran == eager for ran in counted)


def test_two_sessions_interleaved_replay_their_own_buffers(built, gpu, expected):
    """A, B, A, B, ... with other labels and seeds each time: a replay that read stale inputs, or the other
    session's buffers, would give the other session's or the previous request's tokens."""
    from imagefolder.runtime.backends.trt import TrtBackend

    requests = {
        "A": [(GREEDY, [1]), (SAMPLED, [2]), (SAMPLED | {"seed": 7}, [3]), (GREEDY | {"cfg": 3.0}, [4])],
        "B": [(SAMPLED | {"seed": 9}, [5]), (GREEDY, [6]), (SAMPLED | {"top_k": 5}, [7]), (SAMPLED, [8])],
    }
    with TrtBackend(built[0]) as backend:
        sessions = {name: backend.session(1) for name in requests}
        for turn in range(4):
            for name, session in sessions.items():
                params, labels = requests[name][turn]
                launches = session.launches
                result = generate(backend, labels, session=session, **params)
                np.testing.assert_array_equal(result.indices, expected(labels, **params).indices)
                np.testing.assert_allclose(result.images, expected(labels, **params).images, atol=1e-6)
                if turn >= 2:
                    assert session.launches - launches == 1
        assert all(s.graph is not None for s in sessions.values())
        assert sessions["A"].graph_key != sessions["B"].graph_key


def test_replayed_outputs_equal_eager_outputs(built, gpu):
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(built[0]) as backend:
        eager, graph = backend.session(4), backend.session(4)
        eager.use_graph = False
        for params, labels in RUNS[4]:
            a = generate(backend, labels, session=eager, **params)
            b = generate(backend, labels, session=graph, **params)
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.images, b.images)
        assert eager.graph is None and graph.graph is not None
        assert eager.launches == 4 * (graph.launches - 3)  # graph: eager, then three generations of one launch each


def test_a_one_shot_generate_captures_nothing(built, gpu, expected):
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(built[0]) as backend:
        result = generate(backend, LABELS[4], **GREEDY)  # one batch: one session, one generation
        counts = launched(gpu, backend.stream.ptr)
    np.testing.assert_array_equal(result.indices, expected(LABELS[4], **GREEDY).indices)
    assert counts["kernels"] > 0 and "captured" not in counts and "graph_launches" not in counts


def test_a_long_request_replays_from_its_third_batch(built, gpu, expected):
    # Twelve images on a batch-4 session: eager, captured, replayed (batch_max 4 through a bundle copy).
    from imagefolder.core.bundle import load_bundle
    from imagefolder.runtime.backends.trt import TrtBackend

    bundle = load_bundle(built[0], verify=False)
    bundle.manifest["batch_max"] = 4
    labels = [i % 10 for i in range(12)]
    with TrtBackend(bundle) as backend:
        result = generate(backend, labels, **SAMPLED)
        counts = launched(gpu, backend.stream.ptr)
    np.testing.assert_array_equal(result.indices, expected(labels, **SAMPLED).indices)
    assert counts["graph_launches"] == 2 and counts["captured"] > 0


@pytest.mark.parametrize("refusal", ["begin capture", "enqueue under capture", "instantiate"])
def test_a_refused_capture_leaves_the_session_eager_with_one_warning(built, expected, refusal, caplog, monkeypatch):
    from imagefolder.runtime.backends.trt import TrtBackend
    from tests.fakes.cudart import cudaError_t

    with installed(built[1]) as fake, TrtBackend(built[0]) as backend:
        session = backend.session(1)
        generate(backend, [1], session=session, **GREEDY)  # eager: TensorRT's set-up work done
        if refusal == "begin capture":
            monkeypatch.setattr(
                fake.cudart, "cudaStreamBeginCapture", lambda *a: (cudaError_t.cudaErrorStreamCaptureUnsupported,)
            )
        elif refusal == "instantiate":
            monkeypatch.setattr(
                fake.cudart, "cudaGraphInstantiate", lambda *a: (cudaError_t.cudaErrorInvalidValue, None)
            )
        else:  # the fake's own rule: an enqueue that must redo set-up work invalidates the capture
            object.__setattr__(session.contexts["sample", 2].trt_context, "_setup", True)
        caplog.set_level("WARNING")
        for params, labels in RUNS[1]:
            result = generate(backend, labels, session=session, **params)
            np.testing.assert_array_equal(result.indices, expected(labels, **params).indices)
        counts = launched(fake, backend.stream.ptr)
        assert session.capture_failed and session.graph is None and "graph_launches" not in counts
        assert fake.cuda.sticky is None
    warnings = [r for r in caplog.records if "capturing the generation as a CUDA graph failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_encode_and_decode_match_onnx_runtime(built, gpu, ort_backend):
    from imagefolder.runtime.backends.trt import TrtBackend

    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 64, 64)).astype(np.float32)
    with TrtBackend(built[0]) as backend:
        indices = backend.encode(images)
        np.testing.assert_array_equal(indices, ort_backend.encode(images))
        np.testing.assert_allclose(backend.decode(indices), ort_backend.decode(indices), atol=1e-6)


def test_check_engines_passes(built, gpu):
    from imagefolder.runtime.engine_check import check_engines

    report = check_engines(built[0])
    assert report.ok and len(report.rows) > 20
    assert all(row["value"] == 0 for row in report.rows)  # the fake runs the very graphs ONNX Runtime runs


def test_cli_builds_checks_generates_and_profiles(built, gpu, tmp_path):
    from imagefolder.cli.export import main as export_main
    from imagefolder.cli.main import main

    root = tmp_path / "bundle"
    shutil.copytree(built[0], root)
    shutil.rmtree(root / "engines")

    def run(command, *args):
        result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run(export_main, "trt", root, "--batch", "1")
    assert "ar_step" in run(export_main, "check", root, "--backend", "trt")
    run(main, "generate", "--bundle", root, "--backend", "trt", "--class", "3", "-o", tmp_path / "out.png")
    assert not any(c["captured"] for c in gpu.cuda.counters.values())  # one batch: eager, nothing captured
    report = tmp_path / "profile.json"
    table = run(main, "profile", "--bundle", root, "--backend", "trt", "--runs", "2", "--warmup", "1", "--json", report)
    eager, graph = json.loads(report.read_text())["reports"]
    assert (eager["mode"], graph["mode"]) == ("eager", "graph") and eager["runs"] == graph["runs"] == 2
    assert len(eager["stages"]) == 16 and all(s["device_ms"] for s in eager["stages"])  # CUDA events per stage
    assert [s["label"] for s in graph["stages"]] == ["generation"] and graph["stages"][0]["device_ms"]["n"] == 2
    assert graph["launches_per_generation"] == 1 and eager["launches_per_generation"] > 16
    assert "CUDA graph, whole generation" in table and "launches per generation (batch 1): 1" in table


def test_layer_profile_and_inspector(built, gpu, tmp_path):
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(built[0], layer_profile=True) as backend:
        assert not backend.use_cuda_graphs  # a profiler makes every enqueue synchronous: no capture
        generate(backend, [2], **GREEDY)
        times = backend.layer_times()
        assert times["ar_step"] and all(v for v in times["ar_step"].values())
        paths = backend.inspect(tmp_path)
    info = json.loads((tmp_path / "ar_step.engine.json").read_text())
    assert {p.name for p in paths} >= {"ar_step.engine.json"} and info["Layers"][0]["Origin"] == "ONNX"


@pytest.mark.parametrize("elsewhere", ["another GPU", "another TensorRT"])
def test_engines_are_refused_on_another_gpu_or_tensorrt(built, elsewhere):
    from imagefolder.core.engines import EngineMismatch
    from imagefolder.runtime.backends.trt import TrtBackend

    root, version = built
    other = {
        "another GPU": dict(trt_version=version, gpu_name="Fake Thor", compute_capability=(11, 0)),
        "another TensorRT": dict(trt_version=VERSIONS[1 - VERSIONS.index(version)]),
    }[elsewhere]
    with installed(**other), pytest.raises(EngineMismatch, match="imagefolder-export trt"):
        TrtBackend(root)


def test_a_plan_the_runtime_cannot_deserialise_is_refused(built, tmp_path):
    # The record claims this TensorRT, the plan is from the other one: the fake runtime returns None.
    from imagefolder.core.engines import EngineMismatch
    from imagefolder.runtime.backends.trt import TrtBackend

    root, version = built
    other = VERSIONS[1 - VERSIONS.index(version)]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    record = json.loads((copy / "engines" / "build.json").read_text())
    record["tensorrt_version"] = other
    (copy / "engines" / "build.json").write_text(json.dumps(record))
    with installed(other) as fake, pytest.raises(EngineMismatch, match="could not deserialise"):
        TrtBackend(copy)
    assert "expecting library version" in fake.trt_errors()[0]


def test_an_unbuilt_batch_is_refused(built, gpu):
    from imagefolder.errors import EngineError
    from imagefolder.runtime.backends.trt import TrtBackend

    with TrtBackend(built[0]) as backend, pytest.raises(EngineError, match="rebuild with"):
        backend.session(3)
    assert not gpu.cuda.live_allocations()  # the half-made session and the backend freed everything


@pytest.mark.parametrize("cache", ["from the other TensorRT", "damaged"])
def test_a_foreign_or_damaged_timing_cache_is_replaced(built, tmp_path, cache, caplog):
    from imagefolder.export.trt_build import build_engines

    root, version = built
    other = VERSIONS[1 - VERSIONS.index(version)]
    with installed(other) as fake:
        config = fake.trt.Builder(fake.trt.Logger()).create_builder_config()
        foreign = bytes(config.create_timing_cache(b"").serialize())
    path = tmp_path / "timing.cache"
    path.write_bytes(foreign if cache.startswith("from") else b"damaged")
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    with installed(version) as fake:
        build_engines(copy, batches=[1], graphs=["sampler"], timing_cache=path, progress=False)
        assert len(fake.trt_errors()) == 1 and "imingCache" in fake.trt_errors()[0]  # TensorRT reports it once
        assert fake.plan_header((copy / "engines" / "sampler.plan").read_bytes())["tensorrt_version"] == version
    assert "starting a new one" in caplog.text
    with installed(version) as fake:  # the cache written back is this device's and version's own
        config = fake.trt.Builder(fake.trt.Logger()).create_builder_config()
        assert config.set_timing_cache(config.create_timing_cache(path.read_bytes()), False)


def test_dla_and_hardware_compatibility_reach_the_builder(built, tmp_path):
    from imagefolder.errors import InputError
    from imagefolder.export.trt_build import EngineBuildError, build_engines

    root, version = built
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    with installed(version, num_dla_cores=2) as fake:
        build_engines(copy, batches=[1], graphs=["encoder", "sampler"], dla_core=1, progress=False)
        encoder = fake.plan_header((copy / "engines" / "encoder.plan").read_bytes())
        sampler = fake.plan_header((copy / "engines" / "sampler.plan").read_bytes())
    assert (encoder["device_type"], encoder["dla_core"]) == ("DLA", 1) and "GPU_FALLBACK" in encoder["flags"]
    assert sampler["device_type"] == "GPU"  # the generator graphs never go to the DLA
    with installed(version), pytest.raises(InputError, match="0 DLA cores"):
        build_engines(copy, batches=[1], graphs=["encoder"], dla_core=0, progress=False)
    with installed(version) as fake:
        if version.startswith("10."):
            with pytest.raises(EngineBuildError, match="needs TensorRT 11"):
                build_engines(copy, batches=[1], graphs=["sampler"], hardware_compat="same_cc", progress=False)
        else:
            build_engines(copy, batches=[1], graphs=["sampler"], hardware_compat="same_cc", progress=False)
            header = fake.plan_header((copy / "engines" / "sampler.plan").read_bytes())
            assert header["hardware_compatibility_level"] == "SAME_COMPUTE_CAPABILITY"


def test_a_refused_optimization_profile_fails_the_build_and_names_it(built, tmp_path, monkeypatch):
    from imagefolder.export.trt_build import EngineBuildError, build_engines

    root, version = built
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    with installed(version) as fake:
        config_class = type(fake.trt.Builder(fake.trt.Logger()).create_builder_config())
        add = config_class.add_optimization_profile

        def refuse_the_third(self, profile):  # what TensorRT returns for a profile it finds invalid
            return -1 if self.num_optimization_profiles == 2 else add(self, profile)

        monkeypatch.setattr(config_class, "add_optimization_profile", refuse_the_third)
        with pytest.raises(EngineBuildError, match=r"ar_step: TensorRT refused optimization profile 2 \(batch 1, "):
            build_engines(copy, batches=[1], graphs=["ar_step"], progress=False)


def test_cache_layers_of_an_unaligned_size_are_padded_and_still_give_onnx_runtime_tokens(tmp_path):
    """A model whose per-layer cache (N, Hd, P, D) is not a multiple of TensorRT's 256-byte address alignment
    (width 40, 5 heads of 8: 2·5·66·8·4 = 21120 bytes at batch 1): each layer starts at a padded, aligned
    address, the step's keys/values are copied in layer by layer, and the tokens stay ONNX Runtime's."""
    import dataclasses

    from imagefolder.configs import tiny
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.trt_build import build_engines
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.backends.trt import TrtBackend
    from tests.models import randomized

    base = tiny()
    config = dataclasses.replace(base, generator=dataclasses.replace(base.generator, width=40, heads=5, depth=2))
    bundle = export_bundle(tmp_path / "b", *randomized(config), config, dtype="fp32", batch_max=1, progress=False)
    want = [generate(OrtBackend(bundle), [3], **params) for params in (GREEDY, SAMPLED)]
    with installed(VERSIONS[0]) as gpu:
        build_engines(bundle, batches=[1], progress=False, tf32=False)
        with TrtBackend(bundle) as backend:
            session = backend.session(1)
            assert session.cache_stride % 256 == 0 and session.cache_stride > 2 * 5 * 66 * 8 * 4
            for _ in range(2):  # eager, then the captured whole generation
                for params, expected in zip((GREEDY, SAMPLED), want, strict=True):
                    np.testing.assert_array_equal(
                        generate(backend, [3], session=session, **params).indices, expected.indices
                    )
        assert not gpu.trt_errors() and not gpu.cuda.faults


def _conditions(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference indices (B, 2, P) and force masks (B, P, 2) for a batch: image 0 keeps the detail branch,
    image 1 (if any) is unconditioned, the others keep random tokens."""
    from imagefolder.configs import tiny
    from imagefolder.core.conditioning import force_mask

    gen = tiny().generator
    rng = np.random.default_rng(batch)
    reference = rng.integers(0, gen.codebook_size, (batch, 2, gen.positions)).astype(np.int32)
    force = rng.random((batch, gen.positions, 2)) < 0.5
    force[0] = force_mask(gen.scales, keep="detail")
    if batch > 1:
        force[1] = False
    return reference, force


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("use_cuda_graphs", [True, False])
def test_conditioned_generation_is_token_identical_to_onnx_runtime_and_torch(
    built, gpu, ort_backend, exported, batch, use_cuda_graphs
):
    """Conditioned requests (reference tokens and masks differing per image and per generation) on TensorRT, eager
    and replayed as one CUDA graph, give ONNX Runtime's and the torch reference's tokens, forced ones included,
    with one launch per replayed generation: the reference inputs travel in the captured upload."""
    from imagefolder.configs import tiny
    from imagefolder.core.bundle import load_bundle
    from imagefolder.runtime.backends.torch_backend import TorchBackend
    from imagefolder.runtime.backends.trt import TrtBackend
    from tests.models import randomized

    tokenizer, generator = randomized(tiny())
    torch_backend = TorchBackend(tokenizer, generator, load_bundle(exported).candidates)
    labels = LABELS[batch]
    with TrtBackend(built[0], use_cuda_graphs=use_cuda_graphs) as backend:
        session = backend.session(batch)
        for turn, params in enumerate([SAMPLED, GREEDY, SAMPLED | {"seed": 11}, SAMPLED]):
            reference, force = _conditions(batch + turn)[0][:batch], _conditions(batch)[1]
            if turn == 3:
                force = np.zeros_like(force)  # nothing forced: the unconditioned tokens
            launches = session.launches
            got = generate(backend, labels, session=session, reference=reference, force=force, **params)
            want = generate(ort_backend, labels, reference=reference, force=force, **params)
            np.testing.assert_array_equal(got.indices, want.indices)
            np.testing.assert_allclose(got.images, want.images, atol=1e-6)
            np.testing.assert_array_equal(
                generate(torch_backend, labels, reference=reference, force=force, **params).indices, got.indices
            )
            forced = force.transpose(0, 2, 1)
            np.testing.assert_array_equal(got.indices[forced], reference[forced])
            if turn == 3:
                np.testing.assert_array_equal(got.indices, generate(ort_backend, labels, **params).indices)
            if use_cuda_graphs and turn >= 2:
                assert session.launches - launches == 1
        assert (session.graph is not None) == use_cuda_graphs
