"""The bench's FLOP and byte formulas (``bench/cost.py``) against a direct count on the tiny model.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the very modules the bundle exports (it
counts matmuls and convolutions, as the formulas do). Weights: every floating parameter and buffer
the module reads, seen op by op by a dispatch mode (a whole tensor when an op reads it, the rows an
``embedding`` or ``index_select`` gathers otherwise). Inputs: the graphs' example inputs from
``core.specs``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from bench import cost
from imagefolder.configs import tiny
from imagefolder.core.schedule import cfg_rows
from imagefolder.core.specs import example_inputs, graph_specs
from imagefolder.export.graphs import DecoderGraph, FoldGraph, PrefillGraph, StepGraph
from imagefolder.models.sampler import SamplerGraph
from tests.models import randomized

GATHERS = {torch.ops.aten.embedding.default: 0, torch.ops.aten.index_select.default: 0}


class TouchedWeights(TorchDispatchMode):
    """Counts the elements of ``module``'s floating parameters and buffers that the ops under it read."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        named = itertools.chain(module.named_parameters(), module.named_buffers())
        self.tensors = {t.untyped_storage().data_ptr(): t for _, t in named if t.is_floating_point()}
        self.whole: set[int] = set()
        self.rows: dict[int, set[int]] = defaultdict(set)
        self.row_size: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            table = args[0] if func in GATHERS else None
            indices = args[1] if func is torch.ops.aten.embedding.default else args[2] if table is not None else None
            for arg in tree_flatten((args, kwargs))[0]:
                if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() in self.tensors:
                    key = arg.untyped_storage().data_ptr()
                    if arg is table:
                        self.rows[key] |= set(indices.flatten().tolist())
                        self.row_size[key] = arg[0].numel()
                    else:
                        self.whole.add(key)
        return func(*args, **kwargs)

    def elements(self) -> int:
        gathered = sum(len(rows) * self.row_size[key] for key, rows in self.rows.items() if key not in self.whole)
        return gathered + sum(self.tensors[key].numel() for key in self.whole)


CONFIG = tiny()
MODEL = CONFIG.to_dict()
SPECS = graph_specs(MODEL)
CANDIDATES = 200  # < V = 256: both blocked cumsums differ


@pytest.fixture(scope="module")
def models():
    return randomized(CONFIG, seed=3)


def _inputs(graph: str, batch: int, si: int | None) -> dict[str, np.ndarray]:
    """The graph's example inputs, with distinct labels and codes so gathers read distinct rows."""
    feeds = example_inputs(SPECS[graph], MODEL, batch, si, np.random.default_rng(0), candidates=CANDIDATES)
    vocab = CONFIG.generator.codebook_size
    if "labels" in feeds:
        feeds["labels"] = cfg_rows(np.arange(batch), CONFIG.generator.null_class)
    if "tokens" in feeds and graph == "fold":
        tokens = feeds["tokens"]
        distinct = np.arange(tokens.shape[0] * tokens.shape[1]).reshape(tokens.shape[:2]) % vocab
        feeds["tokens"] = np.repeat(distinct[..., None], tokens.shape[2], axis=2).astype(np.int32)
    if "indices" in feeds:
        shape = feeds["indices"].shape
        per_image = np.arange(shape[0] * shape[2]).reshape(shape[0], 1, shape[2]) % vocab
        feeds["indices"] = np.repeat(per_image, shape[1], axis=1).astype(np.int32)
    return feeds


def _count(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(FLOPs, weight elements touched, input bytes) of one call."""
    args = [torch.from_numpy(v) for v in feeds.values()]
    with torch.no_grad(), FlopCounterMode(display=False) as flops, TouchedWeights(module) as touched:
        module(*args)
    return flops.get_total_flops(), touched.elements(), sum(v.nbytes for v in feeds.values())


def _check(expected: cost.StageCost, counted: tuple[int, int, int]) -> None:
    flops, weights, inputs = counted
    assert (expected.flops, expected.weight_bytes, expected.input_bytes) == (flops, 4 * weights, inputs)


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill(models, batch):
    _, gen = models
    _check(cost.prefill_cost(CONFIG, batch), _count(PrefillGraph(gen, torch.float32), _inputs("ar_prefill", batch, 0)))


@pytest.mark.parametrize(("batch", "si"), [(1, 0), (1, 2), (3, 4)])
def test_step(models, batch, si):
    _, gen = models
    q = CONFIG.generator.scales[si] ** 2
    module = StepGraph(gen, torch.float32, torch.float32)
    _check(cost.step_cost(CONFIG, batch, q), _count(module, _inputs("ar_step", batch, si)))


@pytest.mark.parametrize(("batch", "si"), [(1, 1), (3, 4)])
def test_sample(batch, si):
    q = CONFIG.generator.scales[si] ** 2
    module = SamplerGraph(CANDIDATES, CONFIG.generator.codebook_size, CONFIG.generator.num_branches)
    _check(cost.sample_cost(CONFIG, batch, q, CANDIDATES), _count(module, _inputs("sampler", batch, si)))


@pytest.mark.parametrize(("batch", "si"), [(1, 0), (3, 3)])
def test_fold(models, batch, si):
    tok, _ = models
    _check(cost.fold_cost(CONFIG, batch, si), _count(FoldGraph(tok), _inputs("fold", batch, si)))


@pytest.mark.parametrize("batch", [1, 3])
def test_decode(models, batch):
    tok, _ = models
    _check(cost.decode_cost(CONFIG, batch), _count(DecoderGraph(tok, torch.float32), _inputs("decoder", batch, None)))


def test_generation_costs_follow_the_loop_and_the_dtype():
    costs = cost.generation_costs(CONFIG, 2, CANDIDATES)
    scales = len(CONFIG.generator.scales)
    assert list(costs)[:4] == ["prefill", "step[0]", "sample[0]", "fold[0]"] and list(costs)[-1] == "decode"
    assert len(costs) == 2 + 3 * scales - 1
    half = cost.generation_costs(CONFIG, 2, CANDIDATES, "fp16")
    assert half["step[1]"].flops == costs["step[1]"].flops
    assert half["step[1]"].weight_bytes == costs["step[1]"].weight_bytes // 2
    assert half["sample[1]"].bytes_read == costs["sample[1]"].bytes_read  # the sampler computes in fp32
    shapes = cost.distinct_gemms(costs.values())
    assert len(shapes) == len(set(shapes)) and all(min(s) >= 1 for s in shapes)
