"""Checkpoint I/O: official ImageFolder files in, our safetensors format in and out.

One module per concept:

- ``unpickle``: the allow-listed unpickler; a pickle runs no code unless the user trusts the file;
- ``official``: the official file layouts (AR, tokenizer, bare state dict) and their bookkeeping;
- ``infer``: the configuration official weights were built with, from their shapes;
- ``strict``: weights into models, strictly, every tensor checked (keys, shape, dtype, finite);
- ``native``: our format (one ``.safetensors`` file + JSON sidecar) and ``convert`` from official;
- ``load``: any file -> models.

The names below are the public surface, what commands, trainers and users call; the modules'
other names are their internals and may move. Importing this package imports torch.
"""

from imagefolder.checkpoints.load import load_checkpoint_models
from imagefolder.checkpoints.native import convert, read_checkpoint, save_checkpoint, sidecar_path
from imagefolder.checkpoints.official import OfficialCheckpoint, read_official
from imagefolder.checkpoints.strict import build_models

__all__ = [
    "OfficialCheckpoint",
    "build_models",
    "convert",
    "load_checkpoint_models",
    "read_checkpoint",
    "read_official",
    "save_checkpoint",
    "sidecar_path",
]
