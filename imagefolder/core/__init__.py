"""What the export and the runtime share, torch-free: the bundle format and the generation schedule.

``specs`` (every graph's I/O and behaviour), ``bundle`` (reading and checking a bundle on disk),
``engines`` (TensorRT engines in a bundle and their build record), ``schedule`` (scales, guidance,
CFG rows, sampling parameters), ``sampler`` (the numpy reference of the sampler graph), ``compare``
(output comparison and the check report) and ``cuda`` (the cuda-python layer both the TensorRT
builder and backend use). It imports neither ``imagefolder.export`` nor ``imagefolder.runtime``.
"""
