"""``imagefolder-export check BUNDLE``: every graph on ONNX Runtime against PyTorch, plus operators.

Each graph is checked at every scale it serves (``GraphSpec.served_scales``), on fresh inputs made
as the export's own parity check makes them, so a check is stronger than the single-point parity
record in the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

from imagefolder.core.compare import CheckReport
from imagefolder.core.pruning import describe
from imagefolder.core.specs import ORT_CPU_DTYPES
from imagefolder.errors import BundleError
from imagefolder.export.onnx_export import ExampleInputs, check_parity, graph_modules
from imagefolder.export.opcheck import operator_reports


def check_bundle(
    bundle_dir: str | Path, checkpoint: str | Path | None = None, trust_checkpoint: bool = False, batch: int = 2
) -> CheckReport:
    """Compare each graph of a bundle with the PyTorch model it was exported from.

    Args:
        bundle_dir: the bundle (hashes are verified first).
        checkpoint: the PyTorch weights; default: the checkpoint recorded in the manifest.
        batch: images per check (rows = 2·batch for the generator graphs).
    """
    import onnxruntime as ort

    from imagefolder.core.bundle import load_bundle
    from imagefolder.default_model import load_default_or_checkpoint

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if checkpoint is None:
        recorded = manifest.get("source", {}).get("checkpoint")
        checkpoint = None if recorded in (None, "default") else Path(recorded)
    config, tokenizer, generator, _ = load_default_or_checkpoint(checkpoint, trust_checkpoint)
    if json.loads(json.dumps(config.to_dict()))["generator"] != manifest["model"]["generator"]:
        raise BundleError("the checkpoint's model differs from the bundle's; pass the checkpoint it came from")
    modules = graph_modules(tokenizer, generator, bundle.dtype, bundle.candidates, bundle.prune)
    examples = ExampleInputs(tokenizer, generator, manifest["model"], bundle.candidates, seed=1)
    report = CheckReport(operators=operator_reports(bundle), notes=[describe(manifest)] if bundle.prune else [])
    for name, spec in bundle.specs.items():
        if bundle.dtype not in ORT_CPU_DTYPES and not spec.float32_compute:
            continue  # ONNX Runtime's CPU provider has no bf16 kernels
        session = ort.InferenceSession(str(bundle.graph_path(name)), providers=["CPUExecutionProvider"])
        _, reference = modules[name]
        weights, compute = bundle.graph_weights(name), bundle.graph_compute(name)
        for si in spec.served_scales(bundle.num_scales):
            inputs = examples.for_graph(spec, batch, si)
            report.add(name, si, check_parity(session, reference, inputs, spec, bundle.dtype, weights, compute))
    return report
