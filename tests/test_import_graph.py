"""The installed package's import graph follows the layers of docs/architecture.md, with no cycle.

Every import statement of every module (lazy ones inside functions included) is read with ``ast``
and mapped to the part it comes from and the part it reaches:

    foundation (imagefolder/__init__, errors, io, install)  ←  core  ←  models  ←  export
                                                        ↖ runtime ↙        ↖ cli (everything)

``runtime`` never imports ``export`` and ``export`` never ``runtime``; ``core`` imports neither; the
runtime reaches the models only through the torch backend. Torch stays out of ``core`` and the
runtime (but the torch backend) altogether.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest

PACKAGE = Path(importlib.util.find_spec("imagefolder").origin).parent
ALLOWED = {
    "foundation": set(),
    "core": {"foundation"},
    "models": {"foundation", "core"},
    "export": {"foundation", "core", "models"},
    "runtime": {"foundation", "core"},
    "cli": {"foundation", "core", "models", "export", "runtime"},
}
# The one sanctioned reach from the runtime into the models: the PyTorch reference backend, which
# only ``--backend torch`` (or a test) imports.
EXCEPTIONS = {("runtime", "models"): {"imagefolder.runtime.backends.torch_backend"}}
TORCH_FREE = {"foundation", "core", "runtime"}


def _modules() -> dict[str, Path]:
    """Module name → source file, for every module of the installed package (through its symlinked parts)."""
    out = {}
    files = [Path(root) / f for root, _, names in os.walk(PACKAGE, followlinks=True) for f in names]
    for path in sorted(f for f in files if f.suffix == ".py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("imagefolder", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


def _part(module: str) -> str | None:
    if module == "imagefolder" or module in ("imagefolder.errors", "imagefolder.io", "imagefolder.install"):
        return "foundation"
    if not module.startswith("imagefolder."):
        return None
    second = module.split(".")[1]
    return second if second in ("core", "export", "runtime", "cli") else "models"


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, absolute names (``from a import b`` counts a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = _modules()


def test_every_part_is_found():
    parts = {_part(name) for name in MODULES}
    assert parts == set(ALLOWED), parts
    assert "imagefolder.runtime.backends.ort" in MODULES and "imagefolder.export.onnx_export" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_only_what_its_layer_allows(name):
    part = _part(name)
    bad = []
    for target in sorted(_imports(name, MODULES[name])):
        reached = _part(target)
        if reached is None:  # outside the package
            torch_backend = name in EXCEPTIONS[("runtime", "models")]
            if target.split(".")[0] == "torch" and part in TORCH_FREE and not torch_backend:
                bad.append(f"{target} (torch in a torch-free part)")
        elif target in MODULES and reached not in ALLOWED[part] | {part}:
            bad += [] if name in EXCEPTIONS.get((part, reached), ()) else [f"{target} ({reached})"]
    assert not bad, f"{name} ({part}) imports {bad}"


def test_parts_form_no_cycle():
    edges: dict[str, set[str]] = {part: set() for part in ALLOWED}
    for name, path in MODULES.items():
        for target in _imports(name, path):
            reached = _part(target)
            if reached and reached != _part(name) and target in MODULES:
                edges[_part(name)].add(reached)
    visiting, done = set(), set()

    def visit(part: str, trail: list[str]) -> None:
        assert part not in visiting, f"import cycle between parts: {' → '.join([*trail, part])}"
        if part in done:
            return
        visiting.add(part)
        for nxt in sorted(edges[part]):
            visit(nxt, [*trail, part])
        visiting.discard(part)
        done.add(part)

    for part in edges:
        visit(part, [])


def test_the_check_catches_a_forbidden_import(tmp_path):
    """The checker itself: a runtime module importing the export is reported."""
    source = tmp_path / "loop.py"
    source.write_text("def f():\n    from imagefolder.export.onnx_export import export_bundle\n")
    targets = _imports("imagefolder.runtime.loop", source)
    assert "imagefolder.export.onnx_export" in targets
    assert _part("imagefolder.export.onnx_export") not in ALLOWED["runtime"]
