"""``python -m bench``: the benchmark suite (``make bench`` runs it on the official d17 architecture).

    python -m bench                                    # d17, random weights, every job, ≤ 20 min on 2 cores
    python -m bench --preset tiny --only roofline,batch
    python -m bench --write-docs                       # also docs/benchmarks.md's generated section, docs/bench/

Jobs, in this order (``--only`` picks some; each calibrates or measures what it needs if no earlier job did):

    calibrate  the machine's floor: memory read GB/s, GEMM GFLOP/s at every shape of the model's stages
    roofline   every stage at batch 1 and 8, torch and ort, against its floor
    batch      images/s at batch 1, 2, 4, 8, torch and ort, against the floor
    overhead   the runtime's own time per image: end to end minus the time inside the graphs
    folding    two tokens per position (286 positions at d17) against one (572): per step, per image
    dtypes     fp32 and fp16 bundles, int8 and int4 generator weights: speed and quality
    pruning    token pruning of the last two scales and integer arithmetic against the dense bundle:
               speed (preset), quality over 1,000 default-model images, a recommended setting
    compare    only with --bundles A,B[,...]: your bundles side by side, every stage, and their tokens
    serve      a real Triton server (ort repository) under perf_analyzer at concurrency 1-8, against
               in-process generation at the batch sizes it formed; only with --only (needs `make setup`)

    python -m bench --only serve --out docs/bench/serve   # the default model and d17 (docs/benchmarks.md)

Models and bundles are made first (exported once into ``--workdir``, then reused); measurements run
interleaved and are sized to the budget (``--budget``, default 20 minutes for d17, one for tiny);
progress and the time spent go to stderr, the tables to stdout. Writes into ``--out`` (default
build/bench/PRESET; docs/bench with --write-docs): bench.json (every raw number, the machine, the
command), floor.json (for ``imagefolder profile --plot --floor``), roofline.png, batch-scaling.png,
and the tables as benchmarks.md, or with --write-docs as docs/benchmarks.md's generated section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

import onnxruntime
import torch

from bench import figures, machine, report
from bench.budget import Budget
from bench.calibrate import GEMM_SOURCE
from bench.context import BATCHES, Context, Options
from bench.jobs import batch, calibrate, compare, dtypes, folding, overhead, pruning, roofline, serve
from imagefolder.configs import PRESETS
from imagefolder.errors import ImagefolderError
from imagefolder.runtime.plots import FLOOR_KIND, FLOOR_VERSION, save_png

# Each job module has prepare(ctx), the one-time work (models, exports), and run(ctx) -> JobResult.
JOBS: dict[str, ModuleType] = {
    "calibrate": calibrate,
    "roofline": roofline,
    "batch": batch,
    "overhead": overhead,
    "folding": folding,
    "dtypes": dtypes,
    "pruning": pruning,
    "compare": compare,
    "serve": serve,
}
ON_REQUEST = ("compare", "serve")  # jobs that run only when --only names them (serve needs the server)
DEFAULT_PRESET = "imagefolder-d17"
BUDGET_S = {"tiny": 60.0}  # every other preset: 20 minutes
ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    default_jobs = [name for name in JOBS if name not in ON_REQUEST]
    parser.add_argument(
        "--only",
        default=",".join(default_jobs),
        help=f"comma-separated jobs of: {', '.join(JOBS)} (default: all but {', '.join(ON_REQUEST)})",
    )
    parser.add_argument("--bundles", default="", help="the compare job's bundles of one model, comma-separated")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 1200; 60 for tiny)")
    parser.add_argument("--runs", type=int, default=10, help="the most measured runs of any measurement")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs before each measurement")
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for everything measured: the calibration, torch and ONNX Runtime's intra-op pool "
        "(default: the physical cores, ONNX Runtime's own default, which its sessions then keep)",
    )
    parser.add_argument("--quality-images", type=int, default=100, help="default-model images per dtype")
    parser.add_argument("--pruning-images", type=int, default=1000, help="default-model images per pruning variant")
    parser.add_argument(
        "--pruning-ratios", default="0.75,0.5,0.25", help="the pruning job's shares kept of the last two scales"
    )
    parser.add_argument(
        "--pruning-speed-ratios", default="", help="those measured for speed on the preset (default: the same)"
    )
    parser.add_argument(
        "--pruning-combined",
        default="",
        help="the ratio pruned on top of int8 compute (default: the largest speed ratio; 'none': no such variant)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("build") / "bench",
        help="where bundles are kept (default build/bench in the current folder, where README's --floor looks)",
    )
    parser.add_argument("--out", type=Path, help="results folder (default build/bench/PRESET, docs/bench)")
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md's generated section")
    parser.add_argument(
        "--serve-models", default="", help="the serve job's models, comma-separated (default: default,PRESET)"
    )
    args = parser.parse_args(argv)
    args.jobs = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.jobs if name not in JOBS]
    if unknown or not args.jobs:
        parser.error(f"unknown job(s) {unknown}; choose from {', '.join(JOBS)}")
    args.bundles = [Path(part.strip()) for part in args.bundles.split(",") if part.strip()]
    if ("compare" in args.jobs) != (len(args.bundles) >= 2):
        parser.error("--only compare and --bundles A,B (two or more bundles of one model) go together")
    for option in ("pruning_ratios", "pruning_speed_ratios"):
        text = getattr(args, option)
        try:
            ratios = tuple(float(r) for r in text.split(",")) if text else ()
        except ValueError:
            ratios = (float("nan"),)
        if (option == "pruning_ratios" and not ratios) or not all(0 < r <= 1 for r in ratios):
            parser.error(f"--{option.replace('_', '-')}: shares of positions kept, in (0, 1], comma-separated")
        setattr(args, option, ratios)
    combined = args.pruning_combined
    try:
        args.pruning_combined = None if combined == "none" else float(combined) if combined else 0.0
    except ValueError:
        parser.error("--pruning-combined: a share in (0, 1], or 'none'")
    if args.pruning_combined is not None and not 0 <= args.pruning_combined <= 1:
        parser.error("--pruning-combined: a share in (0, 1], or 'none'")
    if (
        args.runs < 1
        or args.warmup < 0
        or min(args.quality_images, args.pruning_images) < 10
        or (args.threads or 1) < 1
    ):
        parser.error("--runs and --threads must be ≥ 1, --warmup ≥ 0, --quality-images and --pruning-images ≥ 10")
    return args


def floor_file(ctx: Context, info: dict) -> dict:
    """The floor of every stage at every batch size, for ``imagefolder profile --floor``."""
    calib = ctx.calibrated()
    return {
        "kind": FLOOR_KIND,
        "version": FLOOR_VERSION,
        "model": ctx.models().config.name,
        "dtype": "fp32",
        "machine": info,
        "rates": {"memory_gbs": calib.memory_gbs, "threads": calib.threads, "gemm": GEMM_SOURCE},
        "batches": {str(b): {label: f.to_dict() for label, f in ctx.floors(b).items()} for b in BATCHES},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out or (ROOT / "docs" / "bench" if args.write_docs else args.workdir / args.preset)
    info = machine.describe()
    budget = Budget(args.budget or BUDGET_S.get(args.preset, 1200.0))
    threads = args.threads or machine.physical_cores()
    torch.set_num_threads(threads)
    onnxruntime.set_default_logger_severity(3)  # errors only: fp16 graphs log a warning per unfoldable constant
    serve_models = tuple(name.strip() for name in args.serve_models.split(",") if name.strip())
    options = Options(
        args.preset,
        args.runs,
        args.warmup,
        threads,
        args.threads,
        args.workdir,
        args.quality_images,
        args.pruning_images,
        args.bundles,
        args.pruning_ratios,
        args.pruning_speed_ratios,
        args.pruning_combined,
        serve_models,
    )
    ctx = Context(options, budget)
    print(f"## {args.preset}: {', '.join(args.jobs)}\n\n{machine.summary(info)}\n", flush=True)
    budget.say("preparing: models, bundles, graphs (exported once into --workdir, then reused)")
    try:
        for name in args.jobs:
            JOBS[name].prepare(ctx)
    except ImagefolderError as err:  # a --bundles path that is no bundle, an export refused
        print(f"Error: {err}", file=sys.stderr)
        return 2
    budget.plan(args.jobs)
    results = []
    for i, name in enumerate(args.jobs):
        budget.say(f"job {i + 1}/{len(args.jobs)}: {name}")
        result = JOBS[name].run(ctx)
        results.append(result)
        print(result.markdown() + "\n", flush=True)
    drift = ctx.drift() if ctx.calibration is not None else None
    info["load_average_end"] = machine.describe()["load_average"]
    budget.say(f"done in {budget.elapsed_s:.0f} s; writing {out}")
    written = write(out, args, ctx, info, results, drift)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def write(out: Path, args: argparse.Namespace, ctx: Context, info: dict, results: list, drift: dict | None) -> list:
    raw = {result.name: result.raw for result in results}
    data = {"machine": info, "preset": args.preset, "elapsed_s": ctx.budget.elapsed_s, "drift": drift, "jobs": raw}
    written = [report.write_json(out / "bench.json", data)]
    if ctx.calibration is not None:
        written.append(report.write_json(out / "floor.json", floor_file(ctx, info)))
    threads = ctx.options.threads
    title = (
        f"{args.preset} (random weights), {info['cpu']}, {info['physical_cores']} cores, "
        f"{threads} thread{'s' * (threads > 1)}, {info['date'][:10]}"
    )
    if "roofline" in raw and "calibrate" in raw:
        written.append(save_png(figures.roofline(raw["roofline"], raw["calibrate"], title), out / "roofline.png"))
    if "batch" in raw:
        written.append(save_png(figures.batch_scaling(raw["batch"], title), out / "batch-scaling.png"))
    if "pruning" in raw:
        written.append(save_png(figures.quality_speed(raw["pruning"], title), out / "pruning.png"))
    if "serve" in raw:  # models of its own (the default model's weights are trained): the machine only
        load = " ".join(f"{x:.1f}" for x in info["load_average"] or [])
        serve_title = f"{info['cpu']}, {info['physical_cores']} cores, load {load} at the start, {info['date'][:10]}"
        written.append(save_png(figures.serve_throughput(raw["serve"], serve_title), out / "serve-throughput.png"))
    section = report.document(header(args, ctx, info, drift, out), results)
    if args.write_docs:
        written.append(report.replace_section(ROOT / "docs" / "benchmarks.md", section))
    else:
        written.append(report.write_text(out / "benchmarks.md", section))
    return written


def header(args: argparse.Namespace, ctx: Context, info: dict, drift: dict | None, out: Path) -> str:
    lines = [
        f"## Generated: {args.preset}, {', '.join(args.jobs)}",
        machine.summary(info).replace("\n", "  \n"),
        f"Run took {ctx.budget.elapsed_s:.0f} s of a {ctx.budget.total_s:.0f} s budget; load average at the end "
        + " ".join(f"{x:.1f}" for x in info["load_average_end"] or []),
    ]
    if drift is not None:
        lines.append(
            f"Floor drift over the run (re-measured at the end ÷ at the start): memory ×{drift['memory']:.2f}, "
            f"GEMM ×{drift['gemm']:.2f}"
        )
    pictures = [
        name
        for name in ("roofline.png", "batch-scaling.png", "pruning.png", "serve-throughput.png")
        if (out / name).exists()
    ]
    if args.write_docs and pictures:
        lines.append(" ".join(f"![{name[:-4]}](bench/{name})" for name in pictures))
    return "\n\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
