"""A real Triton Inference Server on a model repository, from the ``nvidia-pytriton`` wheel (CPU machines).

The wheel ships a complete ``tritonserver`` (2.51), its Python backend and one backend stub per Python
version; we use those files only and never import ``pytriton`` (it is installed with ``--no-deps``: it
declares ``numpy<2``, and the stub under numpy 1 dies where under numpy 2 it serves through DLPack; see
docs/triton.md). Three things make the stub run our model in this Python:

- the stub for this Python's version is copied into a backend folder of the repository's own
  (``REPO/.backends/python``, beside links to the wheel's backend library), since the wheel's backend
  folder holds none and the backend wants one there when it starts;
- this Python's ``LIBDIR`` comes first on ``LD_LIBRARY_PATH``: the stub links ``libpython3.X.so`` and must
  load the one this interpreter was built with (a pyenv Python's, not the system's);
- this interpreter's folder comes first on ``PATH``: the embedded interpreter finds its prefix from the
  ``python3`` on ``PATH``, so a virtual environment's packages (numpy, imagefolder) are the ones imported.

``TritonServer`` starts the binary on loopback ports, waits for readiness with a deadline and stops it
with its stubs (tests, the ``serve`` bench job, ``imagefolder serve``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from imagefolder.errors import ImagefolderError, MissingDependency

PACKAGE = "pytriton"  # the nvidia-pytriton wheel's top-level package
STUB = "triton_python_backend_stub"
SERVER, SERVER_WHEEL = "tritonserver (nvidia-pytriton)", "nvidia-pytriton==0.7.0"
INSTALL = f"pip install --no-deps '{SERVER_WHEEL}'"  # its numpy<2 pin is wrong for us (module docstring)
DOCS = "docs/triton.md, serve on a CPU machine"
STUB_VERSIONS = ((3, 8), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13))  # the stubs the wheel ships
WHEEL_GLIBC = (2, 35)  # the wheel is manylinux_2_35_x86_64


class ServerError(ImagefolderError):
    """The server did not start, did not become ready in time, or died."""


def unsupported_platform() -> str | None:
    """Why the wheel's server cannot run on this platform, or None where it can (Linux x86-64, glibc ≥ 2.35,
    a Python the wheel has a stub for)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"nvidia-pytriton's server is built for Linux x86-64 only (this is {sys.platform} {platform.machine()})"
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < WHEEL_GLIBC:
        return f"nvidia-pytriton's server needs glibc ≥ {'.'.join(map(str, WHEEL_GLIBC))} (this is {libc} {version})"
    if sys.version_info[:2] not in STUB_VERSIONS:
        return f"nvidia-pytriton ships no Python-backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}"
    return None


@dataclass(frozen=True)
class TritonInstall:
    """The server files of the installed wheel."""

    root: Path  # .../pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def libraries(self) -> Path:
        """The libraries the wheel's binaries link (``nvidia_pytriton.libs`` beside the package)."""
        return self.root.parent.parent / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / STUB


def find_triton() -> TritonInstall:
    """The installed server; ``MissingDependency`` (with how to install it) where it is absent."""
    reason = unsupported_platform()
    if reason is not None:
        raise ServerError(reason)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(SERVER, "serve", purpose="to serve a repository", install=INSTALL, hint=DOCS)
    install = TritonInstall(Path(list(spec.submodule_search_locations)[0]) / "tritonserver")
    missing = [p for p in (install.binary, install.backends / "python", install.stub) if not p.exists()]
    if missing:
        raise MissingDependency(SERVER, "serve", detail=f"{missing[0]} is missing", install=INSTALL, hint=DOCS)
    return install


def backend_directory(install: TritonInstall) -> Path:
    """This environment's backend folder, ``<sys.prefix>/share/imagefolder/triton/backends``: the wheel's
    Python backend (linked) with this Python's stub (copied), which the backend wants beside its library
    when it starts. Not in the model repository: Triton takes every folder there, hidden ones too, for a
    model. Returns the folder for ``--backend-directory``."""
    folder = Path(sys.prefix) / "share" / "imagefolder" / "triton" / "backends" / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for source in (install.backends / "python").iterdir():
        link = folder / source.name
        if not link.is_symlink() or link.resolve() != source.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(source.resolve())
    stub = folder / STUB
    if not stub.is_file() or stub.read_bytes() != install.stub.read_bytes():
        staged = folder / f".{STUB}.tmp"
        shutil.copy2(install.stub, staged)
        os.replace(staged, stub)
    return folder.parent


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the server and its stubs need (see the module's docstring); the wheel's own libraries
    come after this Python's, for the copied stub (its run path points into the wheel)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    paths = [libdir, str(install.libraries), *filter(None, [env.get("LD_LIBRARY_PATH")])]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    return env


def server_command(
    install: TritonInstall,
    repository: Path,
    http_port: int,
    grpc_port: int,
    extra: list[str] | tuple = (),
    address: str = "127.0.0.1",
) -> list[str]:
    """The ``tritonserver`` command line (the backend folder prepared): HTTP and gRPC on ``address`` (loopback
    by default) and the given ports, no metrics endpoint."""
    repository = Path(repository).resolve()
    return [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backend_directory(install)}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=false",
        *extra,
    ]


def free_port() -> int:
    """A loopback port no one listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stub_processes(repository: Path) -> list[int]:
    """Process ids of the backend stubs serving models of ``repository`` (a stub's first argument is the
    path of its model's ``model.py``)."""
    prefix = str(Path(repository).resolve()) + os.sep
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if argv[0].endswith(STUB) and len(argv) > 1 and argv[1].startswith(prefix):
                pids.append(int(entry.name))
    return pids


class TritonServer:
    """One ``tritonserver`` process on a repository, its log in a file; a context manager that stops it.

    Args:
        repository: the model repository (its backend folder ``.backends`` is prepared).
        log_path: where the server's stdout and stderr go.
        extra: more ``tritonserver`` options (``--model-control-mode=explicit``, ``--exit-timeout-secs=N``).

    ``command`` (and ``cwd``) may be replaced before ``start``, by a command that serves on the same ports.
    """

    def __init__(self, repository: Path, log_path: Path, extra: list[str] | tuple = ()):
        self.install = find_triton()
        self.repository, self.log_path = Path(repository).resolve(), Path(log_path)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.command = server_command(self.install, self.repository, self.http_port, self.grpc_port, extra)
        self.cwd: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, deadline_s: float = 120.0) -> TritonServer:
        """Start the server and wait until it reports ready; ``ServerError`` with the log's tail otherwise."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(self.install),
                cwd=self.cwd,
                start_new_session=True,
            )
        self.wait_ready(deadline_s)
        return self

    def get(self, path: str) -> int:
        """HTTP status of GET ``path`` on the server (0 when nothing answers)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def wait_ready(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while self.get("/v2/health/ready") != 200:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"tritonserver exited ({self.returncode}) before it was ready: {self.log_tail()}")
            if time.monotonic() > end:
                raise ServerError(f"tritonserver not ready after {deadline_s:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return " | ".join(self.log().splitlines()[-lines:])

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (Triton finishes the requests in flight), SIGKILL after ``grace_s``; then any stub of this
        repository still alive. Returns the server's exit code (None if it never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in stub_processes(self.repository):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
