"""The PyTorch reference as a runtime backend.

It runs the same loop as the ONNX Runtime and TensorRT backends (``runtime.loop``), with the same
sampler (the module exported as the ``sampler`` graph) and the same noise, so a seed gives the same
tokens on every backend. This is the only runtime module that imports torch, and only the CLI's
``--backend torch`` (or a test) imports it.
"""

from __future__ import annotations

import numpy as np
import torch

from imagefolder.core.schedule import cfg_rows, positions
from imagefolder.errors import InputError
from imagefolder.models.generator import Generator, KVCache
from imagefolder.models.sampler import SamplerGraph
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.runtime.backends.base import BatchRequest


class TorchSession:
    """Per-generation state in torch tensors; see ``runtime.backends.base.Session``."""

    def __init__(self, backend: TorchBackend, batch: int):
        self.backend, self.batch = backend, batch
        gen, tok = backend.generator, backend.tokenizer
        self.cfg = gen.cfg
        device = backend.device
        self.cache = KVCache.allocate(self.cfg, 2 * batch, backend.dtype, device)
        k = tok.cfg.latent_size
        self.f_hat = torch.zeros(batch, self.cfg.folded_dim, k, k, device=device)
        self.x_start = torch.zeros(2 * batch, 1, self.cfg.folded_dim, device=device)  # scale 0's input: ignored
        self.x_next = self.x_start
        self.tokens: list[torch.Tensor] = []
        empty = torch.empty(0, device=device)  # replaced by prefill and step
        self.logits = self.cond_start = self.cond_blocks = self.cond_head = empty
        self.request: dict[str, torch.Tensor] = {}
        self._sent = self._received = 0

    @property
    def device_timer(self):
        return None

    @property
    def transferred(self) -> tuple[int, int]:
        """Bytes the session took in (the requests) and gave out (indices and images)."""
        return self._sent, self._received

    @torch.no_grad()
    def prefill(self, request: BatchRequest) -> None:
        device = self.backend.device
        self.cache.length = 0  # a new generation: the session is reused across calls
        self.f_hat.zero_()
        self.x_next = self.x_start
        self.tokens.clear()
        self.request = {
            "uniforms": torch.as_tensor(request.uniforms, device=device),
            "guidance": torch.as_tensor(request.guidance, device=device),
            "top_k": torch.as_tensor(request.top_k, device=device),
            "top_p": torch.as_tensor(request.top_p, device=device),
        }
        self._sent += request.nbytes
        rows = torch.as_tensor(cfg_rows(request.labels, self.cfg.null_class), device=device)
        self.cond_start, self.cond_blocks, self.cond_head = self.backend.generator.prefill(rows)

    @torch.no_grad()
    def step(self, scale_index: int) -> None:
        scale_positions = torch.as_tensor(positions(self.cfg.scales, scale_index), device=self.backend.device)
        self.logits, keys, values = self.backend.generator.step(
            self.x_next.to(self.backend.dtype),
            scale_positions,
            self.cond_start,
            self.cond_blocks,
            self.cond_head,
            self.cache.keys,
            self.cache.values,
        )
        self.cache.append(keys, values)

    @torch.no_grad()
    def sample(self, scale_index: int) -> None:
        start, q = self.cfg.scale_offsets[scale_index], self.cfg.scales[scale_index] ** 2
        r = self.request
        tokens = self.backend.sampler(
            self.logits.float(), r["guidance"][scale_index], r["top_k"], r["top_p"], r["uniforms"][:, start : start + q]
        )
        self.tokens.append(tokens)

    @torch.no_grad()
    def fold(self, scale_index: int) -> None:
        tok = self.backend.tokenizer
        self.f_hat = self.f_hat + tok.embed_scale(self.tokens[scale_index].long(), scale_index).float()
        self.x_next = tok.next_scale_input(self.f_hat, scale_index + 1).repeat(2, 1, 1)

    @torch.no_grad()
    def decode(self) -> np.ndarray:
        indices = torch.cat(self.tokens, dim=1).permute(0, 2, 1)  # (B, nb, P)
        images = self.backend.tokenizer.indices_to_img(indices.long()).float().cpu().numpy()
        self._received += images.nbytes + indices.numel() * 4
        return images

    def indices(self) -> np.ndarray:
        return torch.cat(self.tokens, dim=1).permute(0, 2, 1).int().cpu().numpy()  # (B, nb, P)

    def close(self) -> None:
        self.tokens.clear()


class TorchBackend:
    """Runs the PyTorch models through the runtime loop.

    Args:
        tokenizer, generator: fp32 models.
        candidates: the sampler's TopK size; pass the bundle's ``sampler_candidates`` to match it.
        device: torch device; dtype: compute dtype of the models (float32, float16, bfloat16).
    """

    name = "torch"

    def __init__(
        self,
        tokenizer: Tokenizer,
        generator: Generator,
        candidates: int,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_max: int = 64,
    ):
        self.device, self.dtype, self.batch_max = torch.device(device), dtype, batch_max
        self.tokenizer = tokenizer.eval().to(self.device, dtype)
        self.generator = generator.eval().to(self.device, dtype)
        self.sampler = SamplerGraph(candidates, generator.cfg.codebook_size, generator.cfg.num_branches).to(self.device)
        self.candidates = candidates
        self.num_classes = generator.cfg.num_classes
        self.scales = generator.cfg.scales
        self.image_size = tokenizer.cfg.image_size
        self.codebook_size = generator.cfg.codebook_size

    def session(self, batch: int) -> TorchSession:
        if not 1 <= batch <= self.batch_max:
            raise InputError(f"batch {batch} is outside [1, {self.batch_max}]")
        return TorchSession(self, batch)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(images, device=self.device).to(self.dtype)
        return self.tokenizer.img_to_indices(x).int().cpu().numpy()

    @torch.no_grad()
    def decode(self, indices: np.ndarray) -> np.ndarray:
        idx = torch.as_tensor(indices, device=self.device).long()
        return self.tokenizer.indices_to_img(idx).float().cpu().numpy()

    def close(self) -> None:
        """Nothing to release: the models belong to the caller, sessions free their tensors with them."""
