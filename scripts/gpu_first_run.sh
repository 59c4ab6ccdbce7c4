#!/usr/bin/env bash
# The TensorRT path's first run on a GPU: what is installed (and whether the driver and GPU can run it),
# engine build, check against ONNX Runtime, generation, per-step latency with CUDA graphs on and off, a
# per-layer profile, the measured time per step beside the memory floor, then the GPU tests.
# docs/gpu-first-run.md says what each step should print.
#
#   scripts/gpu_first_run.sh [BUNDLE] [OUT]
#
# BUNDLE: an exported bundle (default: export the model shipped with the package into OUT/bundle, which
# needs torch). OUT: where everything is written (default: gpu-first-run). Environment: BATCH (default 1),
# CLASS (default 3: valid for the default model's 10 classes and ImageNet's 1000), RUNS (default 20),
# BANDWIDTH_TBS (the GPU's memory bandwidth in TB/s for the floor; H200 4.8 is known by name),
# INSTALL=1 (first install what the steps need into this environment: the TensorRT stack of this machine's
# driver, pytest, and torch/onnxscript only when no BUNDLE is given; never the dev extra, whose CPU
# onnxruntime would sit beside onnxruntime-gpu), PYTHON (default python3), PIP (default "$PYTHON -m pip").
# Stops at the first failing step, except the GPU tests: they run last, after the summary, and their
# failure is reported (and is the exit status) without hiding anything printed before.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${1:-}
OUT=${2:-gpu-first-run}
BATCH=${BATCH:-1}
CLASS=${CLASS:-3}
RUNS=${RUNS:-20}
PYTHON=${PYTHON:-python3}
PIP=${PIP:-$PYTHON -m pip}
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

if [[ "${INSTALL:-0}" == 1 ]]; then
  step "0/9 install what the steps need"
  EXTRAS=$(PYTHONPATH="$REPO" "$PYTHON" -c 'from imagefolder.core import gpu_stack; print(gpu_stack.gpu_extra())')
  [[ -z "$BUNDLE" ]] && EXTRAS="$EXTRAS,export"  # step 2 exports the default model with torch
  $PIP install -e "$REPO[$EXTRAS]" pytest
fi

step "1/9 the stack: driver, GPU, packages"
SMI=$(nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>/dev/null |
  head -n 1 || true)
echo "${SMI:-(no nvidia-smi)}"
SMI="$SMI" "$PYTHON" - <<'PYEOF'
import importlib.metadata as metadata
import os
import sys

from imagefolder.core import cuda, gpu_stack

for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "cuda-python", "cuda-bindings", "polygraphy",
             "onnxruntime-gpu", "onnxruntime", "onnx", "numpy"):
    try:
        print(f"{name:16} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
import tensorrt  # JetPack's comes from apt and has no pip metadata

print(f"{'tensorrt module':16} {tensorrt.__version__}")
problems = []
runtimes = gpu_stack.onnxruntime_distributions()
if len(runtimes) > 1:
    problems.append(f"{' and '.join(runtimes)} are both installed and share one onnxruntime module: "
                    "pip uninstall -y onnxruntime (the GPU extras bring onnxruntime-gpu; the dev extra brings it)")
fields = [f.strip() for f in os.environ["SMI"].split(",")]
if len(fields) == 4 and not gpu_stack.is_jetson():  # name, driver, compute capability, memory
    problem = gpu_stack.driver_problem(fields[1], fields[2], tensorrt.__version__, gpu_stack.tensorrt_cuda_major())
    if problem:
        problems.append(problem)
if problems:
    sys.exit("\n".join(f"Error: {p}" for p in problems))
print(f"driver supports CUDA {gpu_stack.driver_cuda_version()}; the extra for this machine: {gpu_stack.gpu_extra()}")
print(f"{cuda.device_count()} GPU(s); device 0: {cuda.device_properties()}")
PYEOF

if [[ -z "$BUNDLE" ]]; then
  step "2/9 export the default model (torch)"
  BUNDLE="$OUT/bundle"
  imagefolder-export onnx --out "$BUNDLE"
else
  step "2/9 bundle: $BUNDLE"
fi

step "3/9 build engines (batch $BATCH)"
imagefolder-export trt "$BUNDLE" --batch "$BATCH"

step "4/9 engines against ONNX Runtime (polygraphy), operator support from TensorRT's parser"
imagefolder-export check "$BUNDLE" --backend trt --debug "$OUT/check-debug"

step "5/9 generate class $CLASS"
imagefolder generate --bundle "$BUNDLE" --backend trt --class "$CLASS" --seed 0 -o "$OUT/class-$CLASS.png" \
  --indices "$OUT/class-$CLASS.npy"

step "6/9 profile, CUDA graphs on, then off"
imagefolder profile --bundle "$BUNDLE" --backend trt --batch "$BATCH" --runs "$RUNS" --warmup 3 \
  --json "$OUT/profile-graphs.json" --trace "$OUT/trace-graphs.json"
imagefolder profile --bundle "$BUNDLE" --backend trt --batch "$BATCH" --runs "$RUNS" --warmup 3 --no-cuda-graphs \
  --json "$OUT/profile-eager.json" --trace "$OUT/trace-eager.json"

step "7/9 per-layer profile and engine inspector dumps"
imagefolder profile --bundle "$BUNDLE" --backend trt --batch "$BATCH" --runs 3 --warmup 1 --layers \
  --json "$OUT/profile-layers.json"

step "8/9 summary: time per step and per image against the memory floor"
BUNDLE="$BUNDLE" OUT="$OUT" "$PYTHON" - <<'EOF'
import json
import os
from pathlib import Path

from imagefolder.core import cuda

bundle, out = Path(os.environ["BUNDLE"]), Path(os.environ["OUT"])
manifest = json.loads((bundle / "manifest.json").read_text())
weights = manifest["graphs"]["ar_step"]["weights"]["bytes"]  # read once per step, whatever the batch
name = cuda.device_properties()["name"]
known = {"H200": 4.8}
bandwidth = float(os.environ.get("BANDWIDTH_TBS") or next((v for k, v in known.items() if k in name), 0))
steps = len(manifest["model"]["generator"]["scales"])
print(f"{name}; ar_step reads {weights / 1e9:.3f} GB per step; {steps} steps per image")
for label in ("graphs", "eager"):
    for report in json.loads((out / f"profile-{label}.json").read_text())["reports"]:
        image = f"image p50 {report['e2e_ms']['p50'] / report['batch']:.3f} ms; {report['images_per_s']:.1f} images/s"
        if report["mode"] == "graph":  # one stage, the whole generation: no time per step
            device = report["stages"][0]["device_ms"]
            device_ms = device["p50"] if device else float("nan")
            print(f"CUDA graph batch {report['batch']}: generation p50 device {device_ms:.3f} ms; {image}")
            continue
        step = report["time_per_step_ms"]  # None for a model with a single step scale
        per_step = ""
        if step:
            device_ms = step["device"]["p50"] if step["device"] else float("nan")
            per_step = f"step p50 host {step['host']['p50']:.3f} ms, device {device_ms:.3f} ms; "
        print(f"CUDA graphs {'on ' if label == 'graphs' else 'off'} batch {report['batch']}: {per_step}{image}")
if bandwidth:
    floor = weights / (bandwidth * 1e12) * 1e3
    print(f"memory floor at {bandwidth} TB/s: {floor:.3f} ms per step, {floor * steps:.3f} ms per image at batch 1")
else:
    print("set BANDWIDTH_TBS (e.g. 0.2 for Jetson AGX Orin) to print the memory floor")
EOF

step "9/9 the GPU tests (tests/test_trt_gpu.py, from the checkout)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  status=0
  (cd "$REPO" && "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_trt_gpu.py) || status=$?
  if [[ $status != 0 ]]; then
    echo "GPU tests FAILED (pytest exit $status); every number above stands"
    exit "$status"
  fi
else
  echo "skipped: pytest is not installed (INSTALL=1 installs it)"
fi
