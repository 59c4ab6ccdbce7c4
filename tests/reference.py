"""Access to the shared reference files (``shared/`` lies beside the repository, in CI too)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    env = os.environ.get("IMAGEFOLDER_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared"


def official_keys(section: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of the ``VAE`` or ``VAR`` section of official-state-dict-keys.txt."""
    text = (shared_dir() / "reference" / "official-state-dict-keys.txt").read_text()
    body = text.split(f"### {section}:")[1].split("###")[0]
    rows = []
    for line in body.splitlines()[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype))
    return rows
