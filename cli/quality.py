"""``imagefolder-export check --quality BUNDLE --against DENSE``: what a pruned or integer bundle costs in quality.

It lives with the commands because it needs both sides: the runtime generates, the torch classifier judges
(``export/`` may not import the runtime, and the runtime may not import torch).

Both bundles generate the same images (same classes, seeds and sampling settings, ONNX Runtime's CPU
provider, which runs every bundle kind) and are compared:

- token agreement per scale: the share of tokens equal to the dense bundle's. It is 1 before the first
  scale that differs and falls after it, since a changed token changes every later scale's input;
- PSNR of each image to the dense bundle's image of the same seed (dB; identical images count as 100 dB);
- where the bundle's model is the default one (the weights shipped with the package), the shipped shapes
  classifier's class accuracy and Fréchet distance of its features to held-out real images
  (``imagefolder.train.eval``), for both bundles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagefolder.core.bundle import Bundle, load_bundle
from imagefolder.core.pruning import describe
from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import BundleError
from imagefolder.io import sha256_file

IDENTICAL_DB = 100.0  # the PSNR reported for two identical images


@dataclass
class QualityReport:
    """The comparison of one bundle with its dense reference on the same images."""

    bundle: str
    against: str
    images: int
    scale_agreement: list[float]
    psnr_db: list[float]  # per image
    classifier: dict[str, dict[str, float]] = field(default_factory=dict)  # "bundle"/"dense" → metrics
    notes: list[str] = field(default_factory=list)

    @property
    def token_agreement(self) -> float:
        return float(np.mean(self.scale_agreement)) if self.scale_agreement else 1.0

    def to_dict(self) -> dict:
        return {
            "bundle": self.bundle,
            "against": self.against,
            "images": self.images,
            "scale_agreement": self.scale_agreement,
            "psnr_db": {"mean": float(np.mean(self.psnr_db)), "median": float(np.median(self.psnr_db))},
            "classifier": self.classifier,
        }

    def table(self) -> str:
        lines = [f"{self.bundle} against {self.against}, {self.images} images (same classes and seeds)", ""]
        lines.append("scale  tokens equal to the dense bundle's")
        lines += [f"{si:>5}  {share:.2%}" for si, share in enumerate(self.scale_agreement)]
        psnr = np.asarray(self.psnr_db)
        lines += [
            "",
            f"PSNR to the dense images: mean {psnr.mean():.2f} dB, median {np.median(psnr):.2f} dB, "
            f"10th percentile {np.percentile(psnr, 10):.2f} dB",
        ]
        if self.classifier:
            ours, dense = self.classifier["bundle"], self.classifier["dense"]
            lines += [
                "",
                "shipped classifier        bundle      dense     change",
                f"class accuracy         {ours['class_accuracy']:>9.2%}  {dense['class_accuracy']:>9.2%}  "
                f"{100 * (ours['class_accuracy'] - dense['class_accuracy']):>+8.2f} points",
                f"Fréchet distance       {ours['frechet_distance']:>9.3f}  {dense['frechet_distance']:>9.3f}  "
                f"{ours['frechet_distance'] / max(dense['frechet_distance'], 1e-12) - 1:>+9.1%}",
            ]
        return "\n".join(lines + ([""] + self.notes if self.notes else []))


def is_default_model(bundle: Bundle) -> bool:
    """Was the bundle exported from the default model's weights (those shipped with the package)?"""
    from imagefolder.default_model import default_weights_path

    weights = default_weights_path()
    recorded = bundle.manifest.get("source", {}).get("sha256")
    return weights.is_file() and recorded == sha256_file(weights)


def compare_quality(
    bundle_dir: str | Path,
    dense_dir: str | Path,
    images: int = 100,
    params: SamplingParams | None = None,
    threads: int | None = None,
) -> QualityReport:
    """Generate ``images`` images (classes in turn) on both bundles with the same seeds and compare them.

    Raises:
        BundleError: the bundles hold different models (configuration, or the checkpoint they were exported from).
    """
    from imagefolder.runtime.backends.ort import OrtBackend
    from imagefolder.runtime.loop import generate

    bundle, dense = load_bundle(bundle_dir), load_bundle(dense_dir)
    if bundle.model != dense.model or bundle.manifest.get("source") != dense.manifest.get("source"):
        raise BundleError(
            f"{bundle.path} and {dense.path} hold different models (configuration or source checkpoint); "
            "compare two bundles exported from one checkpoint"
        )
    params = params or SamplingParams()
    labels = [i % bundle.num_classes for i in range(images)]
    ours = generate(OrtBackend(bundle, threads=threads), labels, params)
    reference = generate(OrtBackend(dense, threads=threads), labels, params)
    agreement = [
        float((ours.indices[:, :, start : start + q] == reference.indices[:, :, start : start + q]).mean())
        for start, q in bundle.spans
    ]
    report = QualityReport(
        str(bundle.path),
        str(dense.path),
        images,
        agreement,
        per_image_psnr(ours.images, reference.images).tolist(),
        notes=[f"bundle: {describe(bundle.manifest)}; {bundle.compute} compute, {bundle.weights} weights"],
    )
    if is_default_model(bundle):
        report.classifier = {
            "bundle": classifier_metrics(ours.images, labels),
            "dense": classifier_metrics(reference.images, labels),
        }
    else:
        report.notes.append("classifier metrics: only for the default model (the shipped classifier knows its data)")
    return report


def per_image_psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(B,) PSNR in dB of images in [-1, 1] against ``reference`` ([0, 1] scale; identical: ``IDENTICAL_DB``)."""
    diff = (images.astype(np.float64) - reference.astype(np.float64)) / 2
    mse = np.square(diff).reshape(len(images), -1).mean(axis=1)
    return np.where(mse > 0, -10 * np.log10(np.maximum(mse, 1e-300)), IDENTICAL_DB).clip(max=IDENTICAL_DB)


def classifier_metrics(images: np.ndarray, labels: list[int]) -> dict[str, float]:
    """The shipped classifier's accuracy on ``images`` and the Fréchet distance of its features to as many
    held-out real images (``imagefolder eval``'s measures)."""
    import torch

    from imagefolder.data import collate, open_dataset
    from imagefolder.train.classifier import default_classifier_path, load_classifier
    from imagefolder.train.eval import frechet_distance

    judge = load_classifier(default_classifier_path())
    real = open_dataset("shapes", images.shape[-1], heldout=True)
    with torch.no_grad():
        feats, correct = [], 0
        for start in range(0, len(images), 100):
            batch = torch.from_numpy(images[start : start + 100])
            features = judge.features(batch)
            correct += int((judge.head(features).argmax(-1).numpy() == np.asarray(labels[start : start + 100])).sum())
            feats.append(features.numpy())
        real_images, _ = collate(real, list(range(min(len(images), len(real)))))
        real_feats = np.concatenate(
            [judge.features(real_images[s : s + 100]).numpy() for s in range(0, len(real_images), 100)]
        )
    return {
        "class_accuracy": correct / len(images),
        "frechet_distance": frechet_distance(np.concatenate(feats), real_feats),
    }
