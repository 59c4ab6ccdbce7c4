"""Golden behaviour of the shipped default model: the same tokens for the same request, on every backend.

``tests/data/golden-default-model.json`` holds the indices (B, 2, P) of classes 0..9 for fixed
requests, recorded once. Refactors must reproduce them exactly. Regenerate only when sampling is
meant to change (say so in the commit): ``python -m tests.test_golden``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagefolder.core.sampler import default_candidates
from imagefolder.core.schedule import SamplingParams
from imagefolder.default_model import load_default_or_checkpoint
from imagefolder.export.onnx_export import export_bundle
from imagefolder.runtime.backends.ort import OrtBackend
from imagefolder.runtime.backends.torch_backend import TorchBackend
from imagefolder.runtime.loop import generate
from tests.reference import DATA

GOLDEN = DATA / "golden-default-model.json"
LABELS = np.arange(10)
REQUESTS = {
    "greedy": SamplingParams(top_k=1, top_p=1.0, seed=0),
    "default-seed0": SamplingParams(seed=0),
    "cfg1.5-topk100-topp0.8-seed7": SamplingParams(cfg=1.5, top_k=100, top_p=0.8, seed=7),
}


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    config, tokenizer, generator, _ = load_default_or_checkpoint(None, False)
    bundle = export_bundle(
        tmp_path_factory.mktemp("golden"), tokenizer, generator, config, batch_max=len(LABELS), progress=False
    )
    torch_backend = TorchBackend(tokenizer, generator, default_candidates(config.generator.codebook_size))
    return {"torch": torch_backend, "ort": OrtBackend(bundle)}


@pytest.mark.parametrize("backend", ["torch", "ort"])
@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_default_model_reproduces_its_golden_tokens(backends, backend, request_name):
    expected = np.array(json.loads(GOLDEN.read_text())[request_name], dtype=np.int32)
    result = generate(backends[backend], LABELS, REQUESTS[request_name])
    np.testing.assert_array_equal(result.indices, expected)


def _record() -> None:
    config, tokenizer, generator, _ = load_default_or_checkpoint(None, False)
    backend = TorchBackend(tokenizer, generator, default_candidates(config.generator.codebook_size))
    golden = {name: generate(backend, LABELS, params).indices.tolist() for name, params in REQUESTS.items()}
    GOLDEN.write_text(json.dumps(golden, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    _record()
