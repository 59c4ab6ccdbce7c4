"""Job ``dtypes``: bundle precisions side by side, speed and quality.

- speed, on the preset (random weights), ONNX Runtime, batch 1, every bundle interleaved: end to end
  and time per step p50, and the token agreement with the fp32 bundle run by run (same seeds);
- quality, on the default model (the shipped tiny model, trained): the class accuracy of generated
  images as judged by the shipped classifier (``imagefolder.train.classifier``, as ``imagefolder
  eval`` does), and the token agreement with fp32.

fp32 and fp16 always; int8 and int4 generator weights (on fp32 bundles) wherever ``export_bundle``
takes ``weights=`` (since the ``quantize`` merge), a printed note where it does not.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.bundles import DEFAULT_MODEL, bundle_bytes, weight_formats
from bench.context import Context
from bench.report import JobResult, median, ms, ratio, table
from bench.timing import Plan, agreement, measure
from imagefolder.core.schedule import SamplingParams
from imagefolder.runtime.loop import generate
from imagefolder.train.classifier import default_classifier_path, load_classifier


def _formats() -> list[tuple[str, str | None]]:
    return [("fp32", None), ("fp16", None), *(("fp32", w) for w in weight_formats())]


def _label(dtype: str, weights: str | None) -> str:
    return weights or dtype


def _class_accuracy(images: np.ndarray, labels: list[int]) -> float:
    judge = load_classifier(default_classifier_path())
    with torch.no_grad():
        logits = torch.cat([judge(torch.from_numpy(images[i : i + 100])) for i in range(0, len(images), 100)])
    return float((logits.argmax(-1).numpy() == np.asarray(labels)).mean())


def prepare(ctx: Context) -> None:
    for name in (None, DEFAULT_MODEL):
        for dtype, weights in _formats():
            ctx.ort(name, dtype, weights)


def run(ctx: Context) -> JobResult:
    allot = ctx.budget.allot("dtypes")
    formats = _formats()
    notes = []
    if len(formats) == 2:
        message = "int8, int4: skipped: `export_bundle` takes no `weights=` yet (branch `quantize`)"
        ctx.say(message)
        notes.append(message)
    bundles = {_label(*f): ctx.bundle(None, *f) for f in formats}
    backends = {_label(*f): ctx.ort(None, *f) for f in formats}
    plan = Plan(0.8 * allot, ctx.options.warmup, min_runs=1, max_runs=ctx.options.runs)
    measured = measure(backends, 1, plan, ctx.say)
    base = measured["fp32"]
    speed = {
        label: {
            "e2e_ms": median(m.e2e_ms),
            "time_per_step_ms": m.report["time_per_step_ms"]["host"]["p50"],
            "token_agreement": agreement(base.indices, m.indices),
            "bundle_bytes": bundle_bytes(bundles[label].manifest),
        }
        for label, m in measured.items()
    }
    quality = _quality(ctx, formats)
    rows = [
        [
            label,
            f"{speed[label]['bundle_bytes'] / 1e6:.3g}",
            ms(speed[label]["e2e_ms"]),
            ms(speed[label]["time_per_step_ms"]),
            ratio(speed["fp32"]["e2e_ms"] / speed[label]["e2e_ms"]),
            f"{speed[label]['token_agreement']:.2%}",
            f"{quality[label]['class_accuracy']:.2f}",
            f"{quality[label]['token_agreement']:.2%}",
        ]
        for label in speed
    ]
    headers = [
        "bundle",
        "bundle MB",
        "end to end ms",
        "per step ms",
        "speed-up vs fp32",
        "tokens = fp32",
        "default model: class accuracy",
        "default model: tokens = fp32",
    ]
    runs = base.report["runs"]
    images = ctx.options.quality_images
    notes.insert(
        0,
        f"speed: {ctx.options.preset} with random weights, ort, batch 1, p50 over {runs} runs, official sampling "
        f"(cfg 3.25, top-k 750, top-p 0.95); quality: the default model, {images} images (its classes in turn), "
        "judged by the shipped classifier",
    )
    return JobResult("dtypes", "Bundle dtypes", {"speed": speed, "quality": quality}, [table(headers, rows)], notes)


def _quality(ctx: Context, formats: list[tuple[str, str | None]]) -> dict:
    count = ctx.options.quality_images
    classes = ctx.models(DEFAULT_MODEL).config.generator.num_classes
    labels = [i % classes for i in range(count)]
    out, reference = {}, None
    for dtype, weights in formats:
        label = _label(dtype, weights)
        ctx.say(f"quality: {count} images of the default model, {label} bundle")
        result = generate(ctx.ort(DEFAULT_MODEL, dtype, weights), labels, SamplingParams(seed=0))
        reference = result.indices if reference is None else reference
        out[label] = {
            "class_accuracy": _class_accuracy(result.images, labels),
            "token_agreement": agreement([reference], [result.indices]),
        }
    return out
