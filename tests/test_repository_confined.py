"""Tests read nothing outside the repository: the guard in conftest.py works, and no test names a path beside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY, OutsideRepository, outside_repository
from tests.reference import OFFICIAL_KEYS, TENSORRT_API


def test_reading_beside_the_repository_fails():
    sibling = REPOSITORY.parent / "a-sibling-folder" / "reference" / "keys.txt"  # any folder beside the clone
    with pytest.raises(OutsideRepository, match="outside the repository"):
        open(sibling)  # noqa: SIM115 - the open itself must be refused, whether or not the file exists
    assert outside_repository(REPOSITORY.parent / "anything.txt")


def test_reading_inside_the_repository_and_elsewhere_passes(tmp_path):
    assert not outside_repository(OFFICIAL_KEYS)
    assert not outside_repository(tmp_path / "x")
    assert not outside_repository(REPOSITORY.parent / ".cache" / "pip")
    assert OFFICIAL_KEYS.is_file() and (TENSORRT_API / "identifiers-10.3.txt").is_file()


# Ways a test could name a folder beside the repository.
ESCAPES = re.compile(r"parents\[\d+\]\s*\.parent|\.\./shared|[\"']shared[\"']|IMAGEFOLDER_SHARED")


@pytest.mark.parametrize("path", sorted((REPOSITORY / "tests").glob("*.py")), ids=lambda p: p.name)
def test_no_test_names_a_path_beside_the_repository(path: Path):
    if path.name == Path(__file__).name:
        return  # this file spells the patterns out
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ESCAPES.search(line)
    ]
    assert not hits, "tests must carry their data in tests/data:\n" + "\n".join(hits)
