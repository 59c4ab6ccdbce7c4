"""Pictures of a profile: per-scale latency stacked by stage, and the floor it is measured against.

``imagefolder profile --plot FILE.png`` draws one panel per report (batch size, and on TensorRT eager
and CUDA graph): for every scale a bar of the p50 times of its step, sample and fold (the fold that
follows the scale) stacked, a p90 whisker on each part, the prefill before and the decode after (a
graph run has one bar, the whole generation); device time where every stage has it (TensorRT: the
host only enqueues), host time otherwise; and, given a floor file, the floor of each bar as a black
tick with the bar's multiple of it written above.

A floor file is the JSON that ``python -m bench`` writes beside its results (``floor.json``): for a
model, a dtype and some batch sizes, the floor of every stage on the machine it calibrated
(max(FLOPs ÷ GEMM rate, bytes read ÷ memory rate), see ``bench/calibrate.py``)::

    {"kind": "imagefolder-floor", "version": 1, "model": "tiny", "dtype": "fp32", "machine": {...},
     "batches": {"1": {"prefill": {"ms": 0.01, ...}, "step[0]": {...}, ..., "decode": {...}}, "8": {...}}}

The profile does not calibrate itself: a floor belongs to the device that runs the graphs, and for
the trt backend that is a GPU, which a CPU matmul cannot stand for.

matplotlib is optional (the ``bench`` extra): without it ``--plot`` stops with one line naming the
extra. No pyplot, so drawing changes no global state and needs no display.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from imagefolder.errors import InputError, MissingDependency
from imagefolder.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FLOOR_KIND, FLOOR_VERSION = "imagefolder-floor", 1
DPI = 100
WIDTH_IN, PANEL_HEIGHT_IN = 12.0, 4.5  # a profile figure is 1200 px wide and 450 px high per report
COLORS = {
    "encode": "#d4a5a5",
    "prefill": "#bdbdbd",
    "step": "#3b6fb6",
    "sample": "#e69f00",
    "fold": "#2a9d8f",
    "decode": "#8c8c8c",
    "generation": "#6a51a3",
}


def require_matplotlib(purpose: str = "(`--plot` draws with it)") -> None:
    """Raise ``MissingDependency`` naming the ``bench`` extra unless matplotlib imports."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError as err:
        raise MissingDependency("matplotlib", "bench", err, purpose=purpose) from err


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot, no display)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG of exactly its size in pixels, atomically."""
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def profile_size(panels: int) -> tuple[int, int]:
    """Width and height in pixels of a profile figure with ``panels`` reports."""
    return round(WIDTH_IN * DPI), round(PANEL_HEIGHT_IN * panels * DPI)


# -- floor files -------------------------------------------------------------------------------------


def stage_labels(num_scales: int) -> list[str]:
    """The profiler's stage labels of one generation, in loop order."""
    labels = ["prefill"]
    for si in range(num_scales):
        labels += [f"step[{si}]", f"sample[{si}]"] + ([f"fold[{si}]"] if si < num_scales - 1 else [])
    return labels + ["decode"]


def read_floor(
    path: str | os.PathLike, batches: list[int], num_scales: int, model: str | None = None, dtype: str | None = None
) -> dict[int, dict[str, float]]:
    """The floor in ms of every stage for each of ``batches``, from a floor file; ``InputError`` if it does
    not fit (another model, dtype or number of scales, or a batch size it was not calibrated for)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the floor file {path}: {err}") from None
    if not isinstance(data, dict) or data.get("kind") != FLOOR_KIND or data.get("version") != FLOOR_VERSION:
        raise InputError(f"{path} is not a floor file (version {FLOOR_VERSION}) written by `python -m bench`")
    for what, mine, theirs in (("model", model, data.get("model")), ("dtype", dtype, data.get("dtype"))):
        if mine is not None and mine != theirs:
            raise InputError(f"{path} is the floor of {what} {theirs}, this profile's is {mine}")
    floors = data.get("batches", {})
    missing = [b for b in batches if str(b) not in floors]
    if missing:
        raise InputError(
            f"{path} has the floor of batch {', '.join(sorted(floors, key=int))}, not of {missing}; "
            f"profile those, or calibrate with `python -m bench --preset {data.get('model')} --only calibrate`"
        )
    out = {}
    for batch in batches:
        stages = floors[str(batch)]
        if sorted(stages) != sorted(stage_labels(num_scales)):
            raise InputError(f"{path} is the floor of a model with other scales than this one's {num_scales}")
        out[batch] = {label: float(entry["ms"]) for label, entry in stages.items()}
    return out


# -- the profile figure ------------------------------------------------------------------------------


def profile_figure(
    reports: list[dict], scales: tuple[int, ...], floors: dict[int, dict[str, float]] | None = None, title: str = ""
) -> Figure:
    """One panel per report (``StepProfiler.report()``) of a model with ``scales``; see the module docstring."""
    figure = new_figure(WIDTH_IN, PANEL_HEIGHT_IN * len(reports))
    axes = figure.subplots(len(reports), 1, squeeze=False)[:, 0]
    for ax, report in zip(axes, reports, strict=True):
        _profile_panel(ax, report, scales, (floors or {}).get(report["batch"]), title)
    return figure


def _bar_groups(report: dict, scales: tuple[int, ...]) -> list[tuple[str, list[str]]]:
    """(tick label, stage labels stacked in its bar): the reference's encode (conditioned runs), the prefill,
    each scale, the decode; or, for a run that replayed a CUDA graph, the encode and its one stage."""
    encode = [("encode", ["encode"])] if any(s["label"] == "encode" for s in report["stages"]) else []
    if report.get("mode") == "graph":
        return encode + [("generation\n(one CUDA graph)", ["generation"])]
    groups = encode + [("prefill", ["prefill"])]
    for si, pn in enumerate(scales):
        kinds = ("step", "sample", "fold") if si < len(scales) - 1 else ("step", "sample")
        groups.append((f"{si}\n{pn}×{pn}", [f"{kind}[{si}]" for kind in kinds]))
    return groups + [("decode", ["decode"])]


WHISKER_OFFSET = {"step": -0.22, "sample": 0.0, "fold": 0.22}


def _profile_panel(ax, report: dict, scales: tuple[int, ...], floor: dict[str, float] | None, title: str) -> None:
    # A GPU's time is on the device (host time is its enqueue time): device time wherever every stage has it.
    device = all(s["device_ms"] is not None for s in report["stages"])
    clock = "device" if device else "host"
    stages = {s["label"]: s[f"{clock}_ms"] for s in report["stages"]}
    if floor is not None and "generation" in stages:
        floor = {"generation": sum(floor.values())}
    first_floor = True
    groups = _bar_groups(report, scales)
    legend: set[str] = set()
    top = 0.0
    for x, (_, labels) in enumerate(groups):
        bottom = 0.0
        for label in labels:
            kind = label.split("[")[0]
            p50, p90 = stages[label]["p50"], stages[label]["p90"]
            ax.bar(x, p50, 0.7, bottom=bottom, color=COLORS[kind], label=None if kind in legend else kind)
            legend.add(kind)
            wx = x + WHISKER_OFFSET.get(kind, 0.0)
            ax.plot([wx, wx], [bottom + p50, bottom + p90], color="black", lw=0.8)
            ax.plot([wx - 0.05, wx + 0.05], [bottom + p90] * 2, color="black", lw=0.8)
            top = max(top, bottom + p90)
            bottom += p50
        top = max(top, bottom)
        if floor is not None and all(label in floor for label in labels):  # a floor file has no encode stage
            floor_ms = sum(floor[label] for label in labels)
            ax.plot([x - 0.42, x + 0.42], [floor_ms] * 2, color="black", lw=2.5, label="floor" if first_floor else None)
            first_floor = False
            ax.annotate(
                f"{bottom / floor_ms:.1f}×",
                (x, max(bottom, floor_ms)),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )
            top = max(top, floor_ms)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, top * 1.15)
    ax.set_xlabel("scale (grid of positions); fold: the one after the scale")
    ax.set_ylabel(f"{clock} time per generation, ms")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncols=6)
    head = f"{title} · " if title else ""
    head += "CUDA graph · " if report.get("mode") == "graph" else ""
    floor_note = " · black tick: the floor, label: the bar's multiple of it" if floor else ""
    ax.set_title(
        f"{head}batch {report['batch']}: end to end p50 {report['e2e_ms']['p50']:.3g} ms, "
        f"{report['images_per_s']:.3g} images/s ({report['runs']} runs) · bars p50, whiskers p90{floor_note}",
        fontsize=10,
    )
