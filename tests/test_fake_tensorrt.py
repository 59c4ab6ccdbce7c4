"""The fake TensorRT (tests/fakes): it exposes no name the real 10.3/11.4 bindings lack, it covers every name the
product uses, and each TensorRT rule broken on purpose fails the way TensorRT does (False, None, -1, a
RuntimeError, a logged error, or a device fault)."""

from __future__ import annotations

import enum

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from imagefolder.export.trt_build import VERSIONED_NAMES
from tests.fakes import installed
from tests.fakes import tensorrt as fake_tensorrt
from tests.fakes.cudart import cudaError_t
from tests.reference import TENSORRT_API
from tests.test_trt_api_names import SOURCES, Api, collect

VERSIONS = ["10.3.0", "11.4.0"]
E = cudaError_t


# ---------------------------------------------------------------------------------------------------------------------
# Names


def exposed(trt) -> set[str]:
    """Every public name of the fake module: module attributes, enum members, class members."""
    names = set()
    classes = [fake_tensorrt.IHostMemory]  # returned, never exposed by name
    for name in dir(trt):
        if name.startswith("_"):
            continue
        names.add(name)
        obj = getattr(trt, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            names |= {member.name for member in obj}
        elif isinstance(obj, type):
            classes.append(obj)
    for cls in classes:
        for klass in cls.__mro__:
            if klass.__module__ in ("tensorrt",) or klass.__module__.startswith("tests.fakes"):
                names |= {attr for attr in vars(klass) if not attr.startswith("_")}
    return names


@pytest.mark.parametrize("version", VERSIONS)
def test_every_public_name_exists_in_the_real_bindings(version):
    api = Api(TENSORRT_API, version[:4])
    with installed(version) as gpu:
        names = exposed(gpu.trt)
    assert len(names) > 100
    missing = sorted(name for name in names if not api.has(name))
    assert not missing, f"the fake TensorRT {version} offers names the real one lacks: {missing}"


def test_version_specific_members_follow_the_listings():
    with installed("10.3.0") as gpu:
        trt10 = gpu.trt
        assert trt10.__version__ == "10.3.0"
        assert {"EXPLICIT_BATCH", "STRONGLY_TYPED"} <= set(trt10.NetworkDefinitionCreationFlag.__members__)
        assert "FP16" in trt10.BuilderFlag.__members__
        assert "SAME_COMPUTE_CAPABILITY" not in trt10.HardwareCompatibilityLevel.__members__
    with installed("11.4.0") as gpu:
        trt11 = gpu.trt
        assert "EXPLICIT_BATCH" not in trt11.NetworkDefinitionCreationFlag.__members__
        assert int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0  # kept, deprecated, ignored
        assert not {"FP16", "BF16", "INT8"} & set(trt11.BuilderFlag.__members__)
        assert "SAME_COMPUTE_CAPABILITY" in trt11.HardwareCompatibilityLevel.__members__


@pytest.mark.parametrize("version", VERSIONS)
def test_the_fake_covers_every_name_the_product_uses(version):
    used = {"module": set(), "object": set(), "override": set()}
    for path in SOURCES:
        for kind, names in collect(path.read_text()).items():
            if kind in used:
                used[kind] |= names
    with installed(version) as gpu:
        trt, major = gpu.trt, int(version[:2])
        members = exposed(trt)
    missing = []
    for chain in used["module"]:
        if chain in VERSIONED_NAMES and major not in VERSIONED_NAMES[chain]:
            continue
        obj = trt
        for part in chain.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(f"trt.{chain}")
    missing += [f"<trt object>.{name}" for name in used["object"] | used["override"] if name not in members]
    assert not missing, f"the product uses names the fake TensorRT {version} lacks: {sorted(missing)}"


def test_objects_refuse_unknown_attributes(fake_gpu):
    trt = fake_gpu.trt
    config = trt.Builder(trt.Logger()).create_builder_config()
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 20  # removed in TensorRT 10; pybind objects refuse unknown attributes
    with pytest.raises(TypeError):
        config.profiling_verbosity = "detailed"


# ---------------------------------------------------------------------------------------------------------------------
# Builder


def write_model(path, nodes=None, inputs=None, external: bool = False, opset: int = 17):
    """y = x * w + x, x float (N, 4) with a dynamic N; or the given nodes/inputs."""
    w = numpy_helper.from_array(np.full(4, 2.0, np.float32), "w")
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    nodes = nodes or [
        helper.make_node("Mul", ["x", "w"], ["t"], name="scale"),
        helper.make_node("Add", ["t", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, location="weights.bin", size_threshold=0)
    return path


def network(trt, path, logger=None):
    logger = logger or trt.Logger()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    net = builder.create_network(flags)
    parser = trt.OnnxParser(net, logger)
    return builder, net, parser, parser.parse_from_file(str(path))


def build(trt, path, profiles=(((1, 4), (2, 4), (4, 4)),), configure=None):
    builder, net, parser, parsed = network(trt, path)
    assert parsed, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    for low, opt, high in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape("x", low, opt, high)
        assert config.add_optimization_profile(profile) >= 0
    if configure:
        configure(config)
    return builder.build_serialized_network(net, config)


@pytest.mark.parametrize("fake_gpu", VERSIONS, indirect=True)
def test_parser_reports_every_unsupported_node(fake_gpu, tmp_path):
    trt = fake_gpu.trt
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="uniq"),
        helper.make_node("FancyOp", ["x"], ["f"], name="custom", domain="com.example"),
        helper.make_node("Add", ["x", "x"], ["y"], name="ok"),
    ]
    _, net, parser, parsed = network(trt, write_model(tmp_path / "m.onnx", nodes=nodes))
    assert not parsed and parser.num_errors == 2 and net.num_inputs == 0
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    assert [(e.node(), e.node_name(), e.node_operator()) for e in errors] == [
        (0, "uniq", "Unique"),
        (1, "custom", "FancyOp"),
    ]
    assert all(e.code() == trt.ErrorCode.UNSUPPORTED_NODE and "No importer" in e.desc() for e in errors)
    assert parser.get_error(2) is None


def test_parser_resolves_external_data_beside_the_file_and_refuses_bad_opsets(fake_gpu, tmp_path, monkeypatch):
    trt = fake_gpu.trt
    path = write_model(tmp_path / "model" / "m.onnx", external=True)
    assert (tmp_path / "model" / "weights.bin").is_file()
    monkeypatch.chdir(tmp_path)  # not the model's folder
    _, net, parser, parsed = network(trt, path)
    assert parsed and net.num_inputs == 1 and net.get_input(0).name == "x" and net.get_input(0).shape == (-1, 4)
    (tmp_path / "model" / "weights.bin").unlink()
    _, _, parser, parsed = network(trt, path)
    assert not parsed and parser.get_error(0).code() == trt.ErrorCode.MODEL_DESERIALIZE_FAILED
    _, _, parser, parsed = network(trt, write_model(tmp_path / "new.onnx", opset=21))
    assert not parsed and "opset 21" in parser.get_error(0).desc()  # TensorRT 10.x parses opsets 9-20


def test_an_input_whose_values_become_a_shape_is_a_shape_tensor(fake_gpu, tmp_path):
    trt = fake_gpu.trt
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
    ]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Add", ["r", "r"], ["y"])]
    _, net, _, parsed = network(trt, write_model(tmp_path / "m.onnx", nodes=nodes, inputs=inputs))
    assert parsed
    flags = {net.get_input(i).name: net.get_input(i).is_shape_tensor for i in range(net.num_inputs)}
    assert flags == {"x": False, "shape": True}


def test_profiles_validate_their_shapes(fake_gpu):
    trt = fake_gpu.trt
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    assert config.add_optimization_profile(profile) == -1  # an empty profile is invalid
    with pytest.raises(RuntimeError, match="opt is inconsistent"):
        profile.set_shape("x", (2, 4), (1, 4), (4, 4))  # min > opt
    with pytest.raises(RuntimeError, match="max is inconsistent"):
        profile.set_shape("x", (1, 4), (2, 4), (4, 4, 1))  # rank differs
    profile.set_shape("x", (1, 4), (2, 4), (4, 4))
    assert [config.add_optimization_profile(profile) for _ in range(2)] == [0, 1]
    assert profile.get_shape("x") == [(1, 4), (2, 4), (4, 4)]


@pytest.mark.parametrize(
    "case", ["no profile", "missing input", "unknown input", "rank", "fixed dim", "opt level", "dla core"]
)
def test_invalid_builds_return_none_and_log_why(fake_gpu, tmp_path, case):
    trt = fake_gpu.trt
    path = write_model(tmp_path / "m.onnx")
    profiles = {
        "no profile": (),
        "rank": (((1, 4, 1), (1, 4, 1), (1, 4, 1)),),
        "fixed dim": (((1, 5), (1, 5), (1, 5)),),
    }.get(case, (((1, 4), (1, 4), (1, 4)),))

    def configure(config):
        if case in ("missing input", "unknown input"):
            profile = trt.Builder(trt.Logger()).create_optimization_profile()
            profile.set_shape("x" if case == "unknown input" else "other", (1, 4), (1, 4), (1, 4))
            if case == "unknown input":
                profile.set_shape("other", (1,), (1,), (1,))
            config.add_optimization_profile(profile)
        if case == "opt level":
            config.builder_optimization_level = 6
        if case == "dla core":
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = 0  # the fake GPU has no DLA (as Orin Nano and Thor)

    assert build(trt, path, profiles, configure) is None
    assert any("buildSerializedNetwork" in message for message in fake_gpu.trt_errors())


def test_progress_monitor_sees_the_build_and_can_cancel_it(fake_gpu, tmp_path):
    trt = fake_gpu.trt
    seen = []

    class Monitor(trt.IProgressMonitor):
        def __init__(self, cancel):
            trt.IProgressMonitor.__init__(self)
            self.cancel = cancel

        def phase_start(self, phase_name, parent_phase, num_steps):
            seen.append(("start", phase_name, parent_phase, num_steps))

        def step_complete(self, phase_name, step):
            seen.append(("step", step))
            return not self.cancel

        def phase_finish(self, phase_name):
            seen.append(("finish", phase_name))

    class Careless(Monitor):
        def __init__(self):  # forgets the base __init__, which pybind11 refuses
            pass

    path = write_model(tmp_path / "m.onnx")

    def attach(monitor):
        return lambda config: setattr(config, "progress_monitor", monitor)

    assert build(trt, path, configure=attach(Monitor(cancel=False))) is not None
    assert seen == [("start", "Building engine", None, 1), ("step", 0), ("finish", "Building engine")]
    assert build(trt, path, configure=attach(Monitor(cancel=True))) is None
    with pytest.raises(TypeError, match="IProgressMonitor.__init__"):
        build(trt, path, configure=attach(Careless()))


def test_timing_cache_is_refused_across_devices_and_versions(tmp_path):
    with installed("10.3.0") as gpu:
        trt = gpu.trt
        config = trt.Builder(trt.Logger()).create_builder_config()
        cache = config.create_timing_cache(b"")
        assert config.set_timing_cache(cache, False)
        blob = bytes(cache.serialize())
        assert config.create_timing_cache(b"garbage") is None
    for version, gpu_name, cc in (
        ("10.3.0", "Fake Orin", (8, 7)),
        ("10.3.0", "Fake H200", (9, 0)),
        ("11.4.0", "Fake Orin", (8, 7)),
    ):
        with installed(version, gpu_name, cc) as gpu:
            trt = gpu.trt
            config = trt.Builder(trt.Logger()).create_builder_config()
            cache = config.create_timing_cache(blob)
            same = (version, cc) == ("10.3.0", (8, 7))
            assert config.set_timing_cache(cache, False) is same
            assert config.set_timing_cache(cache, True)  # ignore_mismatch


# ---------------------------------------------------------------------------------------------------------------------
# Runtime


@pytest.fixture
def plan(fake_gpu, tmp_path):
    return bytes(
        build(
            fake_gpu.trt,
            write_model(tmp_path / "m.onnx"),
            profiles=[((1, 4), (2, 4), (4, 4)), ((8, 4), (8, 4), (8, 4))],
        )
    )


class Runner:
    """One engine, one USER_MANAGED context and its buffers: the happy path, to be broken one rule at a time."""

    def __init__(self, gpu, plan, rows=2):
        self.gpu, self.trt, self.rt = gpu, gpu.trt, gpu.cudart
        self.engine = self.trt.Runtime(self.trt.Logger()).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.stream = self.ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))
        size = self.engine.get_device_memory_size_for_profile_v2(0)
        self.scratch = self.ok(self.rt.cudaMalloc(size))
        self.context.set_device_memory(self.scratch, size)
        assert self.context.set_optimization_profile_async(0, int(self.stream))
        assert self.context.set_input_shape("x", (rows, 4))
        self.x, self.y = self.ok(self.rt.cudaMalloc(rows * 16)), self.ok(self.rt.cudaMalloc(rows * 16))
        self.rows = rows
        assert self.context.set_tensor_address("x", self.x) and self.context.set_tensor_address("y", self.y)

    @staticmethod
    def ok(result):
        assert result[0] == E.cudaSuccess, result
        return result[1] if len(result) > 1 else None

    def put(self, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, np.float32)
        self.ok(
            self.rt.cudaMemcpyAsync(
                self.x, value.ctypes.data, value.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            )
        )

    def get(self) -> np.ndarray:
        out = np.empty((self.rows, 4), np.float32)
        self.ok(
            self.rt.cudaMemcpyAsync(
                out.ctypes.data, self.y, out.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            )
        )
        self.ok(self.rt.cudaStreamSynchronize(self.stream))
        return out

    def execute(self, stream=None) -> bool:
        return self.context.execute_async_v3(int(self.stream if stream is None else stream))

    def errors(self) -> str:
        return "\n".join(self.gpu.trt_errors())


@pytest.fixture
def runner(fake_gpu, plan):
    return Runner(fake_gpu, plan)


@pytest.mark.parametrize("fake_gpu", VERSIONS, indirect=True)
def test_engine_runs_the_graph_on_the_bound_memory(fake_gpu, plan):
    runner = Runner(fake_gpu, plan)
    engine, trt = runner.engine, fake_gpu.trt
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == ["x", "y"]
    assert engine.get_tensor_mode("y") == trt.TensorIOMode.OUTPUT and engine.get_tensor_dtype("x") == trt.DataType.FLOAT
    assert engine.num_optimization_profiles == 2 and engine.get_tensor_shape("x") == (-1, 4)
    assert engine.get_tensor_profile_shape("x", 1) == [(8, 4)] * 3
    assert runner.context.get_tensor_shape("y") == (2, 4)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    runner.put(x)
    assert runner.execute()
    np.testing.assert_array_equal(runner.get(), 3 * x)
    assert fake_gpu.cuda.counters[int(runner.stream)]["kernels"] == 1


def test_deserialising_garbage_returns_none(fake_gpu, plan):
    trt = fake_gpu.trt
    runtime = trt.Runtime(trt.Logger())
    assert runtime.deserialize_cuda_engine(b"not a plan") is None
    assert runtime.deserialize_cuda_engine(plan[:-1]) is None  # truncated
    assert "Magic tag" in fake_gpu.trt_errors()[0]


@pytest.mark.parametrize(
    "where", ["10.3.0 on Fake Orin 8.7", "11.4.0 on Fake Orin 8.7", "10.3.0 on Fake H200 9.0", "10.3.0 on Fake AGX 8.7"]
)
def test_plans_load_only_on_their_tensorrt_version_and_compute_capability(tmp_path, where):
    with installed("10.3.0") as gpu:
        plan = bytes(build(gpu.trt, write_model(tmp_path / "m.onnx")))
    version, _, rest = where.partition(" on ")
    name, cc = rest.rsplit(" ", 1)
    with installed(version, name, tuple(int(c) for c in cc.split("."))) as gpu:
        engine = gpu.trt.Runtime(gpu.trt.Logger()).deserialize_cuda_engine(plan)
        if where.endswith("Orin 8.7") and version == "10.3.0":  # where it was built
            assert engine is not None and not gpu.env.log
        elif where.endswith("AGX 8.7"):  # another device of the same compute capability: loads, with a warning
            assert engine is not None and any("different models of devices" in m for _, m in gpu.env.log)
        else:
            assert engine is None and "please rebuild" in gpu.trt_errors()[-1]


def test_compatible_plans_load_where_their_flags_allow(tmp_path):
    def configure(config):
        config.set_flag(config._env.trt.BuilderFlag.VERSION_COMPATIBLE)
        config.hardware_compatibility_level = config._env.trt.HardwareCompatibilityLevel.AMPERE_PLUS

    with installed("10.3.0") as gpu:
        plan = bytes(build(gpu.trt, write_model(tmp_path / "m.onnx"), configure=configure))
    with installed("11.4.0", "Fake H200", (9, 0)) as gpu:
        runtime = gpu.trt.Runtime(gpu.trt.Logger())
        assert runtime.deserialize_cuda_engine(plan) is None  # the lean runtime needs engine_host_code_allowed
        runtime.engine_host_code_allowed = True
        assert runtime.deserialize_cuda_engine(plan) is not None
    with installed("10.3.0", "Fake T4", (7, 5)) as gpu:
        runtime = gpu.trt.Runtime(gpu.trt.Logger())
        runtime.engine_host_code_allowed = True
        assert runtime.deserialize_cuda_engine(plan) is None  # AMPERE_PLUS needs compute capability 8.0+


def test_an_unset_address_fails_execution_and_names_the_tensor(fake_gpu, plan):
    runner = Runner(fake_gpu, plan)
    runner.context.set_tensor_address("y", 0)  # back to "not set"
    assert not runner.execute()
    assert "Address is not set for output tensor y" in runner.errors()
    assert fake_gpu.cuda.launches(runner.stream) == 1  # only the profile switch


def test_addresses_must_be_256_byte_aligned_and_named(runner):
    assert not runner.context.set_tensor_address("x", runner.x + 16)
    assert not runner.context.set_tensor_address("nope", runner.x)
    assert "256-byte aligned" in runner.errors() and "'nope'" in runner.errors()


def test_a_bound_region_too_small_for_the_shape_faults_on_the_device(fake_gpu, plan):
    runner = Runner(fake_gpu, plan)
    small = runner.ok(runner.rt.cudaMalloc(16))  # one row; the shape needs two
    runner.context.set_tensor_address("y", small)
    assert runner.execute()  # TensorRT cannot know: the kernel faults
    assert runner.rt.cudaStreamSynchronize(runner.stream) == (E.cudaErrorIllegalAddress,)
    assert not runner.execute() and "cudaErrorIllegalAddress" in runner.errors()  # the context stays broken
    assert "output y (2, 4)" in fake_gpu.cuda.faults[-1] and "overruns" in fake_gpu.cuda.faults[-1]


def test_a_freed_binding_faults_on_the_device(fake_gpu, plan):
    runner = Runner(fake_gpu, plan)
    runner.ok(runner.rt.cudaFree(runner.x))
    assert runner.execute()
    assert runner.rt.cudaStreamSynchronize(runner.stream) == (E.cudaErrorIllegalAddress,)
    assert "input x" in fake_gpu.cuda.faults[-1] and "freed" in fake_gpu.cuda.faults[-1]


def test_input_shapes_must_lie_in_the_active_profile(runner):
    context = runner.context
    assert not context.set_input_shape("x", (5, 4))  # profile 0 is 1..4 rows
    assert not context.set_input_shape("x", (2, 5))  # a fixed dimension
    assert not context.set_input_shape("y", (2, 4))  # not an input
    assert "satisfyProfile" in runner.errors()
    assert context.set_optimization_profile_async(1, int(runner.stream))
    assert context.set_input_shape("x", (8, 4)) and not context.set_input_shape("x", (2, 4))
    with pytest.raises(RuntimeError, match="optimization profile"):
        context.set_optimization_profile_async(2, int(runner.stream))


def test_switching_the_profile_drops_the_input_shapes(runner):
    context = runner.context
    assert context.set_optimization_profile_async(0, int(runner.stream))
    assert context.infer_shapes() == ["x"]
    assert not runner.execute() and "input shapes not specified" in runner.errors()
    assert context.set_input_shape("x", (2, 4)) and runner.execute()


def test_user_managed_memory_must_be_set_and_large_enough(fake_gpu, plan):
    trt = fake_gpu.trt
    runner = Runner(fake_gpu, plan)
    context = runner.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    context.set_input_shape("x", (2, 4))  # profile 0 by default
    context.set_tensor_address("x", runner.x)
    context.set_tensor_address("y", runner.y)
    assert not context.execute_async_v3(int(runner.stream))
    assert "device memory is not set" in runner.errors()
    need = runner.engine.get_device_memory_size_for_profile_v2(0)
    context.set_device_memory(runner.scratch, need - 256)
    assert not context.execute_async_v3(int(runner.stream))
    context.set_device_memory(runner.scratch + 8, need)  # misaligned: ignored
    assert "256-byte aligned" in runner.errors()
    context.set_device_memory(runner.scratch, need)
    assert context.execute_async_v3(int(runner.stream))
    default = runner.engine.create_execution_context()  # STATIC: TensorRT allocates it
    default.set_input_shape("x", (2, 4))
    default.set_tensor_address("x", runner.x)
    default.set_tensor_address("y", runner.y)
    assert default.execute_async_v3(int(runner.stream))


def test_execution_needs_a_live_non_default_stream(runner):
    assert not runner.execute(0)
    assert not runner.execute(0xDEAD)
    stream = runner.ok(runner.rt.cudaStreamCreateWithFlags(1))
    runner.ok(runner.rt.cudaStreamDestroy(stream))
    assert not runner.execute(stream)
    assert "default stream" in runner.errors() and "not a live CUDA stream" in runner.errors()


def test_one_context_must_not_run_on_two_streams_at_once(runner):
    other = runner.ok(runner.rt.cudaStreamCreateWithFlags(1))
    assert runner.execute()
    assert not runner.execute(other)  # the first enqueue has not been synchronised
    assert "two streams" in runner.errors()
    runner.ok(runner.rt.cudaStreamSynchronize(runner.stream))
    assert runner.execute(other)


def test_a_profile_switched_on_another_stream_must_be_synchronised_first(runner):
    other = runner.ok(runner.rt.cudaStreamCreateWithFlags(1))
    runner.context.set_optimization_profile_async(0, int(other))
    runner.context.set_input_shape("x", (2, 4))
    assert not runner.execute()
    assert "optimization profile was switched on" in runner.errors()
    runner.ok(runner.rt.cudaStreamSynchronize(other))
    assert runner.execute()


def test_an_output_must_not_alias_an_input_or_the_scratch(runner):
    runner.context.set_tensor_address("y", runner.x)
    assert not runner.execute() and "output y overlaps x" in runner.errors()
    runner.context.set_tensor_address("y", runner.scratch)
    assert not runner.execute() and "overlaps (activation memory)" in runner.errors()


def test_capture_before_a_normal_enqueue_invalidates_the_capture(runner):
    rt, stream = runner.rt, runner.stream
    runner.ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
    assert not runner.execute()  # set-up work of the first enqueue is not capturable
    assert rt.cudaStreamEndCapture(stream) == (E.cudaErrorStreamCaptureInvalidated, None)
    assert "operation not permitted when stream is capturing" in runner.errors()


def test_a_captured_enqueue_replays_on_the_memory_as_it_is_then(runner):
    rt, stream = runner.rt, runner.stream
    x = np.ones((2, 4), np.float32)
    runner.put(x)
    assert runner.execute()  # the normal run first
    runner.ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
    assert runner.execute()
    graph = runner.ok(rt.cudaStreamEndCapture(stream))
    exe = runner.ok(rt.cudaGraphInstantiate(graph, 0))
    runner.put(5 * x)
    other = runner.ok(rt.cudaMalloc(32))
    runner.context.set_tensor_address("y", other)  # a later binding does not change the captured kernel
    runner.ok(rt.cudaGraphLaunch(exe, stream))
    np.testing.assert_array_equal(runner.get(), 15 * x)
    assert runner.gpu.cuda.counters[int(stream)]["graph_launches"] == 1


def test_a_profiler_reports_layers_and_forbids_capture(fake_gpu, runner):
    trt, rt, stream = fake_gpu.trt, runner.rt, runner.stream
    times = []

    class Profiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):
            times.append((layer_name, ms))

    runner.context.profiler = Profiler()
    assert runner.execute()
    assert [name for name, _ in times] == ["scale", "residual"]
    runner.ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
    assert not runner.execute()  # a profiler makes enqueue synchronous
    assert rt.cudaStreamEndCapture(stream)[0] == E.cudaErrorStreamCaptureInvalidated


@pytest.mark.parametrize("fake_gpu", VERSIONS, indirect=True)
def test_inspector_describes_layers_by_verbosity(fake_gpu, tmp_path):
    import json

    trt = fake_gpu.trt

    def detailed(config):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    for configure, first in ((None, "scale"), (detailed, {"Name": "scale", "LayerType": "Mul", "Origin": "ONNX"})):
        plan = build(trt, write_model(tmp_path / "m.onnx"), configure=configure)
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        assert info["Layers"][0] == first
        assert info["Bindings" if trt.__version__.startswith("10") else "I/O Tensors"] == ["x", "y"]
