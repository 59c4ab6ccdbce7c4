"""Our TensorRT engines as a polygraphy runner, so that polygraphy's ``Comparator`` can drive them.

polygraphy's own ``TrtRunner`` builds or loads an engine and manages device memory through
polygraphy's ctypes wrapper of libcudart. ``TrtGraphRunner`` instead runs one engine of a bundle
through ``TrtBackend.run_graph``: the bundle's own plans, fixed-shape profiles and cuda-python
buffers, so a comparison exercises the code that generates images, and runs in CI on the
TensorRT/CUDA test doubles. One runner serves one (graph, batch, scale), because each scale has its
own optimization profile and polygraphy feeds a runner inputs of one shape.

Imports polygraphy at import time (a runner subclasses its ``BaseRunner``): import this module
only where polygraphy is known to be installed. No torch.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

if TYPE_CHECKING:
    from imagefolder.runtime.backends.trt import TrtBackend


class TrtGraphRunner(BaseRunner):
    """polygraphy runner of one bundle engine at one (batch, scale), through ``TrtBackend.run_graph``.

    Args:
        backend: an open ``TrtBackend``; the runner borrows it and never closes it.
        graph: the engine to run (a graph of the bundle).
        batch: images per run (the ``ar_*``, ``sampler`` and ``fold`` graphs see 2·batch rows where the spec says N).
        scale_index: the scale whose profile runs; None for the graphs that serve no particular scale.
    """

    def __init__(self, backend: TrtBackend, graph: str, batch: int, scale_index: int | None):
        where = "" if scale_index is None else f"@{scale_index}"
        super().__init__(name=f"trt:{graph}{where}")
        self.backend, self.graph, self.batch, self.scale_index = backend, graph, batch, scale_index

    def get_input_metadata_impl(self) -> TensorMetadata:
        bundle = self.backend.bundle
        shapes = bundle.shapes(self.graph, self.batch, self.scale_index or 0)
        metadata = TensorMetadata()
        for tensor in bundle.specs[self.graph].inputs:
            metadata.add(tensor.name, np.dtype(bundle.tensor_dtype(self.graph, tensor.name)), shapes[tensor.name])
        return metadata

    def infer_impl(self, feed_dict) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = self.backend.run_graph(self.graph, dict(feed_dict), self.batch, self.scale_index)
        self.inference_time = time.perf_counter() - started  # host wall time, copies included (polygraphy's contract)
        return outputs
