#!/usr/bin/env bash
# The device check (scripts/device_check.py) as one command on a GPU machine without TensorRT; see
# docs/device-check.md. Installs the carried cuda-python wheels (.whl/) into a private folder, runs the
# check with the given arguments, and leaves device-check.json and device-check.log in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-device-check-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-deps --no-index --target .whl/site .whl/*.whl
    export PYTHONPATH=".whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 scripts/device_check.py "$@" 2>&1 | tee "$OUT/device-check.log"
