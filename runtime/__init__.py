"""imagefolder.runtime: run an exported bundle without torch.

Submodules: ``bundle`` (load and verify a bundle), ``sampler`` (numpy reference of the sampler
graph), ``loop`` (the generation loop and image output), ``profiler`` (per-step latency) and
``backends`` (``ort``; a backend is imported by name, so importing this package loads none).
"""
