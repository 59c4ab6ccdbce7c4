"""The machine a benchmark ran on: what goes at the top of every report.

The processor changes between sessions (an AMD EPYC one week, an Intel Xeon with AVX-512 and AMX
the next) and the machine is shared, so a number means little without the CPU model, the cores this
process may use, the vector extensions the kernels can pick, the library versions, the load when
the run started and ended, and the command that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# Vector and matrix extensions that change which GEMM kernels oneDNN, MKL and MLAS select.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
LIBRARIES = ("numpy", "torch", "onnxruntime", "onnx", "matplotlib")


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty where the file does not exist)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return []
    cpus: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            if current:
                cpus.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        cpus.append(current)
    return cpus


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on: ONNX Runtime's default intra-op thread count."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = {
        (cpu.get("physical id", "0"), cpu.get("core id", cpu.get("processor")))
        for cpu in _cpuinfo()
        if int(cpu.get("processor", -1)) in allowed
    }
    return len(cores) or len(allowed)


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache that sysfs reports, or None."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").exists() else ""
        if text:
            unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=None)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
        return out + ("+changes" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """Date, CPU, cores, ISA flags, memory, load, library versions, commit and command of this run."""
    cpus = _cpuinfo()
    flags = set(cpus[0].get("flags", "").split()) if cpus else set()
    memory = None
    if Path("/proc/meminfo").exists():
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = int(total.split()[1]) * 1024
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpus[0].get("model name", platform.processor()) if cpus else platform.processor() or platform.machine(),
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": physical_cores(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "last_level_cache_bytes": last_level_cache_bytes(),
        "memory_bytes": memory,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES if _version(name)},
        "commit": _git_commit(),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
    }


def summary(info: dict) -> str:
    """Two lines for the top of a report."""
    cache = info["last_level_cache_bytes"]
    cpu = [
        info["date"],
        info["cpu"],
        f"{info['physical_cores']} cores ({info['logical_cpus']} logical)",
        " ".join(info["isa"]) or "no AVX2",
        f"LLC {cache / 2**20:.0f} MiB" if cache else "LLC unknown",
        "load " + " ".join(f"{x:.1f}" for x in info["load_average"] or []),
    ]
    libs = ", ".join(f"{name} {version}" for name, version in info["libraries"].items())
    return " · ".join(cpu) + f"\nPython {info['python']}, {libs} · commit {info['commit']} · `{info['command']}`"
