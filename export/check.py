"""``imagefolder-export check BUNDLE``: every graph on ONNX Runtime against PyTorch, plus operators.

Graphs with a scale input (ar_step, sampler, fold) are checked at every scale they serve, on fresh
inputs from the same generator the export used, so a check is stronger than the export's own
single-point parity record.
"""

from __future__ import annotations

import json
from pathlib import Path

from imagefolder.export.check_report import CheckReport
from imagefolder.export.onnx_export import ExampleInputs, check_parity, graph_plan
from imagefolder.export.opcheck import check_operators
from imagefolder.export.specs import ORT_CPU_DTYPES, graph_specs


def check_bundle(bundle_dir: str | Path, checkpoint: str | Path | None = None, trust_checkpoint: bool = False,
                 batch: int = 2) -> CheckReport:
    """Compare each graph of a bundle with the PyTorch model it was exported from.

    Args:
        bundle_dir: the bundle (hashes are verified first).
        checkpoint: the PyTorch weights; default: the checkpoint recorded in the manifest.
        batch: images per check (rows = 2·batch for the generator graphs).
    """
    import onnxruntime as ort

    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.runtime.bundle import BundleError, load_bundle

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if checkpoint is None:
        recorded = manifest.get("source", {}).get("checkpoint")
        checkpoint = None if recorded in (None, "default") else Path(recorded)
    config, tokenizer, generator, _ = load_default_or_checkpoint(checkpoint, trust_checkpoint)
    if json.loads(json.dumps(config.to_dict()))["generator"] != manifest["model"]["generator"]:
        raise BundleError("the checkpoint's model differs from the bundle's; pass the checkpoint it came from")
    dtype, state_dtype, candidates = manifest["dtype"], manifest["state_dtype"], manifest["sampler_candidates"]
    specs = graph_specs(manifest["model"], candidates)
    plan = graph_plan(tokenizer, generator, dtype, candidates)
    examples = ExampleInputs(tokenizer, generator, candidates, seed=1)
    report = CheckReport()
    num_scales = len(config.generator.scales)
    scale_ranges = {"ar_step": range(1, num_scales), "sampler": range(num_scales), "fold": range(num_scales)}
    for name in specs:
        path = bundle.path / manifest["graphs"][name]["file"]
        report.operators[name] = check_operators(path)
        if dtype not in ORT_CPU_DTYPES and name not in ("sampler", "fold"):
            continue  # no bf16 kernels on ONNX Runtime's CPU provider
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _, reference, _, _ = plan[name]
        for si in scale_ranges.get(name, [0]):
            parity = check_parity(session, reference, examples.for_graph(name, batch, si), specs[name],
                                  dtype, state_dtype)
            for output, entry in parity.items():
                metric = "max_rel" if "max_rel" in entry else "mismatch"
                report.rows.append({"graph": name, "scale": si, "output": output, "metric": metric,
                                    "value": entry[metric], "tolerance": entry["tolerance"], "ok": entry["ok"]})
    return report
