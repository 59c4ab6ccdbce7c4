"""The PyTorch reference as a runtime backend.

It runs the same stages as the ONNX Runtime and TensorRT backends (``backends/base.py``), with the
same sampler (the module exported as the ``sampler`` graph) and the same noise, so a seed gives the
same tokens on every backend. This is the only runtime module that imports torch, and only the CLI's
``--backend torch`` (or a test, or ``scripts/device_check.py``) imports it.

On CUDA a session can capture its whole generation as one ``torch.cuda.CUDAGraph`` (see
``base.GraphSession``): every tensor a generation reads or writes at a fixed place is allocated once
per session (the request staged in pinned host memory, the positions of every scale, the cache, the
starting f̂, the outputs staged for the host), and a generation never synchronises, so the captured
work replays with the next request's inputs. Tensors made during the capture live in the graph's
private memory pool, which the graph keeps.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from imagefolder.core.schedule import cfg_rows, positions
from imagefolder.errors import InputError
from imagefolder.models.generator import Generator, KVCache
from imagefolder.models.sampler import SamplerGraph
from imagefolder.models.tokenizer import Tokenizer
from imagefolder.runtime.backends.base import BatchRequest, Stage, no_stage, run_stages

log = logging.getLogger(__name__)


class CudaEventTimer:
    """``DeviceTimer`` with ``torch.cuda.Event``s on the current stream; nothing synchronises until ``collect``."""

    def __init__(self):
        self._open: dict[str, torch.cuda.Event] = {}
        self._done: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, label: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._open[label] = event

    def stop(self, label: str) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._done.append((label, self._open.pop(label), end))

    def collect(self) -> list[tuple[str, float]]:
        out = []
        for label, start, end in self._done:
            end.synchronize()
            out.append((label, float(start.elapsed_time(end))))
        self._done = []
        return out


class TorchSession:
    """Per-generation state in torch tensors; see ``runtime.backends.base.Session`` and ``GraphSession``."""

    def __init__(self, backend: TorchBackend, batch: int):
        self.backend, self.batch = backend, batch
        gen, tok = backend.generator, backend.tokenizer
        self.cfg = cfg = gen.cfg
        device = backend.device
        on_cuda = device.type == "cuda"
        self.num_scales = len(cfg.scales)
        self.use_graph = backend.use_cuda_graphs and on_cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False
        self.generations = 0
        self.timer = CudaEventTimer() if on_cuda else None
        self.cache = KVCache.allocate(cfg, 2 * batch, backend.dtype, device)
        k = tok.cfg.latent_size
        self.f_hat_start = torch.zeros(batch, cfg.folded_dim, k, k, device=device)  # never written
        self.x_start = torch.zeros(2 * batch, 1, cfg.folded_dim, device=device)  # scale 0's input: ignored
        self.f_hat, self.x_next = self.f_hat_start, self.x_start
        self.tokens: list[torch.Tensor] = []
        self.positions = [torch.as_tensor(positions(cfg.scales, si), device=device) for si in range(self.num_scales)]
        # The request: host staging (pinned on CUDA, so prefill's copies are asynchronous and capturable) → device.
        request = {
            "labels": ((2 * batch,), torch.int64),
            "uniforms": ((batch, cfg.positions, cfg.num_branches), torch.float32),
            "guidance": ((self.num_scales, batch), torch.float32),
            "top_k": ((batch,), torch.int64),
            "top_p": ((batch,), torch.float32),
            "reference": ((batch, cfg.positions, cfg.num_branches), torch.int32),
            "force": ((batch, cfg.positions, cfg.num_branches), torch.bool),
        }
        self.host_request = {n: torch.empty(s, dtype=d, pin_memory=on_cuda) for n, (s, d) in request.items()}
        self.request = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in request.items()}
        size = tok.cfg.image_size
        self.host_images = torch.empty(batch, 3, size, size, pin_memory=on_cuda)
        self.host_indices = torch.empty(batch, cfg.num_branches, cfg.positions, dtype=torch.int32, pin_memory=on_cuda)
        empty = torch.empty(0, device=device)  # replaced by prefill and step
        self.logits = self.cond_start = self.cond_blocks = self.cond_head = empty
        self._sent = self._received = 0

    @property
    def device_timer(self) -> CudaEventTimer | None:
        return self.timer

    @property
    def transferred(self) -> tuple[int, int]:
        """Bytes the session took in (the requests) and gave out (indices and images)."""
        return self._sent, self._received

    @property
    def launches(self) -> None:
        return None  # torch launches kernels itself; nothing counts them here

    @torch.no_grad()
    def generate(self, request: BatchRequest, stage: Stage = no_stage) -> tuple[np.ndarray, np.ndarray]:
        if request.labels.shape != (self.batch,):
            raise InputError(f"a request of {request.labels.shape[0]} images for a session of {self.batch}")
        values = {
            "labels": cfg_rows(request.labels, self.cfg.null_class),
            "uniforms": request.uniforms,
            "guidance": request.guidance,
            "top_k": request.top_k,
            "top_p": request.top_p,
            "reference": request.reference.transpose(0, 2, 1),
            "force": request.force,
        }
        for name, value in values.items():  # the previous generation ended synchronised: nothing reads these now
            self.host_request[name].numpy()[...] = value
        self._sent += request.nbytes
        if self.graph is None and self.use_graph and self.generations and not self.capture_failed:
            self._capture()
        if self.graph is not None:
            with stage("generation"):
                self.graph.replay()
        else:
            run_stages(self, self.num_scales, stage)
        if self.backend.device.type == "cuda":
            torch.cuda.current_stream(self.backend.device).synchronize()
        self.generations += 1
        self._received += self.host_images.numel() * 4 + self.host_indices.numel() * 4
        return self.host_images.numpy().copy(), self.host_indices.numpy().copy()

    def _capture(self) -> None:
        """Capture ``run_stages`` as one CUDA graph; on failure warn once and stay eager."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run_stages(self, self.num_scales)
        except RuntimeError as err:
            self.capture_failed = True
            log.warning(
                "batch %d: capturing the generation as a CUDA graph failed (%s); it runs eagerly", self.batch, err
            )
            return
        self.graph = graph

    # -- the stages ----------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self) -> None:
        for name, tensor in self.request.items():
            tensor.copy_(self.host_request[name], non_blocking=True)
        self.cache.length = 0  # a new generation: the session is reused across calls
        self.f_hat, self.x_next = self.f_hat_start, self.x_start
        self.tokens.clear()
        self.cond_start, self.cond_blocks, self.cond_head = self.backend.generator.prefill(self.request["labels"])

    @torch.no_grad()
    def step(self, scale_index: int) -> None:
        self.logits, keys, values = self.backend.generator.step(
            self.x_next.to(self.backend.dtype),
            self.positions[scale_index],
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
        scale = slice(start, start + q)
        tokens = self.backend.sampler(
            self.logits.float(),
            r["guidance"][scale_index],
            r["top_k"],
            r["top_p"],
            r["uniforms"][:, scale],
            r["reference"][:, scale],
            r["force"][:, scale],
        )
        self.tokens.append(tokens)

    @torch.no_grad()
    def fold(self, scale_index: int) -> None:
        tok = self.backend.tokenizer
        self.f_hat = self.f_hat + tok.embed_scale(self.tokens[scale_index].long(), scale_index).float()
        self.x_next = tok.next_scale_input(self.f_hat, scale_index + 1).repeat(2, 1, 1)

    @torch.no_grad()
    def decode(self) -> None:
        indices = torch.cat(self.tokens, dim=1).permute(0, 2, 1)  # (B, nb, P)
        images = self.backend.tokenizer.indices_to_img(indices.long())
        self.host_images.copy_(images, non_blocking=True)
        self.host_indices.copy_(indices, non_blocking=True)

    def close(self) -> None:
        self.tokens.clear()
        self.graph = None


class TorchBackend:
    """Runs the PyTorch models through the runtime loop.

    Args:
        tokenizer, generator: fp32 models.
        candidates: the sampler's TopK size; pass the bundle's ``sampler_candidates`` to match it.
        device: torch device; dtype: compute dtype of the models (float32, float16, bfloat16).
        batch_max: the largest session.
        use_cuda_graphs: on CUDA, sessions capture their whole generation and replay it (``GraphSession``).
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
        use_cuda_graphs: bool = True,
    ):
        self.device, self.dtype, self.batch_max = torch.device(device), dtype, batch_max
        self.use_cuda_graphs = use_cuda_graphs
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
