"""A stand-in for Triton's Python backend: ``triton_python_backend_utils`` and the server's side of the model contract.

The module part follows triton-inference-server/python_backend (``src/resources/triton_python_backend_utils.py``
and the stub's bindings): ``Tensor(name, numpy_array)``, ``InferenceRequest`` (what ``execute`` receives),
``InferenceResponse(output_tensors, error=None)``, ``TritonError(message)``, ``TritonModelException``,
``get_input_tensor_by_name``, ``get_output_tensor_by_name``, ``get_input_config_by_name``,
``get_output_config_by_name`` and ``triton_string_to_numpy``. Strict where a model could go wrong unseen:

- a ``Tensor`` takes a numpy array of a Triton data type (no lists, no object arrays) and a ``str`` name;
- tensors cross through DLPack only, as the real 2.51 stub (nvidia-pytriton) requires under numpy 2:
  ``as_numpy`` of a request's input is refused (the real one reads rows after the first wrong) and an
  output made by ``Tensor(name, array)`` instead of ``Tensor.from_dlpack`` fails the response check
  (the real one arrives empty);
- an ``InferenceResponse`` takes a list of ``Tensor`` and, for an error, a ``TritonError``;
- ``InferenceRequest.exec`` (BLS, a call to another model) is refused: this project's model calls none.

``Server`` plays the server: ``load`` parses ``config.pbtxt`` into Triton's own ``ModelConfig`` message
(``model_config_pb2`` from the ``tritonclient`` package: unknown fields, wrong types and bad enum values
fail), imports ``1/model.py`` with the stand-in module installed, and calls ``initialize`` with the
arguments the stub passes (strings; ``model_config`` as the message's JSON with proto field names).
``infer`` does what Triton does before and after ``execute``: it refuses a request with an unknown or
missing required input, a wrong data type, a shape other than (n, *dims), or n above ``max_batch_size``;
it hands every request to one ``execute`` call, as the dynamic batcher does with what it gathered (at
most ``max_batch_size`` rows in all); and it checks the answer: one ``InferenceResponse`` per request,
each with exactly the configured outputs, of their data types and shapes (n, *dims), or an error.
``unload`` calls ``finalize``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MODULE = "triton_python_backend_utils"
TYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def model_config_pb2() -> types.ModuleType | None:
    """Triton's ``model_config_pb2`` as shipped by tritonclient (loaded from its file: ``tritonclient.grpc``
    itself needs grpcio), or None where tritonclient is not installed."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# triton_python_backend_utils


class TritonModelException(Exception):
    pass


class TritonError:
    def __init__(self, message: str):
        if not isinstance(message, str):
            raise TypeError(f"TritonError takes a message string, got {type(message).__name__}")
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, numpy_array: np.ndarray):
        if not isinstance(name, str):
            raise TypeError(f"a tensor name is a str, got {type(name).__name__}")
        if not isinstance(numpy_array, np.ndarray) or numpy_array.dtype.type not in TYPES.values():
            raise TritonModelException(f"tensor {name}: a numpy array of a Triton data type is required")
        self._name, self._array = name, np.ascontiguousarray(numpy_array)
        self.via_dlpack = False  # made by from_dlpack (an output the real stub sends intact)
        self.from_stub = False  # a request's input (the real stub's as_numpy reads it wrong under numpy 2)

    @classmethod
    def from_dlpack(cls, name: str, tensor) -> Tensor:
        if not hasattr(tensor, "__dlpack__") or not hasattr(tensor, "__dlpack_device__"):
            raise TritonModelException("Tensor must be a DLPack capsule or have __dlpack__ and __dlpack_device__")
        made = cls(name, np.from_dlpack(tensor))
        made.via_dlpack = True
        return made

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if self.from_stub:
            raise AssertionError(
                f"{self._name}: as_numpy of a request input is wrong on the real stub; use np.from_dlpack"
            )
        return self._array


def _stub_input(name: str, array: np.ndarray) -> Tensor:
    tensor = Tensor(name, array)
    tensor.from_stub = True
    return tensor


class InferenceRequest:
    """A request as ``execute`` receives it."""

    def __init__(self, inputs: list[Tensor], requested_output_names: list[str], request_id: str = ""):
        self._inputs, self._outputs, self._id = list(inputs), list(requested_output_names), request_id

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._outputs)

    def request_id(self) -> str:
        return self._id

    def exec(self):
        raise TritonModelException("BLS: this model must not call other models")


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None):
        if not isinstance(output_tensors, list) or not all(isinstance(t, Tensor) for t in output_tensors):
            raise TypeError("output_tensors must be a list of pb_utils.Tensor")
        if error is not None and not isinstance(error, TritonError):
            raise TypeError(f"error must be a pb_utils.TritonError, got {type(error).__name__}")
        self._outputs, self._error = output_tensors, error

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def _by_name(items, name: str):
    return next((item for item in items if item.name() == name), None)


def _config_by_name(model_config: dict, kind: str, name: str) -> dict | None:
    return next((entry for entry in model_config.get(kind, []) if entry["name"] == name), None)


def module() -> types.ModuleType:
    """The stand-in ``triton_python_backend_utils``."""
    pb = types.ModuleType(MODULE, "stand-in for Triton's Python backend utilities (tests/fakes/triton.py)")
    for obj in (TritonModelException, TritonError, Tensor, InferenceRequest, InferenceResponse):
        setattr(pb, obj.__name__, obj)
    pb.get_input_tensor_by_name = lambda request, name: _by_name(request.inputs(), name)
    pb.get_output_tensor_by_name = lambda response, name: _by_name(response.output_tensors(), name)
    pb.get_input_config_by_name = lambda config, name: _config_by_name(config, "input", name)
    pb.get_output_config_by_name = lambda config, name: _config_by_name(config, "output", name)
    pb.triton_string_to_numpy = lambda name: TYPES[name]
    return pb


# ---------------------------------------------------------------------------------------------------------------------
# The server's side


class RefusedRequest(Exception):
    """Triton refuses the request before the model sees it."""


class Server:
    """Loads one model of a repository the way Triton's Python backend does; use as a context manager."""

    def __init__(self, repository: Path, pb2: types.ModuleType):
        self.repository, self.pb2 = Path(repository), pb2
        self.config: dict = {}
        self.model = None
        self._installed: contextlib.ExitStack | None = None

    def __enter__(self) -> Server:
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(_installed_module())
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.model is not None:
                self.unload()
        finally:
            assert self._installed is not None
            self._installed.close()

    def load(self, name: str, kind: str = "GPU", device_id: int = 0) -> None:
        from google.protobuf import json_format, text_format

        folder = self.repository / name
        message = text_format.Parse((folder / "config.pbtxt").read_text(), self.pb2.ModelConfig())
        if message.name != name or message.backend != "python":
            raise AssertionError(f"{name}: config names {message.name!r}, backend {message.backend!r}")
        if message.dynamic_batching.ByteSize() and message.max_batch_size < 1:
            raise AssertionError("dynamic batching needs max_batch_size ≥ 1")
        self.config = json_format.MessageToDict(message, preserving_proto_field_name=True)
        version = "1"  # the default version policy serves the latest version; the repository has one
        spec = importlib.util.spec_from_file_location(f"_triton_model_{name}", folder / version / "model.py")
        assert spec is not None and spec.loader is not None
        source = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(source)
        model = source.TritonPythonModel()
        model.initialize(
            {
                "model_config": json.dumps(self.config),
                "model_instance_kind": kind,
                "model_instance_name": f"{name}_0_0",
                "model_instance_device_id": str(device_id),
                "model_repository": str(folder),
                "model_version": version,
                "model_name": name,
            }
        )
        self.model = model

    def _check_request(self, inputs: dict[str, np.ndarray]) -> int:
        """Triton's checks of one request against the config; the request's batch size n."""
        specs = {entry["name"]: entry for entry in self.config["input"]}
        unknown = set(inputs) - set(specs)
        missing = [n for n, entry in specs.items() if not entry.get("optional") and n not in inputs]
        if unknown or missing:
            raise RefusedRequest(f"unknown inputs {sorted(unknown)}, missing inputs {missing}")
        sizes = set()
        for name, array in inputs.items():
            dims = [int(d) for d in specs[name]["dims"]]
            if array.dtype.type is not TYPES[specs[name]["data_type"]]:
                raise RefusedRequest(f"{name}: data type {array.dtype}, expected {specs[name]['data_type']}")
            if array.ndim != 1 + len(dims) or any(
                d != -1 and d != s for d, s in zip(dims, array.shape[1:], strict=True)
            ):
                raise RefusedRequest(f"{name}: shape {array.shape}, expected [n, {dims}]")
            sizes.add(array.shape[0])
        if len(sizes) != 1 or not 1 <= min(sizes) <= int(self.config["max_batch_size"]):
            raise RefusedRequest(f"batch sizes {sorted(sizes)} (max_batch_size {self.config['max_batch_size']})")
        return sizes.pop()

    def infer(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | TritonError]:
        """Every request in one ``execute`` call; per request its outputs, or the model's error."""
        assert self.model is not None, "load the model first"
        counts = [self._check_request(inputs) for inputs in requests]
        if sum(counts) > int(self.config["max_batch_size"]):
            raise RefusedRequest("the dynamic batcher never gathers more than max_batch_size rows")
        outputs = {entry["name"]: entry for entry in self.config["output"]}
        built = [
            InferenceRequest([_stub_input(n, a) for n, a in inputs.items()], list(outputs), f"request-{i}")
            for i, inputs in enumerate(requests)
        ]
        responses = self.model.execute(built)
        if not isinstance(responses, list) or len(responses) != len(requests):
            raise AssertionError(f"execute must return one response per request, got {responses!r}")
        results: list[dict[str, np.ndarray] | TritonError] = []
        for count, response in zip(counts, responses, strict=True):
            if not isinstance(response, InferenceResponse):
                raise AssertionError(f"execute returned {type(response).__name__}, not InferenceResponse")
            error = response.error()
            if error is not None:
                results.append(error)
                continue
            if not all(t.via_dlpack for t in response.output_tensors()):
                raise AssertionError("an output made by Tensor(name, array) arrives empty from the real stub")
            tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
            if set(tensors) != set(outputs):
                raise AssertionError(f"outputs {sorted(tensors)}, the config has {sorted(outputs)}")
            for name, array in tensors.items():
                dims = [count, *(int(d) for d in outputs[name]["dims"])]
                if array.dtype.type is not TYPES[outputs[name]["data_type"]] or list(array.shape) != dims:
                    raise AssertionError(f"{name}: {array.dtype} {array.shape}, the config says {dims}")
            results.append(tensors)
        return results

    def unload(self) -> None:
        assert self.model is not None
        model, self.model = self.model, None
        model.finalize()


@contextlib.contextmanager
def _installed_module() -> Iterator[types.ModuleType]:
    saved = sys.modules.get(MODULE)
    sys.modules[MODULE] = pb = module()
    try:
        yield pb
    finally:
        if saved is None:
            sys.modules.pop(MODULE, None)
        else:
            sys.modules[MODULE] = saved
