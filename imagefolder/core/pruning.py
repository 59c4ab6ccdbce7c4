"""Scale-wise token pruning (``imagefolder-export onnx --prune 8:0.5,9:0.6``): the spec and what it implies.

Training-free, after FastVAR (cached token pruning): at the large scales most positions change little from the
upsampled previous scale, so a pruned scale runs the trunk on a fixed share of its positions only and
restores the rest from the previous scale's output. What this module fixes, for export and every runtime
(no torch):

- **The spec**: scale → the share of its positions kept, in (0, 1]. Scale 0 (the start token) cannot be
  pruned; the kept count is ``kept_count`` (at least 1), a constant of the scale's graph, so every shape
  stays static per scale (TensorRT profiles, one CUDA graph per generation).
- **Which graphs**: a pruned scale ``si`` runs its own step graph, ``ar_step_s{si}``, which needs the trunk
  output of scale ``si − 1``; that scale therefore runs a graph of its own too (pruned, or dense with
  that output added). Every other scale runs the shared ``ar_step``. Weights are stored once
  (``weights.bin``), but each graph is a session (ONNX Runtime) or an engine (TensorRT) of its own, which
  holds its own copy of the trunk in memory.
- **The score** (computed inside the graph, ``imagefolder.models.pruning``): per position, the squared
  norm of the change between this scale's folded input ``x`` and that input seen at the previous scale's
  resolution, ``‖x − U·D·x‖²`` (D: area down to the previous grid, U: bicubic back up). It is high where
  this scale adds detail the previous one could not hold. Positions are ranked by the score quantized to
  ``2^24 / q`` levels of its maximum, ties broken by raster order, so that implementations whose
  floating-point sums differ in the last bits still keep the same positions.
- **What a pruned position gets**: its trunk output, and its keys and values in the cache for later scales,
  are the previous scale's (trunk output; cache entries of every layer) upsampled bicubically to this
  scale's grid. Later scales thus attend to a full, spatially complete scale, as in the dense model, rather
  than to a scale with holes (masking pruned entries out would shift their attention mass to the kept
  positions and needs a mask input on every later step); and the estimate is the one the pruning assumed
  already: these positions change little from the previous scale.
"""

from __future__ import annotations

from imagefolder.errors import InputError

SCORE = "squared norm of x − up(down(x)) over the folded channels, x the scale's folded input"
RESTORE = "previous scale's trunk output and cache entries, upsampled bicubically"
RANK_RANGE = 2**24  # float32 holds every integer below it exactly: level · q + tie-break stays exact


def parse_prune(text: str, scales: tuple[int, ...] | list[int]) -> dict[int, float]:
    """``"8:0.5,9:0.6"`` → ``{8: 0.5, 9: 0.6}``, checked against the model's ``scales``.

    Raises:
        InputError: malformed, a scale that does not exist or repeats, scale 0, or a ratio outside (0, 1].
    """
    prune: dict[int, float] = {}
    for item in (part.strip() for part in text.split(",")):
        scale_text, sep, ratio_text = item.partition(":")
        try:
            si, ratio = int(scale_text), float(ratio_text)
        except ValueError:
            si, ratio = -1, float("nan")
        if not sep or ratio != ratio:  # NaN: not a number
            raise InputError(f"--prune {text!r}: {item!r} is not SCALE:RATIO (e.g. 8:0.5,9:0.6)")
        if si in prune:
            raise InputError(f"--prune {text!r}: scale {si} is named twice")
        prune[si] = ratio
    check_prune(prune, scales)
    return dict(sorted(prune.items()))


def check_prune(prune: dict[int, float], scales: tuple[int, ...] | list[int]) -> None:
    """Refuse a spec naming a scale the model lacks, scale 0, or a ratio outside (0, 1] (``InputError``)."""
    for si, ratio in prune.items():
        if not 0 <= si < len(scales):
            raise InputError(f"--prune: scale {si} does not exist (the model has scales 0..{len(scales) - 1})")
        if si == 0:
            raise InputError("--prune: scale 0 (the start token, one position) cannot be pruned; prune scales ≥ 1")
        if not 0 < ratio <= 1:
            raise InputError(f"--prune: scale {si} keeps {ratio:g} of its positions; the share must be in (0, 1]")


def kept_count(ratio: float, positions: int) -> int:
    """Positions a scale of ``positions`` keeps at ``ratio``: rounded, at least one."""
    return min(positions, max(1, round(ratio * positions)))


def scale_graph_name(scale_index: int) -> str:
    return f"ar_step_s{scale_index}"


def scale_graphs(prune: dict[int, float]) -> dict[int, float | None]:
    """Scales that run a step graph of their own → their keep ratio (None: dense, with its trunk output)."""
    out: dict[int, float | None] = {si - 1: None for si in prune if si - 1 not in prune}
    out.update(prune)
    return dict(sorted(out.items()))


def spec_text(prune: dict[int, float]) -> str:
    """The spec as the command line writes it."""
    return ",".join(f"{si}:{ratio:g}" for si, ratio in sorted(prune.items()))


def manifest_record(prune: dict[int, float], scales: tuple[int, ...] | list[int]) -> dict:
    """The manifest's ``prune`` field: the spec, and per scale the share and count of positions kept."""
    return {
        "spec": spec_text(prune),
        "scales": {
            str(si): {"ratio": ratio, "kept": kept_count(ratio, scales[si] ** 2), "positions": scales[si] ** 2}
            for si, ratio in sorted(prune.items())
        },
        "score": SCORE,
        "restore": RESTORE,
    }


def describe(manifest: dict) -> str:
    """One line for ``imagefolder profile`` and ``imagefolder-export check``: what a pruned bundle prunes."""
    record = manifest.get("prune")
    if not record:
        return "dense: every scale runs the trunk on all its positions"
    scales = ", ".join(
        f"scale {si} keeps {entry['kept']} of {entry['positions']}" for si, entry in record["scales"].items()
    )
    return f"pruned --prune {record['spec']}: {scales} (score: {record['score']}; the rest: {record['restore']})"


def from_manifest(manifest: dict) -> dict[int, float]:
    """The spec a manifest records ({} for a dense bundle)."""
    record = manifest.get("prune") or {}
    return {int(si): float(entry["ratio"]) for si, entry in record.get("scales", {}).items()}
