"""Triton Python-backend model: generation on ONNX Runtime (CPU instances) or on device-resident TensorRT
sessions (GPU instances), dynamically batched.

``export/triton.py`` writes ``<prefix>_generate/1/model.py`` as one import of ``TritonPythonModel``
from here, so the server's Python needs imagefolder installed (docs/triton.md) and the repository carries
no code. The config parameter ``backend`` picks the sessions. ``ort``: each ``KIND_CPU`` instance opens
the bundle's graphs with ONNX Runtime, its intra-op threads the CPUs divided by the instances, so the
instances share the cores instead of fighting for them. ``trt``: each ``KIND_GPU`` instance opens the
bundle's engines on its GPU (``TrtBackend``); the KV cache and every other per-generation tensor stay on
the device, and from a session's third generation on each generation is one CUDA-graph launch. Either
way an instance keeps one session per served batch size for its whole life, and only the requests' rows
go in and only images and indices come out.

``execute`` gets every request Triton's dynamic batcher gathered. The rows of each request become
``ImageRequest``s (row i: its label, its settings or the model's defaults, its seed, index i); a
request that fails validation gets an error response naming the input at fault, and the others go on.
The images of all valid requests are packed in order into sessions (``loop.session_sizes``: the largest
batch while it fills, then the smallest that holds the rest, padded with copies of its last image), and
each request gets its rows back. An image's tokens depend only on its own label, seed, index and
settings, so a request gets exactly what it would get alone, however it was batched or split.

Tensors cross the stub through DLPack, both ways: the 2.51 Python-backend stub (the ``nvidia-pytriton``
wheel) built against numpy 1 reads and writes wrong memory through ``as_numpy`` and ``Tensor(name, array)``
under numpy 2 (rows after the first read as copies of the first; outputs arrive empty, without an error),
while ``np.from_dlpack`` and ``Tensor.from_dlpack`` hand over the buffers themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import triton_python_backend_utils as pb_utils

from imagefolder.core.conditioning import check_reference_indices
from imagefolder.core.schedule import SamplingParams, check_labels, num_positions
from imagefolder.errors import ImagefolderError, InputError
from imagefolder.runtime.backends.base import Backend, Session
from imagefolder.runtime.loop import ImageRequest, Reference, run_batch, session_sizes

if TYPE_CHECKING:
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.backends.trt import TrtBackend

SETTINGS = {"seed": int, "cfg": float, "top_k": int, "top_p": float}  # optional inputs, one row per image
OUTPUTS = ("image", "indices")
LABELS = "class_labels"


def _rows(request, name: str, count: int | None = None) -> np.ndarray | None:
    """Input ``name`` of ``request`` as one value per image (a copy), or None if the request leaves it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = np.array(np.from_dlpack(tensor), copy=True)  # the stub's buffer is reused after execute
    if array.ndim != 2 or array.shape[1] != 1 or (count is not None and array.shape[0] != count):
        rows = "n" if count is None else count
        raise InputError(f"{name} must have shape ({rows}, 1), one row per image; got {array.shape}")
    return array[:, 0]


def _instances(config: dict) -> int:
    """How many instances of this model the server runs (one ``instance_group`` entry per kind)."""
    return max(1, sum(int(group.get("count", 1)) for group in config.get("instance_group", [])))


def open_backend(kind: str, bundle: Path, config: dict, args: dict) -> OrtBackend | TrtBackend:
    """The backend of one instance: ``ort`` with the CPUs shared among the instances, or ``trt`` on the
    instance's GPU. Imported here: a CPU server has no TensorRT, a GPU server may have no ONNX Runtime."""
    if kind == "ort":
        from imagefolder.runtime.backends.ort import OrtBackend

        threads = max(1, len(os.sched_getaffinity(0)) // _instances(config))
        return OrtBackend(bundle, threads=threads)
    if kind == "trt":
        from imagefolder.core import cuda
        from imagefolder.runtime.backends.trt import TrtBackend

        if args.get("model_instance_kind") == "GPU":
            cuda.set_device(int(args["model_instance_device_id"]))
        return TrtBackend(bundle)
    raise InputError(f"config parameter backend is {kind!r}; this imagefolder serves ort or trt")


def _served_batches(parameters: dict, backend: Backend) -> list[int]:
    """The config's ``batches``, or (trt) every batch the engines were built for."""
    if parameters.get("batches"):
        return [int(b) for b in parameters["batches"].split(",")]
    record = getattr(backend, "record", None)  # TrtBackend's build record
    if record is None:
        raise InputError("config parameter batches is missing; re-export the repository")
    return list(record["batches"])


def _tensor(request, name: str) -> np.ndarray | None:
    """Input ``name`` of ``request`` whole (a copy, through DLPack), or None if the request leaves it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else np.array(np.from_dlpack(tensor), copy=True)


class TritonPythonModel:
    """The model Triton's Python backend instantiates once per instance: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        """Open the bundle with this instance's backend and one session per served batch size.

        ``args["model_config"]`` is the JSON of the model's ``config.pbtxt``; its parameters name the
        backend (``ort`` or ``trt``; ``trt`` when absent), the bundle (relative to the version folder,
        or absolute), the batch sizes and the sampling defaults. A bundle the backend refuses fails the
        load with our one-line reason (Triton logs it and reports the model unavailable).
        """
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / parameters.get("bundle", "bundle")
        self.defaults = SamplingParams(**{k: kind(parameters[k]) for k, kind in SETTINGS.items() if k in parameters})
        self.dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in OUTPUTS
        }
        try:
            self.backend = open_backend(parameters.get("backend", "trt"), bundle, config, args)
        except ImagefolderError as err:
            # The stub appends the frames of the traceback to the reason Triton logs and reports: raised
            # afresh here, the reason is our one line and this one frame.
            raise err.with_traceback(None) from None
        batches = _served_batches(parameters, self.backend)
        self.sessions: dict[int, Session] = {}
        try:
            for batch in sorted(batches):
                self.sessions[batch] = self.backend.session(batch)
        except BaseException:
            self.backend.close()
            raise

    def _images(self, request) -> list[ImageRequest]:
        """The images one request asks for; ``InputError`` names what is wrong with it."""
        labels = _rows(request, LABELS)
        if labels is None:
            raise InputError(f"{LABELS} is required")
        try:
            labels = check_labels(labels, self.backend.num_classes)
        except InputError as err:
            raise InputError(f"{LABELS}: {err}") from None
        given = {name: _rows(request, name, len(labels)) for name in SETTINGS}
        references = self._references(request, len(labels))
        images = []
        for row, label in enumerate(labels):
            settings = {
                name: getattr(self.defaults, name) if values is None else SETTINGS[name](values[row])
                for name, values in given.items()
            }
            try:
                params = SamplingParams(**settings)
            except InputError as err:
                raise InputError(f"row {row}: {err}") from None
            images.append(ImageRequest(int(label), params, row, references[row]))
        return images

    def _references(self, request, count: int) -> list[Reference | None]:
        """The optional ``reference_indices`` (n, 2, P) and ``force_mask`` (n, P, 2) of a request, per image."""
        indices, mask = _tensor(request, "reference_indices"), _tensor(request, "force_mask")
        if indices is None and mask is None:
            return [None] * count
        if mask is not None and mask.dtype == np.uint8:  # Triton checked it is BOOL; DLPack may say uint8
            mask = mask.view(np.bool_)
        if indices is None or mask is None:
            raise InputError("reference_indices and force_mask go together: give both or neither")
        positions = num_positions(self.backend.scales)
        indices = check_reference_indices(indices, positions, self.backend.codebook_size)
        if indices.shape[0] != count or mask.shape != (count, positions, 2) or mask.dtype != np.bool_:
            raise InputError(
                f"reference_indices {indices.shape} and force_mask {mask.shape} {mask.dtype} must be "
                f"({count}, 2, {positions}) and ({count}, {positions}, 2) bool, one row per image"
            )
        return [Reference(indices[row], mask[row]) for row in range(count)]

    def execute(self, requests: list) -> list:
        """One response per request, in order: its images and indices, or an error of its own."""
        errors: dict[int, str] = {}
        work: list[tuple[int, ImageRequest]] = []  # (request, image), in request order
        rows: dict[int, list] = {}
        for r, request in enumerate(requests):
            try:
                images = self._images(request)
            except ImagefolderError as err:
                errors[r] = str(err)
                continue
            rows[r] = [None] * len(images)
            work += [(r, image) for image in images]
        start = 0
        for size in session_sizes(len(work), list(self.sessions)):
            chunk, start = work[start : start + size], start + size
            images = [image for _, image in chunk]
            images += [images[-1]] * (size - len(images))  # padding: generated, never returned
            try:
                result = run_batch(self.sessions[size], self.backend.scales, images)
            except ImagefolderError as err:
                errors.update((r, f"generation failed: {err}") for r, _ in chunk)
                continue
            for k, (r, image) in enumerate(chunk):
                rows[r][image.index] = (result.images[k], result.indices[k])
        return [self._response(rows.get(r), errors.get(r)) for r in range(len(requests))]

    def _response(self, rows: list | None, error: str | None):
        if error is not None or rows is None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error)))
        outputs = [np.stack([row[i] for row in rows]).astype(self.dtypes[name]) for i, name in enumerate(OUTPUTS)]
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor.from_dlpack(name, array) for name, array in zip(OUTPUTS, outputs, strict=True)
            ]
        )

    def finalize(self) -> None:
        """Free the sessions and the backend (Triton unloads the model)."""
        self.backend.close()
        self.sessions.clear()
