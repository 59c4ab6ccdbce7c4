"""Sample quality of quantized generator weights on the shipped default model (ONNX Runtime, CPU).

The default model is exported with fp32, int8 and int4 generator weights. Each bundle generates the
same images (labels cycling through the classes, one seed per batch), and every image is judged
like ``imagefolder eval`` judges the PyTorch model (``imagefolder/train/eval.py``): the shipped
classifier's class accuracy, and the Fréchet distance between its pooled features of the generated
images and of as many held-out real ones. Token agreement is the fraction of the (B, 2, P) indices
equal to the fp32 bundle's: greedy, one image per class and guidance weight in ``GUIDANCE`` (greedy
tokens depend on nothing else), and with the official sampling settings for the judged images. The
row "fp, other seeds" is the fp32 bundle with other seeds: the spread of accuracy and distance that
sampling alone causes at this number of images.

    python bench/quantized_quality.py --images 500
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from imagefolder.core.schedule import SamplingParams
from imagefolder.data import collate, open_dataset
from imagefolder.default_model import load_default_or_checkpoint
from imagefolder.export.onnx_export import export_bundle
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.loop import generate
from imagefolder.train.classifier import default_classifier_path, load_classifier
from imagefolder.train.eval import frechet_distance

SCHEMES = ("fp", "int8", "int4")
GUIDANCE = (1.0, 2.0, 3.25, 4.5, 6.0)
BATCH = 50  # images per generate call (the bundles are exported with --batch-max BATCH)


def greedy_indices(backend: OrtBackend) -> np.ndarray:
    """Greedy indices of every (guidance weight, class) pair."""
    labels = list(range(backend.num_classes))
    greedy = [SamplingParams(cfg=cfg, top_k=1, top_p=1.0) for cfg in GUIDANCE]
    return np.concatenate([images_and_indices(backend, len(labels), params)[1] for params in greedy])


def images_and_indices(backend: OrtBackend, count: int, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (labels i % classes), seed ``params.seed + batch number``: images and indices."""
    images, indices = [], []
    for b, start in enumerate(range(0, count, BATCH)):
        labels = [i % backend.num_classes for i in range(start, min(count, start + BATCH))]
        step = SamplingParams(cfg=params.cfg, top_k=params.top_k, top_p=params.top_p, seed=params.seed + b)
        result = generate(backend, labels, step)
        images.append(result.images)
        indices.append(result.indices)
    return np.concatenate(images), np.concatenate(indices)


@torch.no_grad()
def judge(images: np.ndarray, real_features: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Class accuracy and classifier Fréchet distance of generated images (labels i % classes)."""
    classifier = load_classifier(default_classifier_path())
    x = torch.from_numpy(images)
    features = torch.cat([classifier.features(x[s : s + 100]) for s in range(0, len(x), 100)])
    predicted = classifier.head(features).argmax(-1).numpy()
    accuracy = float((predicted == np.arange(len(images)) % num_classes).mean())
    return accuracy, frechet_distance(features.numpy(), real_features)


@torch.no_grad()
def real_features(count: int, image_size: int) -> np.ndarray:
    classifier = load_classifier(default_classifier_path())
    real, _ = collate(open_dataset("shapes", image_size, heldout=True), list(range(count)))
    return torch.cat([classifier.features(real[s : s + 100]) for s in range(0, count, 100)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config, tokenizer, generator, source = load_default_or_checkpoint()
    official = SamplingParams(seed=args.seed)  # cfg 3.25, top-k 750 (the whole codebook here), top-p 0.95
    reference = real_features(args.images, config.tokenizer.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, dict] = {}
        for weights in SCHEMES:
            path = export_bundle(
                Path(tmp) / weights,
                tokenizer,
                generator,
                config,
                batch_max=BATCH,
                weights=weights,
                source=source,
                progress=False,
            )
            backend = OrtBackend(path)
            results[weights] = {
                "greedy": greedy_indices(backend),
                "official": images_and_indices(backend, args.images, official),
            }
            if weights == "fp":
                reseeded = SamplingParams(seed=args.seed + 10_000)
                results["fp, other seeds"] = {
                    "greedy": results["fp"]["greedy"],
                    "official": images_and_indices(backend, args.images, reseeded),
                }
    print(f"default model ({config.name}), ONNX Runtime CPU; greedy: {len(GUIDANCE)} guidance weights × classes; ")
    print(f"sampled (cfg 3.25, top-k 750, top-p 0.95): {args.images} images, which the classifier judges")
    print(f"{'weights':<16} {'greedy tokens = fp32':>21} {'sampled tokens = fp32':>22} {'class acc':>10} {'FD':>8}")
    for weights, r in results.items():
        greedy_same = (r["greedy"] == results["fp"]["greedy"]).mean()
        sampled_same = (r["official"][1] == results["fp"]["official"][1]).mean()
        accuracy, distance = judge(r["official"][0], reference, config.generator.num_classes)
        print(f"{weights:<16} {greedy_same:>21.3f} {sampled_same:>22.3f} {accuracy:>10.3f} {distance:>8.3f}")


if __name__ == "__main__":
    main()
