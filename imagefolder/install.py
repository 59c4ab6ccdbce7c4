"""The pip command that adds an extra to *this* imagefolder, worked out from how it was installed.

imagefolder is not on a package index: ``pip install 'imagefolder[gpu-cu12]'`` would fail for nearly every
user. The command that works depends on where this copy came from, which pip records in the
distribution's ``direct_url.json`` (PEP 610):

- an editable install of a checkout: ``pip install -e '<checkout>[extra]'``;
- a wheel or a folder installed from a file: ``pip install '<that file or folder>[extra]'``;
- an archive from a URL: ``pip install 'imagefolder[extra] @ <url>'``;
- an index (no ``direct_url.json``): ``pip install 'imagefolder[extra]'``;
- not installed at all, run from a checkout (``PYTHONPATH``): ``pip install -e '<checkout>[extra]'``.

The command starts with ``pip`` when the ``pip`` on the PATH belongs to the running interpreter, and with
``<python> -m pip`` otherwise, so that it installs into the environment that runs imagefolder. No torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "imagefolder"
CHECKOUT = Path(__file__).resolve().parents[1]


def install_command(extra: str) -> str:
    """The shell command that installs ``extra`` (e.g. ``gpu-cu12``) for the imagefolder running here."""
    return f"{_pip()} install {_target(extra)}"


def _target(extra: str) -> str:
    # Run from the checkout, Python also finds the build's ``imagefolder.egg-info`` there: prefer the record
    # pip wrote at install time, and read an egg-info inside the checkout as the editable install it comes from.
    found = list(importlib.metadata.distributions(name=DISTRIBUTION))
    for distribution in found:
        text = distribution.read_text("direct_url.json")
        if text:
            return _from_record(json.loads(text), extra)
    if not found or all(Path(str(d.locate_file(""))).resolve() == CHECKOUT for d in found):
        return _editable(CHECKOUT, extra)
    return shlex.quote(f"{DISTRIBUTION}[{extra}]")  # from an index


def _from_record(origin: dict, extra: str) -> str:
    url = origin.get("url", "")
    if not url.startswith("file://"):
        return shlex.quote(f"{DISTRIBUTION}[{extra}] @ {url}")
    path = Path(unquote(urlparse(url).path))
    if origin.get("dir_info", {}).get("editable"):
        return _editable(path, extra)
    return shlex.quote(f"{path}[{extra}]")


def _editable(checkout: Path, extra: str) -> str:
    return f"-e {shlex.quote(f'{checkout}[{extra}]')}"


def _pip() -> str:
    """``pip`` if the PATH's pip installs into this interpreter's environment, else ``<python> -m pip``."""
    found = shutil.which("pip")
    if found is not None and Path(found).parent == Path(sys.executable).parent:
        return "pip"
    return f"{shlex.quote(sys.executable)} -m pip"
