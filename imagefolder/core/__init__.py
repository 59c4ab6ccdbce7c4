"""What the export and the runtime share, torch-free: the bundle format and the generation schedule.

``specs`` (every graph's I/O and behaviour), ``bundle`` (reading and checking a bundle on disk),
``engines`` (TensorRT engines in a bundle and their build record), ``schedule`` (scales, guidance,
CFG rows, sampling parameters), ``sampler`` (the numpy reference of the sampler graph), ``compare``
(output comparison and the check report), ``cuda`` (the cuda-python layer both the TensorRT
builder and backend use), ``gpu_stack`` (which extra installs the TensorRT stack on this machine,
and what a missing package of it says) and ``polygraphy_log`` (polygraphy's logger following ours).
It imports neither ``imagefolder.export`` nor ``imagefolder.runtime``.
"""
