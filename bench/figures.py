"""The bench's figures: the roofline of a generation and its batch scaling (PNG, drawn with matplotlib
through ``imagefolder.runtime.plots``, so without pyplot).

- roofline: left, every stage as a point (achieved GFLOP/s against FLOPs per byte read) under the
  machine's roofs (the best GEMM rate measured, the memory rate times the intensity); right, each
  step's time against its floor, scale by scale, batch 1 and 8;
- batch scaling: images/s at batch 1, 2, 4, 8 for torch and ort, and the floor's images/s.
"""

from __future__ import annotations

import numpy as np

from imagefolder.runtime.plots import new_figure

BACKEND_COLOR = {"torch": "#d1495b", "ort": "#3b6fb6"}
BACKEND_MARKER = {"torch": "o", "ort": "s"}
KIND_MARKER = {"step": "o", "sample": "^", "fold": "v", "prefill": "D", "decode": "D"}
FILLED = 8  # batch drawn with filled markers; the others hollow


def _plain_log_ticks(axis) -> None:
    """Log-scale ticks at 1, 2, 5 × 10^k labelled as plain numbers (0.5, 20, 200), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def _stage_points(ax, result: dict) -> list[float]:
    """Every stage of every batch and backend at (FLOP/byte, GFLOP/s); returns the intensities."""
    intensities = []
    for batch, entry in result.items():
        for name, color in BACKEND_COLOR.items():
            for label, stage in entry["stages"].items():
                floor = stage["floor"]
                if floor["flops"] == 0:
                    continue
                x, y = floor["flops"] / floor["bytes_read"], floor["flops"] / (stage[name]["p50"] * 1e6)
                intensities.append(x)
                face = color if int(batch) == FILLED else "none"
                ax.scatter(x, y, marker=KIND_MARKER[label.split("[")[0]], s=30, edgecolors=color, facecolors=face)
    return intensities


def _roofline_legend(ax, batches: list[int]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", lw=1.5, label="roof (calibrated)")]
    handles += [Line2D([], [], ls="", marker="s", color=c, label=name) for name, c in BACKEND_COLOR.items()]
    for kind in ("step", "sample", "fold", "prefill"):
        label = "prefill, decode" if kind == "prefill" else kind
        handles.append(Line2D([], [], ls="", marker=KIND_MARKER[kind], color="gray", mfc="none", label=label))
    handles += [
        Line2D([], [], ls="", marker="o", color="gray", mfc="gray" if b == FILLED else "none", label=f"batch {b}")
        for b in batches
    ]
    ax.legend(handles=handles, fontsize=8, loc="lower right", ncols=2)


def roofline(result: dict, calibration: dict, title: str):
    """``result``: the raw numbers of the roofline job; ``calibration``: those of the calibrate job."""
    figure = new_figure(13.0, 5.5)
    left, right = figure.subplots(1, 2, width_ratios=[1.1, 1])
    peak, memory = max(r[-1] for r in calibration["gemm_gflops"]), calibration["memory_gbs"]
    intensities = _stage_points(left, result)
    xs = np.logspace(np.log10(min(intensities) / 2), np.log10(max(intensities) * 2), 200)
    left.plot(xs, np.minimum(peak, memory * xs), color="black", lw=1.5)
    left.set_xscale("log")
    left.set_yscale("log")
    for axis in (left.xaxis, left.yaxis):
        _plain_log_ticks(axis)
    left.set_xlabel("arithmetic intensity, FLOP per byte read")
    left.set_ylabel("achieved GFLOP/s (stage FLOPs ÷ p50 time)")
    left.set_title(f"every stage under the roofs: {peak:.0f} GFLOP/s, {memory:.1f} GB/s", fontsize=10)
    left.grid(which="both", alpha=0.25)
    _roofline_legend(left, sorted(int(b) for b in result))
    for batch, entry in result.items():
        steps = {label: s for label, s in entry["stages"].items() if label.startswith("step")}
        x = np.arange(len(steps))
        floor_label = f"floor, batch {batch}"
        right.plot(
            x, [s["floor"]["ms"] for s in steps.values()], "k--" if int(batch) == FILLED else "k:", label=floor_label
        )
        for name, color in BACKEND_COLOR.items():
            right.plot(
                x,
                [s[name]["p50"] for s in steps.values()],
                marker=BACKEND_MARKER[name],
                color=color,
                markerfacecolor=color if int(batch) == FILLED else "none",
                lw=1,
                label=f"{name}, batch {batch}",
            )
        right.set_xticks(x, [label[5:-1] for label in steps])
    right.set_yscale("log")
    _plain_log_ticks(right.yaxis)
    right.set_xlabel("scale")
    right.set_ylabel("step time p50, ms")
    right.set_title("each step against its floor", fontsize=10)
    right.grid(which="both", alpha=0.25)
    right.legend(fontsize=8, loc="upper left", ncols=2)
    figure.suptitle(title, fontsize=11)
    return figure


def batch_scaling(result: dict, title: str):
    """``result``: the raw numbers of the batch job."""
    figure = new_figure(8.0, 5.0)
    ax = figure.subplots()
    entries = sorted(result.items(), key=lambda item: int(item[0]))
    batches = [int(b) for b, _ in entries]
    floor = [entry["floor_images_per_s"] for _, entry in entries]
    ax.plot(batches, floor, "k--", label="floor")
    for name, color in BACKEND_COLOR.items():
        rates = [entry[name] for _, entry in entries]
        ax.plot(batches, rates, marker=BACKEND_MARKER[name], color=color, label=name)
        for b, rate, top in zip(batches, rates, floor, strict=True):
            label = f"{top / rate:.1f}×"
            ax.annotate(
                label, (b, rate), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8, color=color
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("batch (images per generation)")
    ax.set_ylabel("images/s")
    ax.set_title(f"{title}\nlabels: time per image as a multiple of its floor", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=9)
    return figure


def quality_speed(result: dict, title: str):
    """``result``: the raw numbers of the pruning job: quality change against speed-up, one point per variant."""
    figure = new_figure(10.0, 4.5)
    left, right = figure.subplots(1, 2)
    speed, quality = result["speed"], result["quality"]
    dense = quality["dense"]
    for label in speed:
        x = speed[label]["speed_up"]
        points = (
            (left, 100 * (quality[label]["class_accuracy"] - dense["class_accuracy"])),
            (right, 100 * (quality[label]["frechet_distance"] / dense["frechet_distance"] - 1)),
        )
        color = "#3b6fb6" if label.startswith("prune") else ("#d1495b" if "int8" in label else "k")
        for ax, y in points:
            ax.plot([x], [y], marker="o", color=color)
            ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    for ax, bound, what in ((left, -1.0, "class accuracy change, points"), (right, 10.0, "Fréchet distance change, %")):
        ax.axhline(bound, color="grey", linestyle="--", linewidth=1)
        ax.axvline(1.4, color="#3b6fb6", linestyle=":", linewidth=1)
        ax.axvline(1.6, color="#d1495b", linestyle=":", linewidth=1)
        ax.set_xlabel("speed-up over the dense fp32 ort bundle (batch 1)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.25)
    figure.suptitle(
        f"{title}\nquality: default model (shipped classifier); speed: preset; dashed: the quality bound, "
        "dotted: the 1.4× / 1.6× targets",
        fontsize=9,
    )
    return figure


def serve_throughput(result: dict, title: str):
    """``result``: the raw numbers of the serve job (model → concurrency → numbers)."""
    figure = new_figure(8.0, 5.0)
    ax = figure.subplots()
    for name, levels in result.items():
        entries = sorted(levels.items(), key=lambda item: int(item[0]))
        concurrency = [int(c) for c, _ in entries]
        served = [m["images_per_s"] for _, m in entries]
        alone = [1000 / m["in_process_ms_per_image"] for _, m in entries]
        (line,) = ax.plot(concurrency, served, marker="o", label=f"{name}: Triton (ort instance)")
        ax.plot(concurrency, alone, "--", marker="x", color=line.get_color(), label=f"{name}: in-process, same batches")
        for c, rate, m in zip(concurrency, served, (m for _, m in entries), strict=True):
            ax.annotate(
                f"{m['overhead']:.2f}×", (c, rate), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(map(int, next(iter(result.values())))), [str(c) for c in next(iter(result.values()))])
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("concurrent clients (perf_analyzer, one image per request)")
    ax.set_ylabel("images/s")
    ax.set_title(f"{title}\nlabels: server time per image ÷ in-process time per image", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return figure
