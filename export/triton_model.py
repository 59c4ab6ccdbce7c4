"""Triton Python-backend model: the imagefolder generation loop over the bundle's TensorRT models (BLS).

``export/triton.py`` copies this file to ``<prefix>_generate/1/model.py`` together with
``imagefolder.json`` (scales, classes, sampler candidates, model names). It runs inside Triton's
Python backend, so it imports only numpy and ``triton_python_backend_utils``, never imagefolder.

The loop and the random stream are those of ``runtime/loop.py``: prefill → for each scale: step →
sample → fold; then decode. Image i draws its uniforms from ``np.random.default_rng((seed, i))``, one
per token, so a seed gives the tokens the other backends give. State
(the KV cache, f̂, indices) lives on the host between model calls; every engine call is one BLS request.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

CONFIG_FILE = "imagefolder.json"


def _scalar(request, name: str, default, kind):
    """An optional one-element input, or its default when the request leaves it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else kind(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.cfg = json.loads((version_dir / CONFIG_FILE).read_text())
        self.models = self.cfg["models"]  # graph → Triton model name
        self.scales = list(self.cfg["scales"])
        self.spans, start = [], 0
        for pn in self.scales:
            self.spans.append((start, pn * pn))
            start += pn * pn
        self.positions = start
        self.state_dtype = np.dtype(self.cfg["state_dtype"])

    # -- BLS -----------------------------------------------------------------------------------------------------------

    def _infer(self, graph: str, inputs: dict, outputs: list[str]) -> dict:
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):
            # Outputs come back in host memory: the loop keeps its state in numpy.
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(
            model_name=self.models[graph],
            requested_output_names=outputs,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            **kwargs,
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.models[graph]}: {response.error().message()}")
        out = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise pb_utils.TritonModelException(f"{self.models[graph]} returned no {name}")
            out[name] = tensor.as_numpy()
        return out

    # -- the loop ------------------------------------------------------------------------------------------------------

    def _guidance(self, cfg: float, si: int) -> float:
        sn = len(self.scales)
        return float(cfg) if sn < 2 else float(cfg) * si / (sn - 1)

    def _positions(self, si: int) -> np.ndarray:
        start, q = self.spans[si]
        return np.arange(start, start + q, dtype=np.int64)

    def generate(self, labels: np.ndarray, seed: int, cfg: float, top_k: int, top_p: float):
        num_classes = int(self.cfg["num_classes"])
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size == 0 or labels.size > int(self.cfg["batch_max"]):
            raise pb_utils.TritonModelException(f"1..{self.cfg['batch_max']} labels per request, got {labels.size}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise pb_utils.TritonModelException(f"class ids must be in [0, {num_classes})")
        batch, sn, nb = labels.size, len(self.scales), int(self.cfg["num_branches"])
        rows = np.concatenate([labels, np.full_like(labels, num_classes)])  # conditional rows, then the null class
        # Image i's uniforms: default_rng((seed, i)), one per token, as in runtime/loop.py.
        uniforms = np.stack(
            [np.random.default_rng((seed, i)).random((self.positions, nb), dtype=np.float32) for i in range(batch)]
        )

        cond = self._infer("ar_prefill", {"labels": rows}, ["cond_start", "cond_blocks", "cond_head"])
        layers, heads, head_dim = int(self.cfg["depth"]), int(self.cfg["heads"]), int(self.cfg["head_dim"])
        cache_shape = (layers, 2 * batch, heads, self.positions, head_dim)
        past_keys = np.zeros(cache_shape, self.state_dtype)
        past_values = np.zeros(cache_shape, self.state_dtype)
        k = self.scales[-1]
        f_hat = np.zeros((batch, int(self.cfg["folded_dim"]), k, k), self.state_dtype)
        x_folded = np.zeros((2 * batch, 1, int(self.cfg["folded_dim"])), self.state_dtype)  # scale 0: unused
        indices = np.zeros((batch, nb, self.positions), np.int32)

        for si in range(sn):
            start, q = self.spans[si]
            feeds = {"x_folded": x_folded, "positions": self._positions(si), **cond}
            out = self._infer(
                "ar_step", {**feeds, "past_keys": past_keys, "past_values": past_values}, ["logits", "keys", "values"]
            )
            past_keys[:, :, :, start : start + q] = out["keys"]
            past_values[:, :, :, start : start + q] = out["values"]
            tokens = self._infer(
                "sampler",
                {
                    "logits": out["logits"],
                    "guidance": np.full(batch, self._guidance(cfg, si), np.float32),
                    "top_k": np.full(batch, top_k, np.int64),
                    "top_p": np.full(batch, top_p, np.float32),
                    "uniforms": np.ascontiguousarray(uniforms[:, start : start + q]),
                },
                ["tokens"],
            )["tokens"]  # (B, q, nb)
            indices[:, :, start : start + q] = tokens.transpose(0, 2, 1)
            if si < sn - 1:
                out = self._infer(
                    "fold",
                    {
                        "tokens": tokens,
                        "f_hat": f_hat,
                        "scale_index": np.array([si], np.int64),
                        "next_positions": self._positions(si + 1),
                    },
                    ["f_hat_out", "x_next"],
                )
                f_hat, x_folded = out["f_hat_out"], out["x_next"]

        image = self._infer("decoder", {"indices": indices}, ["image"])["image"]
        return image, indices

    # -- Triton entry points -------------------------------------------------------------------------------------------

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                labels = pb_utils.get_input_tensor_by_name(request, "class_labels").as_numpy()
                defaults = self.cfg["defaults"]
                image, indices = self.generate(
                    labels,
                    seed=_scalar(request, "seed", defaults["seed"], int),
                    cfg=_scalar(request, "cfg", defaults["cfg"], float),
                    top_k=_scalar(request, "top_k", defaults["top_k"], int),
                    top_p=_scalar(request, "top_p", defaults["top_p"], float),
                )
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("image", image.astype(np.float32)),
                            pb_utils.Tensor("indices", indices.astype(np.int32)),
                        ]
                    )
                )
            except pb_utils.TritonModelException as err:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))))
        return responses
