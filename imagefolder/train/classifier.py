"""A small image classifier trained here: the fallback semantic teacher and the judge of ``eval``.

Evaluation of generated samples needs a classifier that knows the classes, and the standard ones
(Inception for FID) need weights that cannot ship. This CNN trains on the same data in about a
minute on two CPU cores; its pooled features give the "classifier Fréchet distance" of ``eval``
(a Fréchet distance like FID, over this classifier's features, so not comparable to FID).

Training applies blur, noise and contrast changes so the classifier judges class, not the
sharpness a tokenizer may lose. Weights are saved as safetensors with the config in the metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from imagefolder.checkpoints.native import write_safetensors
from imagefolder.checkpoints.strict import load_strict
from imagefolder.data import collate, open_dataset
from imagefolder.errors import CheckpointError
from imagefolder.train.common import IndexStream, lr_factor, seed_everything
from imagefolder.train.options import COUNT, POSITIVE, SEED, check_options

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "imagefolder-classifier/1"
DEFAULT_CLASSIFIER = "shapes-classifier.safetensors"


class ClassifierError(CheckpointError):
    """A classifier file is missing, corrupted, or of another format."""


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int = 10
    image_size: int = 64
    width: int = 32  # channels of the first stage; doubled at each of the 3 later stages (capped)
    feature_dim: int = 128  # pooled feature size: equal to the tokenizer width so quant_conv can project it


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1),
        nn.GroupNorm(8, cout),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.GELU(),
    )


class Classifier(nn.Module):
    """Four stride-2 conv stages, global average pooling, a linear head."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        widths = [w, 2 * w, 4 * w, cfg.feature_dim]
        self.stages = nn.Sequential(*(_stage(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths, strict=True)))
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> pooled features (B, feature_dim)."""
        return self.stages(img).mean(dim=(2, 3))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(img))  # (B, num_classes)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def default_classifier_path() -> Path:
    """The classifier shipped with the default model (judges the shapes classes)."""
    return Path(str(resources.files("imagefolder") / "assets" / DEFAULT_CLASSIFIER))


def save_classifier(path: str | Path, model: Classifier, meta: dict | None = None) -> None:
    """Write the classifier's weights, config and ``meta`` as one ``.safetensors`` file, atomically."""
    metadata = {"format": CLASSIFIER_FORMAT, "config": json.dumps(asdict(model.cfg)), "meta": json.dumps(meta or {})}
    write_safetensors(path, model.state_dict(), metadata)


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Load a classifier saved by ``save_classifier``, in eval mode.

    Raises:
        ClassifierError: the file is missing, unreadable, or not a classifier.
        CheckpointError: a tensor is missing, unexpected, of the wrong shape or dtype, or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier {path} does not exist; train one with `imagefolder train classifier`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:
        raise ClassifierError(f"cannot read classifier {path}: {err}") from err
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierError(f"{path} is not an imagefolder classifier (format {metadata.get('format')!r})")
    try:
        model = Classifier(ClassifierConfig(**json.loads(metadata["config"])))
    except (KeyError, TypeError, ValueError) as err:
        raise ClassifierError(f"{path}: invalid classifier config metadata ({err})") from err
    load_strict(model, state, "classifier", str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def degrade(img: torch.Tensor) -> torch.Tensor:
    """Random blur (half the batch), noise and contrast: robustness to imperfect generated images."""
    b = img.shape[0]
    blurred = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(b, 1, 1, 1) < 0.5).to(img.dtype)
    img = pick * blurred + (1 - pick) * img
    img = img * (0.8 + 0.4 * torch.rand(b, 1, 1, 1)) + 0.05 * torch.randn_like(img)
    return img.clamp(-1, 1)


_CLASSIFIER_RANGES = {"steps": COUNT, "batch_size": COUNT, "lr": POSITIVE, "seed": SEED, "eval_count": COUNT}


def train_classifier(
    data: str,
    out: str | Path,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    config: ClassifierConfig | None = None,
    progress: bool = True,
    eval_count: int = 500,
) -> tuple[Classifier, float]:
    """Train on ``data`` and save to ``out``; returns the model and its accuracy on ``eval_count`` held-out images.

    Raises:
        InputError: a numeric argument out of its range (checked before anything is trained or written).
    """
    arguments = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "eval_count": eval_count}
    check_options(arguments, _CLASSIFIER_RANGES)
    seed_everything(seed)
    train_set = open_dataset(data, (config or ClassifierConfig()).image_size)
    num_classes = getattr(train_set, "num_classes", 10)
    config = config or ClassifierConfig(num_classes=num_classes)
    model = Classifier(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    stream = IndexStream(len(train_set), seed)
    bar = tqdm(range(steps), disable=not progress, desc="classifier")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, min(50, steps // 10 + 1), "cosine", 0.01)
        img, labels = collate(train_set, stream.next_batch(batch_size))
        loss = F.cross_entropy(model(degrade(img)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    accuracy = classifier_accuracy(model, open_dataset(data, config.image_size, heldout=True), eval_count)
    log.info("classifier held-out accuracy %.4f", accuracy)
    save_classifier(out, model, {"data": data, "steps": steps, "heldout_accuracy": accuracy})
    return model, accuracy


@torch.no_grad()
def classifier_accuracy(model: Classifier, dataset, count: int, batch_size: int = 100) -> float:
    """Top-1 accuracy on the first ``count`` items of ``dataset``."""
    count = min(count, len(dataset))
    correct = 0
    for start in range(0, count, batch_size):
        img, labels = collate(dataset, list(range(start, min(count, start + batch_size))))
        correct += (model(img).argmax(-1) == labels).sum().item()
    return correct / count
