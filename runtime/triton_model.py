"""Triton Python-backend model: generation on device-resident TensorRT sessions, dynamically batched.

``export/triton.py`` writes ``<prefix>_generate/1/model.py`` as one import of ``TritonPythonModel``
from here, so the Triton image needs imagefolder installed (docs/triton.md) and the repository carries
no code. Each model instance (one per GPU, ``instance_group``) opens the bundle's engines once
(``TrtBackend``, on its GPU) and keeps one ``TrtSession`` per served batch size for its whole life:
the KV cache and every other per-generation tensor stay on the device, and from a session's third
generation on each generation is one CUDA-graph launch. Only the requests' rows go in and only
images and indices come out; nothing crosses the Triton boundary between scales.

``execute`` gets every request Triton's dynamic batcher gathered. The rows of each request become
``ImageRequest``s (row i: its label, its settings or the model's defaults, its seed, index i); a
request that fails validation gets an error response and the others go on. The images of all valid
requests are packed in order into sessions (``loop.session_sizes``: the largest batch while it fills,
then the smallest that holds the rest, padded with copies of its last image), and each request gets
its rows back. An image's tokens depend only on its own label, seed, index and settings, so a request
gets exactly what it would get alone, however it was batched or split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from imagefolder.core import cuda
from imagefolder.core.conditioning import check_reference_indices
from imagefolder.core.schedule import SamplingParams, check_labels, num_positions
from imagefolder.errors import ImagefolderError, InputError
from imagefolder.runtime.backends.trt import TrtBackend, TrtSession
from imagefolder.runtime.loop import ImageRequest, Reference, run_batch, session_sizes

SETTINGS = {"seed": int, "cfg": float, "top_k": int, "top_p": float}  # optional inputs, one row per image
OUTPUTS = ("image", "indices")


def _rows(request, name: str, count: int | None = None) -> np.ndarray | None:
    """Input ``name`` of ``request`` as one value per image, or None if the request leaves it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.ndim != 2 or array.shape[1] != 1 or (count is not None and array.shape[0] != count):
        rows = "n" if count is None else count
        raise InputError(f"{name} must have shape ({rows}, 1), one row per image; got {array.shape}")
    return array[:, 0]


def _tensor(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    """The model Triton's Python backend instantiates once per instance: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        """Open the bundle's engines on this instance's GPU and one session per served batch size.

        ``args["model_config"]`` is the JSON of the model's ``config.pbtxt``; its parameters name the
        bundle (relative to the version folder, or absolute), the batch sizes and the sampling defaults.
        """
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / parameters.get("bundle", "bundle")
        self.defaults = SamplingParams(**{k: kind(parameters[k]) for k, kind in SETTINGS.items() if k in parameters})
        self.dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in OUTPUTS
        }
        if args.get("model_instance_kind") == "GPU":
            cuda.set_device(int(args["model_instance_device_id"]))
        self.backend = TrtBackend(bundle)
        served = parameters.get("batches")
        batches = [int(b) for b in served.split(",")] if served else self.backend.record["batches"]
        self.sessions: dict[int, TrtSession] = {}
        try:
            for batch in sorted(batches):
                self.sessions[batch] = self.backend.session(batch)
        except BaseException:
            self.backend.close()
            raise

    def _images(self, request) -> list[ImageRequest]:
        """The images one request asks for; ``InputError`` names what is wrong with it."""
        labels = _rows(request, "class_labels")
        if labels is None:
            raise InputError("class_labels is required")
        labels = check_labels(labels, self.backend.num_classes)
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
            output_tensors=[pb_utils.Tensor(name, array) for name, array in zip(OUTPUTS, outputs, strict=True)]
        )

    def finalize(self) -> None:
        """Free the sessions, engines and stream (Triton unloads the model)."""
        self.backend.close()
        self.sessions.clear()
