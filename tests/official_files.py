"""Files in the exact official ImageFolder layouts, written from our models, for the tests.

The product reads official files and never writes them; the tests need real ones (AR
``ar-ckpt-last.pth`` and tokenizer ``best_ckpt.pt``, ``imagefolder-official.md`` §5) with known
weights, down to the optimizer state and the ``args`` the official code pickles beside them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefolder.configs import ModelConfig
from imagefolder.models.generator import Generator
from imagefolder.models.tokenizer import Tokenizer


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _adam_state(module: nn.Module, steps: int, lr: float) -> dict[str, Any]:
    """A ``torch.optim.AdamW.state_dict()``-shaped dict (zero moments) for the module's parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    state = {
        i: {"step": torch.tensor(float(steps)), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for i, p in enumerate(params)
    }
    group = {
        "lr": lr,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.05,
        "amsgrad": False,
        "foreach": None,
        "maximize": False,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "params": list(range(len(params))),
    }
    return {"state": state, "param_groups": [group]}


def official_ar_payload(
    config: ModelConfig, generator: Generator, tokenizer: Tokenizer, epoch: int = 350, iteration: int = 0
) -> dict[str, Any]:
    """The dict an official ``ar-ckpt-last.pth`` holds, for these models (zero Adam moments)."""
    gen, tok = config.generator, config.tokenizer
    scales = tuple(gen.scales)
    args = {
        "depth": gen.depth,
        "pn": "_".join(map(str, scales)),
        "patch_nums": scales,
        "num_classes": gen.num_classes,
        "vae_ckpt": "best_ckpt.pt",
        "codebook_size": tok.codebook_size,
        "codebook_embed_dim": tok.code_dim,
        "product_quant": tok.num_branches,
        "v_patch_nums": list(scales),
        "ep": epoch + 1,
        "tblr": 1e-4,
        "twd": 0.05,
        "ls": 0.0,
        "fp16": 2,
        "cfg": 1.5,
        "seed": 0,
    }
    return {
        "epoch": epoch,
        "iter": iteration,
        "args": args,
        "trainer": {
            "config": {
                "patch_nums": scales,
                "resos": tuple(16 * pn for pn in scales),
                "label_smooth": 0.0,
                "prog_it": 0,
                "last_prog_si": -1,
                "first_prog": True,
            },
            "var_wo_ddp": _cpu_state(generator),
            "vae_local": _cpu_state(tokenizer),
            "var_opt": {"optimizer": _adam_state(generator, steps=1000, lr=1e-4)},
        },
    }


def write_official_ar_checkpoint(
    path: str | os.PathLike, config: ModelConfig, generator: Generator, tokenizer: Tokenizer
) -> Path:
    """Write a file in the exact official ``ar-ckpt-last.pth`` layout."""
    path = Path(path)
    torch.save(official_ar_payload(config, generator, tokenizer), path)
    return path


def official_tokenizer_payload(
    tokenizer: Tokenizer, ema: Tokenizer | None = None, args: argparse.Namespace | None = None
) -> dict[str, Any]:
    """The dict an official tokenizer ``best_ckpt.pt`` holds (``ema`` only when given)."""
    cfg = tokenizer.cfg
    if args is None:
        args = argparse.Namespace(
            image_size=cfg.image_size,
            codebook_size=cfg.codebook_size,
            codebook_embed_dim=cfg.code_dim,
            product_quant=cfg.num_branches,
            v_patch_nums=list(cfg.scales),
            enc_type="dinov2",
            ema=ema is not None,
        )
    return {
        "model": _cpu_state(tokenizer),
        "ema": None if ema is None else _cpu_state(ema),
        "optimizer": _adam_state(tokenizer, steps=1000, lr=3e-5),
        "discriminator": {},
        "optimizer_disc": {},
        "steps": 1000,
        "args": args,
    }


def write_official_tokenizer_checkpoint(
    path: str | os.PathLike, tokenizer: Tokenizer, ema: Tokenizer | None = None, args: argparse.Namespace | None = None
) -> Path:
    """Write a file in the official tokenizer ``best_ckpt.pt`` layout."""
    path = Path(path)
    torch.save(official_tokenizer_payload(tokenizer, ema, args), path)
    return path
