"""Tokenizer training losses: perceptual, adversarial (discriminator, DiffAug, hinge, LeCAM,
adaptive weight) and the semantic InfoNCE against a frozen teacher.

Where the official recipe (``imagefolder-official.md`` §2) needs weights that cannot ship with the
package, a substitute is used and named:
- perceptual: LPIPS (VGG) when ``lpips`` is installed and torchvision's VGG16 weights are in the
  torch hub cache; otherwise ``StructureLoss`` (multi-scale Sobel-gradient L1 + 1 - SSIM), which
  needs no weights;
- discriminator: the official ``DinoDisc`` heads sit on a frozen DINO ViT-S; here a small
  spectral-norm patch CNN trained from scratch (``PatchDiscriminator``);
- semantic teacher: DINOv2 ViT-B/14 when its hub repository and weights are cached locally
  (``load_teacher``); otherwise the shapes classifier trained by this package.

Images are (B, 3, H, W) in [-1, 1] throughout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from imagefolder.errors import ImagefolderError, InputError

log = logging.getLogger(__name__)


class MissingWeights(ImagefolderError, FileNotFoundError):
    """Pretrained weights (LPIPS, DINOv2) are not on this machine; nothing is downloaded."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_REPO = "facebookresearch_dinov2_main"
DINOV2_WEIGHTS = "dinov2_vitb14_pretrain.pth"
VGG16_WEIGHTS = "vgg16-397923af.pth"


# ---------------------------------------------------------------------------------------------
# Perceptual
# ---------------------------------------------------------------------------------------------


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()  # (3, 1, k, k) depthwise


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM per image (B,) of images in [0, 1] (Gaussian window σ=1.5, valid region only)."""
    w = _gaussian_window(window).to(x)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def _sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 8
    kernels = torch.stack([k, k.T]).unsqueeze(1).repeat(3, 1, 1, 1)  # (6, 1, 3, 3): dx, dy per channel
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=3)


class StructureLoss(nn.Module):
    """Weight-free perceptual substitute: Sobel-gradient L1 at 3 scales plus 1 - SSIM.

    LPIPS compares deep features; without pretrained weights the closest cheap proxy is to penalise
    edge and local-structure errors, which plain MSE under-weights (blurry reconstructions).
    """

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        grad = recon.new_zeros(())
        x, y = recon, target
        for level in range(3):
            if level:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            grad = grad + (_sobel(x) - _sobel(y)).abs().mean()
        structure = 1 - ssim(recon.clamp(-1, 1) * 0.5 + 0.5, target * 0.5 + 0.5).mean()
        return grad / 3 + structure


def _hub_checkpoint(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def build_perceptual(kind: str = "auto") -> nn.Module | None:
    """``lpips`` (needs its weights locally), ``structure`` (the fallback), ``auto`` or ``none``."""
    if kind == "none":
        return None
    if kind in ("auto", "lpips"):
        try:
            import lpips

            if _hub_checkpoint(VGG16_WEIGHTS).is_file():
                return lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
            missing = f"VGG16 weights not in {_hub_checkpoint(VGG16_WEIGHTS).parent}"
        except ImportError:
            missing = "the lpips package is not installed"
        if kind == "lpips":
            raise MissingWeights(f"LPIPS unavailable: {missing}")
        log.info("perceptual loss: %s, using the structure fallback", missing)
        return StructureLoss()
    if kind == "structure":
        return StructureLoss()
    raise InputError(f"unknown perceptual loss {kind!r}: use auto, lpips, structure or none")


# ---------------------------------------------------------------------------------------------
# Adversarial
# ---------------------------------------------------------------------------------------------


def diff_augment(x: torch.Tensor, cutout: float = 0.2) -> torch.Tensor:
    """DiffAugment (colour, translation 1/8, cutout): differentiable, fresh randomness per call."""
    b, _, h, w = x.shape
    dev = x.device
    x = x + (torch.rand(b, 1, 1, 1, device=dev) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev) + 0.5) + mean  # contrast
    # Translation by up to 1/8 of the side, zero padded.
    sh, sw = h // 8, w // 8
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=dev)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=dev)
    gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    gy = (gy.unsqueeze(0) + dy).clamp(-1, h) + 1
    gx = (gx.unsqueeze(0) + dx).clamp(-1, w) + 1
    padded = F.pad(x, (1, 1, 1, 1))
    x = padded.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], gy, gx].permute(0, 3, 1, 2)
    # Cutout: one zeroed square of side cutout·size per image.
    ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
    oy = torch.randint(0, h + 1 - ch % 2, (b, 1, 1), device=dev) - ch // 2
    ox = torch.randint(0, w + 1 - cw % 2, (b, 1, 1), device=dev) - cw // 2
    ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
    hole = ((ys - oy).abs() <= ch // 2) & ((xs - ox).abs() <= cw // 2)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


class PatchDiscriminator(nn.Module):
    """Spectral-norm patch CNN: (B, 3, H, W) -> per-patch logits (B, 1, H/8, W/8).

    Stands in for the official ``DinoDisc`` (heads on a frozen DINO ViT-S), whose backbone
    weights cannot ship; same role, hinge loss and LeCAM as the official recipe.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = []
        for cin, cout in ((3, c), (c, 2 * c), (2 * c, 4 * c)):
            layers += [spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(4 * c, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021): keeps D(real) and D(fake) near each other's EMA.

    The EMAs are buffers, so they travel with the discriminator's state dict (exact resume).
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        self.ema_real.lerp_(real.mean(), 1 - self.decay)
        self.ema_fake.lerp_(fake.mean(), 1 - self.decay)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(real - self.ema_fake).square().mean() + F.relu(self.ema_real - fake).square().mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """λ = ‖∇_last rec‖ / (‖∇_last G‖ + 1e-4), clamped to [0, 1e4] and detached (official VQGAN rule)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# ---------------------------------------------------------------------------------------------
# Semantic regularisation
# ---------------------------------------------------------------------------------------------


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def clip_infonce(student: torch.Tensor, teacher: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """Symmetric InfoNCE (official ``ClipLoss``): positives on the diagonal, no L2 normalisation.

    Features (B, Z) are gathered over ranks with their gradient, as in the official code.
    """
    student, teacher = _gather_with_grad(student), _gather_with_grad(teacher)
    logits = logit_scale * student @ teacher.T  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class DinoV2Teacher(nn.Module):
    """DINOv2 ViT-B/14 from a local torch hub cache: the official teacher. Embedding = final-norm CLS (768-d)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim = 768
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def embed(self, img: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(img * 0.5 + 0.5, size=(224, 224), mode="bicubic", align_corners=False)
        return self.model((x - self.mean) / self.std)  # (B, 768)


class ClassifierTeacher(nn.Module):
    """A classifier trained by this package as teacher: embedding = its pooled features."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.model = classifier.eval().requires_grad_(False)
        self.dim = classifier.cfg.feature_dim

    @torch.no_grad()
    def embed(self, img: torch.Tensor) -> torch.Tensor:
        return self.model.features(img)


def dinov2_available() -> bool:
    hub = Path(torch.hub.get_dir())
    return (hub / DINOV2_REPO / "hubconf.py").is_file() and _hub_checkpoint(DINOV2_WEIGHTS).is_file()


def load_teacher(spec: str, device: torch.device | str = "cpu") -> nn.Module:
    """The semantic teacher: ``dinov2``, ``auto``, or a classifier checkpoint path (``none`` is the caller's).

    ``auto`` is DINOv2 when its repository and weights are in the torch hub cache, else the shipped
    shapes classifier. Nothing is ever downloaded.
    """
    from imagefolder.train.classifier import default_classifier_path, load_classifier

    if spec == "dinov2" or (spec == "auto" and dinov2_available()):
        if not dinov2_available():
            raise MissingWeights(f"DINOv2 not in the torch hub cache {torch.hub.get_dir()} (nothing is downloaded)")
        model = torch.hub.load(str(Path(torch.hub.get_dir()) / DINOV2_REPO), "dinov2_vitb14", source="local")
        return DinoV2Teacher(model).to(device)
    path = default_classifier_path() if spec == "auto" else Path(spec)
    return ClassifierTeacher(load_classifier(path, device))
