"""Resampling as constant matrices.

The official quantizer resamples with ``F.interpolate`` (area down, bicubic up with
``align_corners=False``). Both are linear maps, so each is exactly a matrix built by resampling
the identity basis. Matrices make the models trace into MatMul only, which every TensorRT
version parses, instead of Resize modes that TensorRT does not support (cubic, area).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _basis_resample(src: int, dst: int, mode: str) -> torch.Tensor:
    eye = torch.eye(src * src, dtype=torch.float64, device="cpu").view(src * src, 1, src, src)
    if mode == "area":
        out = F.interpolate(eye, size=(dst, dst), mode="area")
    else:
        out = F.interpolate(eye, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.view(src * src, dst * dst).T.contiguous()  # (dst*dst, src*src)


def area_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst², src²) float64 matrix M with ``vec(area_down(x)) = M @ vec(x)`` (raster order)."""
    if dst == src:
        return torch.eye(src * src, dtype=torch.float64, device="cpu")
    return _basis_resample(src, dst, "area").clone()


def bicubic_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst², src²) float64 matrix M with ``vec(bicubic_up(x)) = M @ vec(x)`` (raster order)."""
    if dst == src:
        return torch.eye(src * src, dtype=torch.float64, device="cpu")
    return _basis_resample(src, dst, "bicubic").clone()


def apply_matrix(x: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """Resample (B, C, h, w) with a (size², h·w) matrix to (B, C, size, size)."""
    b, c = x.shape[:2]
    out = x.flatten(2) @ matrix.to(x.dtype).T  # (B, C, size²)
    return out.view(b, c, size, size)
