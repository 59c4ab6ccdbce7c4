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
@click.option(
    "--compute",
    type=click.Choice(["float", "int8", "int8-tensor"]),
    default="float",
    show_default=True,
    help="How the generator multiplies: float, or int8 weights times activations quantized at run time, per row "
    "(int8) or per tensor (int8-tensor). Integer bundles are for ONNX Runtime's CPU provider only (not TensorRT).",
)
@click.option(
    "--prune",
    "prune_spec",
    metavar="SCALE:RATIO,...",
    help="Training-free token pruning: e.g. 8:0.5,9:0.6 runs the trunk on 50 %% of scale 8's positions and 60 %% "
    "of scale 9's, restoring the rest from the previous scale (the manifest records it; docs/architecture.md).",
)
def onnx(
    checkpoint, trust_checkpoint, out_dir, dtype, opset, batch_max, candidates, weights, compute, prune_spec
) -> None:
    """Export encoder, decoder, ar_prefill, ar_step, sampler and fold graphs plus manifest.json."""
    from imagefolder.core.pruning import parse_prune
    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.export.integer import check_compute
    from imagefolder.export.onnx_export import export_bundle
    from imagefolder.export.quantize import check_weights, default_opset

    opset = default_opset(weights, dtype) if opset is None else opset
    check_weights(weights, dtype, opset)  # before the model loads
    check_compute(compute, weights, dtype)
    config, tokenizer, generator, source = load_default_or_checkpoint(checkpoint, trust_checkpoint)
    prune = parse_prune(prune_spec, config.generator.scales) if prune_spec is not None else {}
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
        compute=compute,
        prune=prune,
    )
    arithmetic = "" if compute == "float" else f", {compute} compute for ONNX Runtime's CPU provider"
    arithmetic += f", pruned {prune_spec}" if prune else ""
    click.echo(f"wrote bundle {out} ({config.name}, {dtype}, {weights} weights{arithmetic}, opset {opset})")


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
@click.option(
    "--quality",
    is_flag=True,
    help="Instead of the graphs: generate the same images on BUNDLE and on --against (a dense bundle of the same "
    "model) and print token agreement per scale, PSNR and, for the default model, the classifier's metrics.",
)
@click.option(
    "--against",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="--quality: the dense bundle to compare with.",
)
@click.option("--images", default=100, show_default=True, type=click.IntRange(10), help="--quality: images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="--quality: the seed.")
def check(bundle, backend, checkpoint, trust_checkpoint, debug_dir, quality, against, images, seed) -> None:
    """Run every graph against its reference and print max abs / relative error per output."""
    if quality or against is not None:
        if not (quality and against is not None):
            raise click.UsageError(
                "--quality and --against go together: imagefolder-export check --quality B --against D"
            )
        from imagefolder.cli.quality import compare_quality
        from imagefolder.core.schedule import SamplingParams

        click.echo(compare_quality(bundle, against, images, SamplingParams(seed=seed)).table())
        return
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
