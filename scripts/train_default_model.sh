#!/usr/bin/env bash
# Train the default model shipped as imagefolder/assets/default-tiny.safetensors (tiny preset, shapes data)
# and the classifier that `imagefolder eval` judges it with. CPU only; see docs/training.md for timings.
# Usage: scripts/train_default_model.sh [RUN_DIR]   (re-running resumes where it stopped)
set -euo pipefail
RUN=${1:-runs/default-tiny}
ASSETS=imagefolder/assets

imagefolder train classifier -o "$ASSETS/shapes-classifier.safetensors" --data shapes --steps 600 -v

imagefolder train tokenizer -o "$RUN/tokenizer" --preset tiny --data shapes --steps 2500 --batch-size 32 \
    --lr 1e-3 --warmup 100 --perceptual structure --teacher "$ASSETS/shapes-classifier.safetensors" \
    --sem-weight 0.1 --disc-weight 0 -v

imagefolder train generator -o "$RUN/generator" --tokenizer "$RUN/tokenizer/tokenizer.safetensors" \
    --data shapes --steps 6000 --batch-size 32 --lr 1e-3 --warmup 200 -v

cp "$RUN/generator/model.safetensors" "$ASSETS/default-tiny.safetensors"
imagefolder eval -n 200 --json-out "$RUN/eval.json"
