"""The reference facts the tests compare against, carried inside the repository (``tests/data``).

A user's clone has nothing beside it, so the official state-dict listing and the TensorRT API
listings are copies kept here; ``tests/test_repository_confined.py`` fails if a test reaches outside.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
OFFICIAL_KEYS = DATA / "official-state-dict-keys.txt"
TENSORRT_API = DATA / "tensorrt-api"


def official_keys(section: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of the ``VAE`` or ``VAR`` section of official-state-dict-keys.txt."""
    text = OFFICIAL_KEYS.read_text()
    body = text.split(f"### {section}:")[1].split("###")[0]
    rows = []
    for line in body.splitlines()[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype))
    return rows
