"""imagefolder: export and edge inference for ImageFolder (Li et al., arXiv 2410.01756).

Importing this package is cheap and imports no torch: the runtime (``imagefolder.runtime``) must run
on machines without PyTorch. Models live in ``imagefolder.models`` and need torch.
"""

__version__ = "0.1.0"
