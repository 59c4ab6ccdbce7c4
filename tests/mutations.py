"""Realistic one-line mistakes in the TensorRT path, each put into a copy of the repository and run against the
tests that should catch it: proof that the test doubles (tests/fakes) are strict where it matters.

    python -m tests.mutations             # every mistake; exit 1 if any is missed
    python -m tests.mutations -k cache    # those whose name contains "cache"
    make test-mutations                   # the same as the first (not part of `make test`: about 5 minutes)

Each mistake is one exact text replacement in one file (the original must occur exactly once, so a refactor
that moves the line makes the mistake fail loudly instead of silently testing nothing). The copy holds the
files git tracks plus untracked ones not ignored, and runs with the checkout's Python; its tests import the
copy (pytest puts the copy's root first on ``sys.path``). A mistake is *caught* when its tests fail.

Not listed, because CUDA makes them harmless (and the fake, following CUDA, lets them pass): a download
into pageable memory without a synchronisation (``cudaMemcpyAsync`` into pageable memory returns once the
copy completed), and reading event times without synchronising the end event after the stream itself was
synchronised.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ON_FAKES = "tests/test_trt_on_fakes.py"
PRECISIONS = "tests/test_trt_precisions.py"
CACHE = "tests/test_trt_cache.py"
SESSION = "runtime/backends/trt/session.py"
GENERATION = f"{ON_FAKES}::test_generation_is_token_identical_to_onnx_runtime"


@dataclass(frozen=True)
class Mistake:
    name: str
    path: str
    original: str
    mistaken: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions


MISTAKES = [
    Mistake(
        "reads the pinned outputs before the stream is synchronised",
        SESSION,
        "                run_stages(self, self.num_scales, stage)\n            stream.synchronize()\n",
        "                run_stages(self, self.num_scales, stage)\n",
        (GENERATION,),
    ),
    Mistake(
        "stages the request in pageable memory, captured into the CUDA graph",
        SESSION,
        'cuda.memcpy_async(self.request.ptr, self.request_host.ptr, self.layout.nbytes, "htod", stream)',
        "cuda.memcpy_htod_async(self.request.ptr, self.request_host.array.copy(), stream)",
        (GENERATION,),
    ),
    Mistake(
        "gives the builder its workspace limit in MiB where TensorRT wants bytes",
        "export/trt_build.py",
        "int(workspace_mib) << 20)",
        "int(workspace_mib))",
        (f"{PRECISIONS}::test_the_workspace_limit_reaches_tensorrt_in_bytes",),
    ),
    Mistake(
        "gives the builder its workspace limit in KiB",
        "export/trt_build.py",
        "int(workspace_mib) << 20)",
        "int(workspace_mib) << 10)",
        (f"{PRECISIONS}::test_the_workspace_limit_reaches_tensorrt_in_bytes",),
    ),
    Mistake(
        "treats a half-precision binding as float32",
        "runtime/backends/trt/engine.py",
        'trt.DataType.HALF: np.dtype("float16"),',
        'trt.DataType.HALF: np.dtype("float32"),',
        (f"{PRECISIONS}::test_a_half_precision_bundle_runs_through_tensorrt_with_onnx_runtime_tokens",),
    ),
    Mistake(
        "fixes the cache element size at 4 bytes",
        SESSION,
        'self.cache_esize = self._dtype("ar_step", "keys").itemsize',
        "self.cache_esize = 4",
        (f"{PRECISIONS}::test_a_half_precision_bundle_runs_through_tensorrt_with_onnx_runtime_tokens",),
    ),
    Mistake(
        "loads a version-compatible plan without allowing host code",
        "runtime/backends/trt/backend.py",
        'if record.get("flags", {}).get("version_compat"):',
        'if record.get("flags", {}).get("version_compatible"):',
        (f"{PRECISIONS}::test_a_version_compatible_plan_loads_only_with_host_code_allowed",),
    ),
    Mistake(
        "appends every scale's keys and values at cache position 0",
        SESSION,
        "cache.ptr + cache_offset + start * head_dim * self.cache_esize,",
        "cache.ptr + cache_offset,",
        (CACHE,),
    ),
    Mistake(
        "appends each scale one position late",
        SESSION,
        "cache.ptr + cache_offset + start * head_dim * self.cache_esize,",
        "cache.ptr + cache_offset + (start + 1) * head_dim * self.cache_esize,",
        (CACHE,),
    ),
    Mistake(
        "binds the cache layers in reverse order",
        SESSION,
        "return {name: cache.ptr + layer * self.cache_stride for layer, name in enumerate(names)}",
        "return {name: cache.ptr + (len(names) - 1 - layer) * self.cache_stride for layer, name in enumerate(names)}",
        (CACHE,),
    ),
    Mistake(
        "keeps the last generation's f̂ (stale state in a reused session)",
        SESSION,
        "        self.f_hat[0].zero(stream)  # fold(0) reads buffer 0; a reused session starts from an empty f̂\n",
        "",
        (GENERATION,),
    ),
    Mistake(
        "captures the first generation, before TensorRT's set-up enqueue",
        SESSION,
        "if self.graph is None and self.use_graph and self.generations and not self.capture_failed:",
        "if self.graph is None and self.use_graph and not self.capture_failed:",
        (GENERATION,),
    ),
    Mistake(
        "builds the sampler with TF32, whose cumulative sums then move the draw boundaries",
        "export/trt_build.py",
        "if not tf32 or graph in EXACT_FP32_GRAPHS:",
        "if not tf32:",
        ("tests/test_trt_numerics.py::test_the_engine_check_judges_tf32_engines_by_their_own_row",),
    ),
    Mistake(
        "returns views of the pinned output staging, which the next generation overwrites",
        SESSION,
        "return self.images_host.copy(), self.indices_host.copy()",
        "return self.images_host, self.indices_host",
        (GENERATION,),
    ),
    Mistake(
        "counts work recorded into a capture as launches",
        "imagefolder/core/cuda.py",
        "        if not self.capturing:\n            self.launches += 1\n",
        "        self.launches += 1\n",
        (GENERATION,),
    ),
]


def copy_repository(dest: Path) -> None:
    """The files git tracks plus untracked files it does not ignore, as they are in the checkout now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        source = ROOT / os.fsdecode(raw)
        target = dest / os.fsdecode(raw)
        if source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(copy: Path, mistake: Mistake) -> str:
    """Put ``mistake`` into ``copy``; returns the original text of the file, for ``restore``."""
    path = copy / mistake.path
    text = path.read_text()
    count = text.count(mistake.original)
    if count != 1:
        raise SystemExit(f"mistake {mistake.name!r}: its original text occurs {count} times in {mistake.path}")
    path.write_text(text.replace(mistake.original, mistake.mistaken))
    return text


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(passed, the last lines of pytest's output) for ``tests`` in ``copy``."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0", *tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    return result.returncode == 0, "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="pattern", default="", help="only the mistakes whose name contains this text")
    args = parser.parse_args(argv)
    chosen = [m for m in MISTAKES if args.pattern in m.name]
    missed = []
    with tempfile.TemporaryDirectory(prefix="imagefolder-mutations-") as tmp:
        copy = Path(tmp) / "imagefolder"  # in a folder of its own: the suite refuses reads beside the repository
        copy_repository(copy)
        passed, tail = run_tests(copy, tuple(sorted({test for m in chosen for test in m.tests})))
        if not passed:  # the unmutated copy must pass, or every mistake would look caught
            print(f"the unmutated copy fails its tests:\n{tail}")
            return 2
        for mistake in chosen:
            original = apply(copy, mistake)
            started = time.monotonic()
            try:
                passed, tail = run_tests(copy, mistake.tests)
            finally:
                (copy / mistake.path).write_text(original)
            verdict = "MISSED" if passed else "caught"
            print(f"{verdict:7} {time.monotonic() - started:5.0f} s  {mistake.name}", flush=True)
            if passed:
                missed.append(mistake.name)
                print(f"        {tail}")
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mistakes caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
