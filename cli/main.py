"""The ``imagefolder`` command: generate, reconstruct, profile, convert (and train / eval).

Thin layer: each command parses its options, calls one library function, and prints.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click
import numpy as np

from imagefolder.cli.common import BACKENDS, CommandGroup, open_backend, ort_providers, parse_ints, setup_logging
from imagefolder.cli.reference import ReferenceOptions, reference_options
from imagefolder.core.schedule import SamplingParams
from imagefolder.errors import InputError, MissingDependency

BUNDLE = click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Bundle folder from `imagefolder-export onnx` (needed by the ort and trt backends).",
)
BACKEND = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: trt if the bundle has engines and TensorRT imports, else ort; torch with no bundle.",
)
CHECKPOINT = click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Weights for the torch backend: ours (.safetensors) or official (.pth/.pt). "
    "Default: the model that ships with the package.",
)
PROVIDERS = click.option(
    "--providers",
    help="ort backend: execution providers in order, e.g. cuda,cpu "
    "or tensorrt,cuda,cpu (default cpu; needs onnxruntime-gpu).",
)
TRUST = click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow arbitrary pickled objects in an official checkpoint (only for trusted files).",
)


class LazyGroup(CommandGroup):
    """Loads the training commands (which need torch) only when one of them is asked for, so the
    runtime commands start fast and work where torch is absent or broken."""

    LAZY = {"train": ("imagefolder.cli.train", "train_group"), "eval": ("imagefolder.cli.train", "eval_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.LAZY:
            return super().get_command(ctx, name)
        module, attribute = self.LAZY[name]
        try:
            return getattr(importlib.import_module(module), attribute)
        except ImportError as err:
            raise MissingDependency("PyTorch", "train", err, purpose=f"(`imagefolder {name}` needs it)") from err


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="-v for progress details, -vv for debug logs.")
@click.version_option(package_name="imagefolder")
def main(verbose: int) -> None:
    """ImageFolder image generation on ONNX Runtime, TensorRT or PyTorch."""
    setup_logging(verbose)


@main.command()
@BUNDLE
@BACKEND
@CHECKPOINT
@TRUST
@click.option("--class", "classes", default="0", show_default=True, help="Class id(s), comma-separated.")
@click.option("--seed", default=SamplingParams.seed, show_default=True, type=int)
@click.option("--cfg", default=SamplingParams.cfg, show_default=True, type=float, help="Guidance at the last scale.")
@click.option(
    "--top-k",
    default=SamplingParams.top_k,
    show_default=True,
    type=int,
    help="Per branch; at most the bundle's sampler candidates.",
)
@click.option("--top-p", default=SamplingParams.top_p, show_default=True, type=float)
@click.option(
    "--sampling",
    type=click.Choice(["gumbel", "official"]),
    default="gumbel",
    show_default=True,
    help="official: torch.multinomial in the official draw order (torch backend only).",
)
@click.option(
    "--no-cuda-graphs",
    is_flag=True,
    help="trt backend: never capture a CUDA graph. By default a session captures its whole generation at its "
    "second batch of one size and replays it after; a single batch always runs eagerly.",
)
@PROVIDERS
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="out.png", show_default=True)
@click.option(
    "--indices",
    "indices_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the sampled indices (B, 2, P) as .npy.",
)
@reference_options
def generate(
    bundle,
    backend,
    checkpoint,
    trust_checkpoint,
    classes,
    seed,
    cfg,
    top_k,
    top_p,
    sampling,
    no_cuda_graphs,
    providers,
    output,
    indices_out,
    **conditioning,
) -> None:
    """Generate images of the given classes; several classes make a grid.

    With --reference IMG (or --reference-indices) the generation is conditioned: the reference's tokens
    chosen by --keep, --keep-scales and --mask are teacher-forced and the rest sampled (variations,
    in-painting, out-painting).
    """
    labels = parse_ints(classes, "class id")
    reference = ReferenceOptions.read(**conditioning)
    if reference is not None and sampling == "official":
        raise InputError("--sampling official has no conditioned generation; drop it to use a reference")
    if sampling == "official":
        images, indices = _generate_official(
            bundle, backend, checkpoint, trust_checkpoint, labels, cfg, top_k, top_p, seed
        )
    else:
        from imagefolder.runtime.loop import generate as run_generation

        params = SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)
        engine = open_backend(
            bundle, backend, checkpoint, trust_checkpoint, not no_cuda_graphs, providers=ort_providers(providers)
        )
        try:
            if reference is None:
                result = run_generation(engine, labels, params)
            else:
                result = run_generation(
                    engine,
                    labels,
                    params,
                    reference=reference.indices,
                    force=reference.force(engine.scales),
                    reference_images=reference.reference_images(engine),
                )
        finally:
            engine.close()
        images, indices = result.images, result.indices
    _save_outputs(output, images, indices_out, indices)
    click.echo(f"wrote {output} ({len(labels)} image{'s' * (len(labels) > 1)}, classes {labels}, seed {seed})")


def _generate_official(bundle, backend, checkpoint, trust_checkpoint, labels, cfg, top_k, top_p, seed):
    if backend not in ("auto", "torch"):
        raise InputError("--sampling official runs on the torch backend only")
    if bundle is not None:  # it would run the PyTorch model of --checkpoint (or the default one), not the bundle
        raise InputError(
            "--sampling official runs the PyTorch model (--checkpoint, or the default model), not a bundle: "
            "drop --bundle, or keep it and drop --sampling official (the default sampling runs on every backend)"
        )
    import torch

    from imagefolder.core.schedule import check_labels
    from imagefolder.default_model import load_default_or_checkpoint
    from imagefolder.generate import generate as official_generate

    _, tokenizer, generator, _ = load_default_or_checkpoint(checkpoint, trust_checkpoint)
    labels = check_labels(labels, generator.cfg.num_classes)
    images, indices = official_generate(generator, tokenizer, torch.as_tensor(labels), cfg, top_k, top_p, seed)
    return images.numpy(), indices.int().numpy()


def _save_outputs(
    output: Path, images: np.ndarray, indices_out: Path | None, indices: np.ndarray, columns: int | None = None
) -> None:
    """The grid PNG and, if asked for, the indices: both written, or neither when either cannot be."""
    from PIL import Image

    from imagefolder.core.images import grid
    from imagefolder.io import atomic_writes

    with atomic_writes(output, *([indices_out] if indices_out is not None else [])) as temporary:
        Image.fromarray(grid(images, columns)).save(temporary[0], format="PNG")
        if indices_out is not None:
            with open(temporary[1], "wb") as f:
                np.save(f, indices)


@main.command()
@BUNDLE
@BACKEND
@CHECKPOINT
@TRUST
# no exists=True: read_image reports a missing or unreadable file like any other bad image (one line, exit 1)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default="reconstruction.png",
    show_default=True,
    help="Grid: each input above its reconstruction.",
)
@click.option(
    "--indices",
    "indices_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the encoder's indices (B, 2, P) as .npy (a reference for `generate --reference-indices`).",
)
def reconstruct(bundle, backend, checkpoint, trust_checkpoint, images, output, indices_out) -> None:
    """Encode images to indices and decode them back; prints PSNR per image.

    Each image is centre-cropped and resized to the model's size; PSNR compares the reconstruction
    with that input, as both are saved in the grid.
    """
    from imagefolder.core.images import psnr, read_image, to_batch

    pictures = [read_image(path) for path in images]  # every file checked before the backend loads
    engine = open_backend(bundle, backend, checkpoint, trust_checkpoint)
    try:
        batch = to_batch(pictures, engine.image_size)
        indices = engine.encode(batch)
        recon = engine.decode(indices)
    finally:
        engine.close()
    _save_outputs(output, np.concatenate([batch, recon]), indices_out, indices, columns=len(batch))
    for path, value in zip(images, psnr(batch, recon), strict=True):
        click.echo(f"{path}: PSNR {value:.2f} dB")
    click.echo(f"wrote {output}")


@main.command()
@BUNDLE
@BACKEND
@CHECKPOINT
@TRUST
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, comma-separated (e.g. 1,8).")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0))
@click.option("--cfg", default=SamplingParams.cfg, show_default=True, type=float)
@click.option("--top-k", default=SamplingParams.top_k, show_default=True, type=int)
@click.option("--top-p", default=SamplingParams.top_p, show_default=True, type=float)
@click.option(
    "--no-cuda-graphs",
    is_flag=True,
    help="trt backend: eager runs only. By default eager runs (per stage) are followed by CUDA-graph runs "
    "(the whole generation as one launch; one capture run, then --runs replays).",
)
@PROVIDERS
@click.option("--layers", is_flag=True, help="trt backend: per-layer times (IProfiler) and an engine-inspector dump.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option(
    "--trace",
    "trace_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a Chrome trace (open in Perfetto or chrome://tracing).",
)
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw per-scale latency stacked by stage (p50 bars, p90 whiskers) as a PNG; needs matplotlib "
    "(the bench extra).",
)
@click.option(
    "--floor",
    "floor_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A floor file written by `python -m bench` (floor.json): draws each bar's floor on the --plot figure.",
)
@reference_options
def profile(
    bundle,
    backend,
    checkpoint,
    trust_checkpoint,
    batches,
    runs,
    warmup,
    cfg,
    top_k,
    top_p,
    no_cuda_graphs,
    providers,
    layers,
    json_out,
    trace_out,
    plot_out,
    floor_file,
    **conditioning,
) -> None:
    """Per-step latency of the generation loop: p50/p90/p99, time to first scale, images/s.

    On TensorRT, two reports per batch size: eager (device time of every stage from CUDA events) and
    CUDA graph (device time of the whole generation around its one launch, and launches per generation).
    With --reference IMG every run first encodes the reference (the encode stage) and is conditioned on it.
    """
    from imagefolder.runtime import plots
    from imagefolder.runtime.profiler import profile_generation

    if floor_file is not None and plot_out is None:
        raise click.UsageError("--floor draws on the --plot figure; give --plot FILE.png too")
    if plot_out is not None:
        plots.require_matplotlib()
    sizes = parse_ints(batches, "batch size")
    reference = ReferenceOptions.read(**conditioning)
    if reference is not None and reference.picture is None:
        raise InputError("profile encodes a reference image in every run: give --reference IMG, not indices")
    params = SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, seed=0)
    engine = open_backend(
        bundle, backend, checkpoint, trust_checkpoint, not no_cuda_graphs, layers, ort_providers(providers)
    )
    if layers and engine.name != "trt":
        engine.close()
        raise click.UsageError("--layers needs the trt backend (TensorRT's per-layer profiler)")
    scales, source = engine.scales, getattr(engine, "bundle", None)
    title = f"{engine.name}" + (f" · {source.name} {source.dtype}" if source is not None else "")
    try:
        floors = None
        if floor_file is not None:
            model, dtype = (source.name, source.dtype) if source is not None else (None, None)
            floors = plots.read_floor(floor_file, sizes, len(scales), model, dtype)
        result = profile_generation(
            engine,
            sizes,
            params,
            runs=runs,
            warmup=warmup,
            progress=lambda text: click.echo(text, err=True),
            reference_image=None if reference is None else reference.reference_images(engine),
            force=None if reference is None else reference.force(engine.scales),
        )
        if layers:
            from imagefolder.runtime.backends.trt import TrtBackend
            from imagefolder.runtime.profiler import layer_table

            assert isinstance(engine, TrtBackend)  # checked above: --layers runs on trt only
            click.echo(layer_table(engine.layer_times()))
            out_dir = (json_out.parent if json_out else Path(".")) / "engine-layers"
            click.echo(f"wrote the engine inspector's layer dumps: {', '.join(map(str, engine.inspect(out_dir)))}")
    finally:
        engine.close()
    if source is not None:
        from imagefolder.core.pruning import describe

        for report in result.reports:
            report["prune"] = source.manifest.get("prune", {}).get("spec", "")
            report["compute"] = source.compute
        click.echo(f"bundle {source.path}: {describe(source.manifest)}; {source.compute} compute")
    click.echo(result.table())
    if json_out is not None:
        result.write_json(json_out)
        click.echo(f"wrote {json_out}")
    if trace_out is not None:
        result.write_trace(trace_out)
        click.echo(f"wrote {trace_out}")
    if plot_out is not None:
        plots.save_png(plots.profile_figure(result.reports, scales, floors, title), plot_out)
        click.echo(f"wrote {plot_out}")


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@TRUST
def convert(source, destination, trust_checkpoint) -> None:
    """Convert an official checkpoint (ar-ckpt-last.pth, best_ckpt.pt) to safetensors + JSON config."""
    from imagefolder.checkpoints import convert as convert_checkpoint

    out = convert_checkpoint(source, destination, trust_checkpoint=trust_checkpoint)
    click.echo(f"wrote {out} and {Path(out).with_suffix('.json')}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Where HTTP and gRPC listen (0.0.0.0: every interface).",
)
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
def serve(repository, http_port, grpc_port, address, server_args) -> None:
    """Run Triton Inference Server (from the nvidia-pytriton wheel) on REPOSITORY until Ctrl-C.

    REPOSITORY is from `imagefolder-export triton`; arguments after `--` go to tritonserver
    (e.g. -- --model-control-mode=explicit --load-model=*). docs/triton.md: serve on a CPU machine.
    """
    import os

    from imagefolder.runtime.triton_server import find_triton, server_command, server_env

    install = find_triton()
    command = server_command(install, repository, http_port, grpc_port, server_args, address=address)
    click.echo(f"serving {repository} on http://{address}:{http_port} and grpc {address}:{grpc_port}", err=True)
    os.execve(command[0], command, server_env(install))


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m imagefolder.cli.main train ... (docs/training.md)
    main()
