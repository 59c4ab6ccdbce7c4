"""Evaluation: tokenizer reconstruction (PSNR, SSIM) and class-conditional sample quality.

Sample quality is measured with the classifier trained here on the same data (``classifier.py``):
- ``class_accuracy``: the fraction of generated images the classifier assigns to the class they
  were generated for;
- ``classifier_frechet_distance``: the Fréchet distance between Gaussians fitted to the classifier's
  pooled features of generated and of held-out real images. It is computed like FID but over a
  different network, so its values are not FID and are not comparable with published FIDs.

``evaluate_checkpoint`` runs both on a checkpoint, as ``imagefolder eval`` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from imagefolder.data import collate, open_dataset
from imagefolder.errors import CheckpointError, InputError
from imagefolder.generate import generate
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.train.classifier import Classifier, default_classifier_path, load_classifier
from imagefolder.train.losses import ssim
from imagefolder.train.options import COUNT, NUCLEUS, SEED, WEIGHT, check_options

log = logging.getLogger(__name__)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,) of images in [0, 1]."""
    mse = (x - y).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: Tokenizer, dataset: Dataset, count: int = 200, batch_size: int = 50
) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of the tokenizer's round trip on the first ``count`` items of ``dataset``."""
    COUNT.check("count", count)
    count = min(count, len(dataset))
    psnrs, ssims = [], []
    for start in range(0, count, batch_size):
        img, _ = collate(dataset, list(range(start, min(count, start + batch_size))))
        img = img.to(next(tokenizer.parameters()).device)
        recon = tokenizer.reconstruct(img) * 0.5 + 0.5
        real = img * 0.5 + 0.5
        psnrs.append(psnr(recon, real))
        ssims.append(ssim(recon, real))
    return {"psnr_db": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item(), "images": count}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D).

    tr(√(Σa Σb)) is computed as the sum of √eigenvalues of √Σa Σb √Σa (symmetric PSD), avoiding a
    general matrix square root.
    """
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(np.square(mu_a - mu_b).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@torch.no_grad()
def generate_balanced(
    generator: Generator, tokenizer: Tokenizer, count: int, batch_size: int = 50, seed: int = 0, **sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images with labels cycling through the classes: images (N, 3, H, W) in [-1, 1], labels (N,)."""
    num_classes = generator.cfg.num_classes
    device = next(generator.parameters()).device
    labels = torch.arange(count, device=device) % num_classes
    images = []
    for i, start in enumerate(range(0, count, batch_size)):
        imgs, _ = generate(generator, tokenizer, labels[start : start + batch_size], seed=seed + i, **sampling)
        images.append(imgs)
    return torch.cat(images), labels


@torch.no_grad()
def evaluate_generation(
    generator: Generator,
    tokenizer: Tokenizer,
    classifier: Classifier,
    real: Dataset,
    count: int = 200,
    seed: int = 0,
    **sampling,
) -> dict[str, float]:
    """Class accuracy of ``count`` generated images and the classifier Fréchet distance to ``count`` real ones.

    Args:
        sampling: ``cfg``, ``top_k``, ``top_p`` of ``imagefolder.generate.generate`` (its defaults otherwise).
    """
    COUNT.check("count", count)
    if classifier.cfg.num_classes != generator.cfg.num_classes:
        raise InputError(
            f"classifier knows {classifier.cfg.num_classes} classes, the generator {generator.cfg.num_classes}; "
            f"pass a classifier trained on the generator's data (`imagefolder train classifier`)"
        )
    images, labels = generate_balanced(generator, tokenizer, count, seed=seed, **sampling)
    fake_feats, correct = [], 0
    for start in range(0, count, 100):
        batch = images[start : start + 100].to(next(classifier.parameters()).device)
        feats = classifier.features(batch)
        correct += (classifier.head(feats).argmax(-1).cpu() == labels[start : start + 100].cpu()).sum().item()
        fake_feats.append(feats.cpu())
    real_img, _ = collate(real, list(range(min(count, len(real)))))
    real_feats = torch.cat([classifier.features(real_img[s : s + 100]) for s in range(0, len(real_img), 100)])
    fd = frechet_distance(torch.cat(fake_feats).numpy(), real_feats.cpu().numpy())
    accuracy = correct / count
    log.info("class accuracy %.4f, classifier Fréchet distance %.3f over %d images", accuracy, fd, count)
    return {
        "class_accuracy": accuracy,
        "classifier_frechet_distance": fd if math.isfinite(fd) else float("nan"),
        "images": count,
    }


@dataclass(frozen=True)
class EvalConfig:
    """Options of one evaluation (``imagefolder eval``'s flags); out-of-range values raise ``InputError``."""

    checkpoint: str | None = None  # None: the model that ships with the package
    data: str = "shapes"  # held-out split of this data set
    classifier: str | None = None  # the judge of generated samples; None: the shipped shapes classifier
    num_images: int = 200
    reconstruction: bool = True
    generation: bool = True
    cfg: float = 3.25
    top_k: int = 750
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(vars(self), _EVAL_RANGES)


_EVAL_RANGES = {"num_images": COUNT, "cfg": WEIGHT, "top_k": COUNT, "top_p": NUCLEUS, "seed": SEED}


def evaluate_checkpoint(opts: EvalConfig) -> dict:
    """Reconstruction PSNR/SSIM and, for a generator, class accuracy and classifier Fréchet distance.

    Returns:
        A JSON-ready dict: the checkpoint, the data, ``reconstruction`` when measured and
        ``generation`` (with its sampling settings) when the checkpoint has a generator.
    """
    from imagefolder.checkpoints import load_checkpoint_models
    from imagefolder.default_model import default_weights_path

    path = Path(opts.checkpoint) if opts.checkpoint else default_weights_path()
    config, tokenizer, generator = load_checkpoint_models(path)
    heldout = open_dataset(opts.data, config.tokenizer.image_size, heldout=True)
    result: dict = {"checkpoint": str(path), "data": opts.data}
    torch.manual_seed(opts.seed)
    if opts.reconstruction and tokenizer is not None:
        result["reconstruction"] = evaluate_reconstruction(tokenizer, heldout, opts.num_images)
    if opts.generation and generator is not None:
        if tokenizer is None:
            raise CheckpointError(f"{path} holds no tokenizer, which generation needs; pass --no-generation")
        judge = load_classifier(opts.classifier or default_classifier_path())
        sampling = {"cfg": opts.cfg, "top_k": opts.top_k, "top_p": opts.top_p}
        result["generation"] = evaluate_generation(
            generator, tokenizer, judge, heldout, opts.num_images, opts.seed, **sampling
        )
        result["generation"]["sampling"] = sampling
    return result
