"""TensorRT backend: the bundle's engines driven through cuda-python, state on the device.

Three rooms: ``engine`` (one plan and its execution contexts), ``session`` (one batch size's device state and
its CUDA graph), ``backend`` (build-record checks, engine loading, sessions). No torch.
"""

from imagefolder.runtime.backends.trt.backend import TrtBackend
from imagefolder.runtime.backends.trt.engine import Engine, ExecutionContext
from imagefolder.runtime.backends.trt.session import RequestLayout, TrtSession

__all__ = ["Engine", "ExecutionContext", "RequestLayout", "TrtBackend", "TrtSession"]
