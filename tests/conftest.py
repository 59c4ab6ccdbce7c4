"""Suite-wide guard: a test reads nothing outside the repository.

A user's clone has no ``shared/`` folder beside it, so a test that opens a file next to the
repository passes here and fails there. The audit hook below refuses every ``open`` of a path that
lies beside the repository (under its parent folder, outside the repository itself); hidden
folders there (``~/.cache``, ``~/.config`` when the clone sits in a home folder) are left alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


class OutsideRepository(PermissionError):
    """A test opened a file beside the repository; carry the data inside it (tests/data)."""


def outside_repository(path: str | bytes | os.PathLike) -> bool:
    """Is ``path`` beside the repository (a sibling folder's file), where a fresh clone has nothing?"""
    parent = REPOSITORY.parent
    if parent == Path(parent.anchor):
        return False  # the repository sits at the file system's top: nothing is "beside" it
    absolute = Path(os.path.abspath(os.fsdecode(path)))
    try:
        relative = absolute.relative_to(parent)
    except ValueError:
        return False
    first = relative.parts[0] if relative.parts else ""
    return first != REPOSITORY.name and not first.startswith(".")


def _refuse_reads_beside_the_repository(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str | bytes | os.PathLike) and outside_repository(args[0]):
        raise OutsideRepository(f"a test opened {os.fsdecode(args[0])}, outside the repository {REPOSITORY}")


sys.addaudithook(_refuse_reads_beside_the_repository)


@pytest.fixture
def fake_gpu(request):
    """The fake TensorRT and cuda-python (``tests/fakes``) installed for one test; TensorRT 10.3.0 unless the
    test parametrises it indirectly (``@pytest.mark.parametrize("fake_gpu", ["11.4.0"], indirect=True)``)."""
    from tests.fakes import installed

    with installed(getattr(request, "param", "10.3.0")) as gpu:
        yield gpu
