"""The ``imagefolder-export`` command: onnx (needs torch), trt and triton (need no torch), check."""

from __future__ import annotations

from pathlib import Path

import click

from imagefolder.cli.common import CommandGroup, parse_ints, setup_logging

BUNDLE_ARG = click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True)
@click.version_option(package_name="imagefolder")
def main(verbose: int) -> None:
    """Export ImageFolder to an ONNX bundle and build TensorRT engines from it."""
    setup_logging(verbose)


@main.command()
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ours (.safetensors) or official (ar-ckpt-last.pth). Default: the model shipped with the package.",
)
@click.option("--trust-checkpoint", is_flag=True, help="Allow arbitrary pickled objects (trusted files only).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Precision baked into the graphs (TensorRT 11 builds strongly typed networks only).",
)
@click.option(
    "--opset",
    type=click.IntRange(14, 21),
    help="Default 17, which every TensorRT 10.x parses (JetPack 6: 10.3); 19 for int8 weights in fp16/bf16, "
    "21 for int4 weights.",
)
@click.option("--batch-max", default=8, show_default=True, type=click.IntRange(1))
@click.option("--candidates", type=int, help="Sampler TopK size (default: the codebook, or 1024 if ≥ 3840).")
@click.option(
    "--weights",
    type=click.Choice(["fp", "int8", "int4"]),
    default="fp",
    show_default=True,
    help="Generator weights: fp (the dtype), int8 per output channel, int4 in blocks of 64 (weight-only).",
)
def onnx(checkpoint, trust_checkpoint, out_dir, dtype, opset, batch_max, candidates, weights) -> None:
    """Export encoder, decoder, ar_prefill, ar_step, sampler and fold graphs plus manifest.json."""
    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.quantize import check_weights, default_opset

    opset = default_opset(weights, dtype) if opset is None else opset
    check_weights(weights, dtype, opset)  # before the model loads
    config, tokenizer, generator, source = load_default_or_checkpoint(checkpoint, trust_checkpoint)
    out = export_bundle(
        out_dir,
        tokenizer,
        generator,
        config,
        dtype=dtype,
        opset=opset,
        batch_max=batch_max,
        candidates=candidates,
        source=source,
        weights=weights,
    )
    click.echo(f"wrote bundle {out} ({config.name}, {dtype}, {weights} weights, opset {opset})")


@main.command()
@BUNDLE_ARG
@click.option(
    "--backend",
    type=click.Choice(["ort", "trt"]),
    default="ort",
    show_default=True,
    help="ort: ONNX Runtime against PyTorch; trt: TensorRT engines against ONNX Runtime.",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PyTorch weights to compare with (default: the bundle's recorded source).",
)
@click.option("--trust-checkpoint", is_flag=True)
@click.option(
    "--debug",
    "debug_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="trt: mark every ONNX tensor as an output and save, for each failing graph, what bisects it "
    "(inputs, ONNX Runtime's outputs, the polygraphy command) into this folder.",
)
def check(bundle, backend, checkpoint, trust_checkpoint, debug_dir) -> None:
    """Run every graph against its reference and print max abs / relative error per output."""
    if backend == "trt":
        from imagefolder.core.bundle import load_bundle
        from imagefolder.export.trt_capability import operator_reports
        from imagefolder.runtime.engine_check import check_engines

        report = check_engines(bundle, debug_dir=debug_dir)
        report.operators = operator_reports(load_bundle(bundle, verify=False))
    elif debug_dir is not None:
        raise click.UsageError("--debug needs --backend trt (it bisects TensorRT against ONNX Runtime)")
    else:
        from imagefolder.export.check import check_bundle

        report = check_bundle(bundle, checkpoint, trust_checkpoint)
    click.echo(report.table())
    if not report.ok:
        raise click.ClickException("some outputs exceed their tolerance (see the table)")


@main.command()
@BUNDLE_ARG
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes to build profiles for.")
@click.option("--workspace", "workspace_mib", type=int, help="Workspace limit in MiB (default: TensorRT's).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Reuse and update this timing cache (default: BUNDLE/engines/timing.cache).",
)
@click.option("--dla-core", type=int, help="Jetson: run on this DLA core, falling back to the GPU.")
@click.option("--hardware-compat", is_flag=True, help="Ampere+ hardware compatibility (slower engines).")
@click.option("--version-compat", is_flag=True, help="Engines loadable by later TensorRT versions.")
@click.option("--verbose", "trt_verbose", is_flag=True, help="TensorRT's verbose log.")
def trt(
    bundle, batches, workspace_mib, opt_level, timing_cache, dla_core, hardware_compat, version_compat, trt_verbose
) -> None:
    """Build TensorRT engines for every graph into BUNDLE/engines (run this on the target GPU)."""
    from imagefolder.export.trt_build import build_engines

    out = build_engines(
        bundle,
        batches=parse_ints(batches, "batch size"),
        workspace_mib=workspace_mib,
        opt_level=opt_level,
        timing_cache=timing_cache,
        dla_core=dla_core,
        hardware_compat=hardware_compat,
        version_compat=version_compat,
        verbose=trt_verbose,
        progress=True,
    )
    click.echo(f"wrote engines to {out}")


@main.command()
@BUNDLE_ARG
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--backend",
    type=click.Choice(["ort", "trt"]),
    default="trt",
    show_default=True,
    help="ort: ONNX Runtime on KIND_CPU instances; trt: the bundle's TensorRT engines on KIND_GPU instances.",
)
@click.option(
    "--batch",
    "batches",
    help="Batch sizes to serve, one session each, comma-separated "
    "(default: trt, every built one; ort, every size up to the bundle's batch_max, at most 8).",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(1),
    help="The most images Triton hands the model at once (default: 8 × the largest served batch).",
)
@click.option(
    "--instances",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Model instances (ort: they share the CPUs; trt: per GPU).",
)
def triton(bundle, out_dir, backend, batches, max_batch_size, instances) -> None:
    """Write a Triton Inference Server model repository: generation on ONNX Runtime (CPU) or device-resident
    TensorRT sessions (GPU) as a Python-backend model with dynamic batching (docs/triton.md)."""
    from imagefolder.export.triton import export_triton_repository

    sizes = parse_ints(batches, "batch size") if batches else None
    out = export_triton_repository(
        bundle, out_dir, sizes, max_batch_size=max_batch_size, backend=backend, instances=instances
    )
    click.echo(f"wrote Triton repository {out}")
