"""Install hints are computed from how imagefolder is installed, and the commands they give work.

Each form (an editable checkout, a built wheel, an index) is checked for its text, and the checkout and
wheel commands are run by pip with ``--dry-run --no-deps`` into a throwaway virtual environment where
the registry is reachable (``--no-deps``: the extras' own resolution is tests/test_extras.py's).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from imagefolder import install
from imagefolder.install import install_command
from tests.test_extras import dry_run, throwaway_venv  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]


def _arguments(command: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index("install") + 1 :]


def test_an_editable_checkout_gets_pip_install_e_of_the_checkout():
    arguments = _arguments(install_command("gpu-cu12"))
    assert arguments == ["-e", f"{ROOT}[gpu-cu12]"]


def test_the_record_pip_wrote_decides_the_form():
    assert install._from_record({"url": "file:///src/if", "dir_info": {"editable": True}}, "bench") == (
        "-e '/src/if[bench]'"
    )
    wheel = {"url": "file:///dl/imagefolder-0.1.0-py3-none-any.whl", "archive_info": {}}
    assert install._from_record(wheel, "bench") == "'/dl/imagefolder-0.1.0-py3-none-any.whl[bench]'"
    remote = {"url": "https://example.org/imagefolder-0.1.0.tar.gz", "archive_info": {}}
    assert install._from_record(remote, "ort") == "'imagefolder[ort] @ https://example.org/imagefolder-0.1.0.tar.gz'"


def test_pip_is_named_only_when_it_installs_here(monkeypatch, tmp_path):
    monkeypatch.setattr(install.shutil, "which", lambda name: str(Path(sys.executable).parent / "pip"))
    assert install_command("ort").startswith("pip install ")
    monkeypatch.setattr(install.shutil, "which", lambda name: "/elsewhere/bin/pip")
    assert install_command("ort").startswith(f"{sys.executable} -m pip install ")


def test_the_checkout_hint_installs(throwaway_venv):  # noqa: F811
    for extra in ("bench", "gpu-cu12"):
        names, log = dry_run(throwaway_venv, "--no-deps", *_arguments(install_command(extra)))
        assert names == {"imagefolder"} and "does not provide the extra" not in log, log


def test_the_wheel_hint_installs(throwaway_venv, tmp_path):  # noqa: F811
    """Built, installed from the file into a throwaway environment: the record pip writes gives a working command."""
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("imagefolder-*.whl")
    target = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "--quiet", "--no-deps"]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    (record,) = target.glob("lib/python*/site-packages/imagefolder-*.dist-info/direct_url.json")
    hint = install._from_record(json.loads(record.read_text()), "bench")
    assert shlex.split(hint) == [f"{wheel}[bench]"]
    names, log = dry_run(throwaway_venv, "--no-deps", *shlex.split(hint))
    assert names == {"imagefolder"} and "does not provide the extra" not in log, log


def test_an_index_install_gets_the_plain_name(monkeypatch):
    class FromIndex:
        def read_text(self, name):
            return None

        def locate_file(self, name):
            return Path("/site-packages")

    monkeypatch.setattr(install.importlib.metadata, "distributions", lambda name: [FromIndex()])
    assert _arguments(install_command("ort")) == ["imagefolder[ort]"]


def test_a_checkout_never_installed_gets_the_editable_form(monkeypatch):
    monkeypatch.setattr(install.importlib.metadata, "distributions", lambda name: [])
    assert _arguments(install_command("train")) == ["-e", f"{ROOT}[train]"]
