#!/usr/bin/env bash
# Train the default model shipped as imagefolder/assets/default-tiny.safetensors (tiny preset, shapes data)
# and the classifier that `imagefolder eval` judges it with. CPU only; see docs/training.md for timings
# and the measured numbers of the shipped file.
# Usage: scripts/train_default_model.sh [RUN_DIR]   (re-running resumes where it stopped)
set -euo pipefail
RUN=${1:-runs/default-tiny}
ASSETS=imagefolder/assets
# Two cores: one process at a time uses both (running two trainings side by side oversubscribes them).

imagefolder train classifier -o "$ASSETS/shapes-classifier.safetensors" --data shapes --steps 600 -v

# Tokenizer: MSE + codebook/commitment + quantizer dropout, from-scratch init (LayerScale γ=1, 2D sin-cos
# positions) and the latent warm-up (first 1000 steps) that are the trainer's defaults; no perceptual,
# semantic or adversarial loss for this small CPU model (see docs/training.md).
imagefolder train tokenizer -o "$RUN/tokenizer" --preset tiny --data shapes --steps 6000 --batch-size 16 \
    --lr 2e-3 --warmup 100 --perceptual none --teacher none --sem-weight 0 --disc-weight 0 --ema-decay 0.995 \
    --log-every 100 --save-every 500 -v

imagefolder train generator -o "$RUN/generator" --tokenizer "$RUN/tokenizer/tokenizer.safetensors" \
    --data shapes --steps 5000 --batch-size 32 --lr 1e-3 --warmup 200 --log-every 100 --save-every 500 -v

cp "$RUN/generator/model.safetensors" "$ASSETS/default-tiny.safetensors"
imagefolder eval -n 200 --json-out "$RUN/eval.json"
