"""``imagefolder train tokenizer|generator|classifier`` and ``imagefolder eval``.

Thin layer: parse options, call one library function, print the result. Run any trainer under
``torchrun --nproc_per_node=N -m imagefolder.cli.main train ...`` for DistributedDataParallel.
"""

from __future__ import annotations

import json
import logging

import click

from imagefolder.cli.common import setup_logging
from imagefolder.core.schedule import SamplingParams

log = logging.getLogger(__name__)


def _common_options(fn):
    """Options every trainer takes."""
    options = [
        click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Run folder."),
        click.option("--data", default="shapes", show_default=True, help="shapes, natural, or an image folder path."),
        click.option("--steps", type=int, help="Total optimisation steps of the schedule."),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Global batch over all ranks."),
        click.option("--lr", type=float, default=1e-3, show_default=True),
        click.option("--warmup", type=int, default=100, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--log-every", type=int, default=50, show_default=True),
        click.option("--save-every", type=int, default=250, show_default=True),
        click.option("--stop-at", type=int, default=None, help="Leave after this step (resume later)."),
        click.option("--no-resume", is_flag=True, help="Start over even if the run folder has a state."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("-v", "--verbose", count=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _given(**options) -> dict:
    """The options the user gave (not None), so that the dataclass's own defaults apply to the rest."""
    return {name: value for name, value in options.items() if value is not None}


@click.group("train")
def train_group() -> None:
    """Train the tokenizer, the generator, or the evaluation classifier."""


@train_group.command("tokenizer")
@_common_options
@click.option("--preset", default="tiny", show_default=True, help="Model preset (configs.PRESETS).")
@click.option(
    "--perceptual", type=click.Choice(["auto", "lpips", "structure", "none"]), default="auto", show_default=True
)
@click.option("--perceptual-weight", type=float, default=1.0, show_default=True)
@click.option(
    "--teacher",
    default="none",
    show_default=True,
    help="Semantic teacher: none, auto, dinov2, builtin, or a classifier .safetensors path.",
)
@click.option("--sem-weight", type=float, default=0.1, show_default=True)
@click.option("--disc-weight", type=float, default=0.5, show_default=True, help="0 disables the discriminator.")
@click.option("--disc-start", type=int, default=1000, show_default=True)
@click.option("--lecam-weight", type=float, default=0.001, show_default=True)
@click.option("--ema-decay", type=float, default=0.999, show_default=True)
def tokenizer_command(preset: str, verbose: int, device: str | None, no_resume: bool, steps: int | None, **kw) -> None:
    """Train a tokenizer; writes OUT/tokenizer.safetensors (EMA weights) when finished."""
    from imagefolder.configs import from_name
    from imagefolder.train.common import cleanup_distributed, setup_distributed
    from imagefolder.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    setup_logging(verbose)
    opts = TokenizerTrainConfig(resume=not no_resume, **_given(steps=steps), **kw)  # checks every option first
    env = setup_distributed(device)
    try:
        trainer = train_tokenizer(opts, env, from_name(preset))
    finally:
        cleanup_distributed()
    if env.is_main:
        click.echo(f"tokenizer: step {trainer.step_count}/{opts.steps}, run folder {opts.out}")


@train_group.command("generator")
@_common_options
@click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="Checkpoint holding the frozen tokenizer (e.g. RUN/tokenizer.safetensors).",
)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--grad-clip", type=float, default=2.0, show_default=True)
def generator_command(
    tokenizer_path: str, verbose: int, device: str | None, no_resume: bool, steps: int | None, **kw
) -> None:
    """Train a generator on a frozen tokenizer; writes OUT/model.safetensors (tokenizer + generator)."""
    from imagefolder.train.common import cleanup_distributed, setup_distributed
    from imagefolder.train.generator import GeneratorTrainConfig, train_generator

    setup_logging(verbose)
    opts = GeneratorTrainConfig(tokenizer=tokenizer_path, resume=not no_resume, **_given(steps=steps), **kw)
    env = setup_distributed(device)
    try:
        trainer = train_generator(opts, env)
    finally:
        cleanup_distributed()
    if env.is_main:
        click.echo(f"generator: step {trainer.step_count}/{opts.steps}, run folder {opts.out}")


@train_group.command("classifier")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Output .safetensors file.")
@click.option("--data", default="shapes", show_default=True)
@click.option("--steps", type=int, default=600, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True)
def classifier_command(out: str, data: str, steps: int, batch_size: int, lr: float, seed: int, verbose: int) -> None:
    """Train the classifier used by `imagefolder eval` (and as a fallback semantic teacher)."""
    from imagefolder.train.classifier import train_classifier

    setup_logging(verbose)
    _, accuracy = train_classifier(data, out, steps, batch_size, lr, seed)
    click.echo(f"classifier saved to {out}; held-out accuracy {accuracy:.4f}")


@click.command("eval")
@click.option(
    "--checkpoint",
    "-c",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Model checkpoint (default: the shipped default model).",
)
@click.option("--data", default="shapes", show_default=True, help="Held-out data: shapes, natural, or a folder.")
@click.option(
    "--classifier",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Classifier for sample quality (default: the shipped shapes classifier).",
)
@click.option("--num-images", "-n", type=int, default=200, show_default=True)
@click.option("--reconstruction/--no-reconstruction", default=True, show_default=True)
@click.option("--generation/--no-generation", default=True, show_default=True)
@click.option("--cfg", type=float, default=SamplingParams.cfg, show_default=True, help="Guidance at the last scale.")
@click.option("--top-k", type=int, default=SamplingParams.top_k, show_default=True)
@click.option("--top-p", type=float, default=SamplingParams.top_p, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the metrics here.")
@click.option("-v", "--verbose", count=True)
def eval_command(
    checkpoint: str | None,
    data: str,
    classifier: str | None,
    num_images: int,
    reconstruction: bool,
    generation: bool,
    cfg: float,
    top_k: int,
    top_p: float,
    seed: int,
    json_out: str | None,
    verbose: int,
) -> None:
    """Reconstruction PSNR/SSIM on held-out images; class accuracy and classifier Fréchet distance of samples."""
    from imagefolder.train.eval import EvalConfig, evaluate_checkpoint

    setup_logging(verbose)
    opts = EvalConfig(
        checkpoint=checkpoint,
        data=data,
        classifier=classifier,
        num_images=num_images,
        reconstruction=reconstruction,
        generation=generation,
        cfg=cfg,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    text = json.dumps(evaluate_checkpoint(opts), indent=2)
    click.echo(text)
    if json_out:
        from imagefolder.io import atomic_write_text

        atomic_write_text(json_out, text + "\n")
