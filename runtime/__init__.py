"""imagefolder.runtime: run an exported bundle without torch.

Submodules: ``loop`` (the generation loop), ``profiler`` (per-step latency), ``images`` (image
files in and out), ``engine_check`` (TensorRT engines against ONNX Runtime) and ``backends``
(``ort``, ``trt``, and ``torch_backend`` for the PyTorch reference; a backend is imported by name,
so importing this package loads none). The bundle format itself is ``imagefolder.core``.
"""
