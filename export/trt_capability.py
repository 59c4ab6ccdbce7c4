"""Operator support asked of TensorRT's own ONNX parser, through polygraphy's ``inspect capability``.

On the target, the parser of the TensorRT that builds the engines is the authority on what it
parses: ``parser_report`` runs the function behind ``polygraphy inspect capability`` on a graph and
lists every node the parser rejects, with its reason. ``operator_reports`` asks that parser where
TensorRT is installed and falls back to ``export.opcheck``'s static listing of TensorRT 10.3's
operator matrix elsewhere (a workstation exporting for a Jetson). The export's manifest keeps the
static report: it certifies the graphs for JetPack's TensorRT 10.3, whatever TensorRT the exporting
machine has. No torch; tensorrt and polygraphy are imported only by ``parser_report``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from imagefolder.core import gpu_stack
from imagefolder.core.compare import OperatorSummary
from imagefolder.core.engines import TensorRTUnavailable, import_tensorrt
from imagefolder.core.polygraphy_log import following_our_logging
from imagefolder.export.opcheck import operator_reports as static_reports


@dataclass
class ParserReport:
    """What one TensorRT version's ONNX parser said of a graph: each rejected node, with the reason."""

    tensorrt_version: str
    rejected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def summary(self) -> str:
        status = "ok" if self.ok else f"{len(self.rejected)} nodes NOT SUPPORTED"
        return "\n".join([f"TensorRT {self.tensorrt_version}'s parser: {status}", *(f"  {r}" for r in self.rejected)])


def parser_report(path: str | os.PathLike) -> ParserReport:
    """Parse an ONNX file with this machine's TensorRT (``polygraphy inspect capability``) and report rejections."""
    trt = import_tensorrt()
    gpu_stack.require("polygraphy", "polygraphy", "(it asks TensorRT's parser about operator support)")
    from polygraphy.tools.inspect.subtool.capability import parse

    with following_our_logging():
        supported, trt_parser = parse(os.fspath(path))
    rejected = []
    for i in range(trt_parser.num_errors):
        trt_error = trt_parser.get_error(i)
        node = trt_error.node_name() or f"#{trt_error.node()}"
        rejected.append(f"{trt_error.node_operator() or '?'} node {node}: {trt_error.desc()}")
    if not supported and not rejected:
        rejected.append("the parser failed without naming a node (see TensorRT's log with -vv)")
    return ParserReport(str(trt.__version__), rejected)


def operator_reports(bundle) -> dict[str, OperatorSummary]:
    """Every graph's operator support: TensorRT's parser where TensorRT imports, the static listing elsewhere."""
    if bundle.provider != "any":  # not a TensorRT bundle: its operators are listed for its own provider
        return dict(static_reports(bundle))
    try:
        import_tensorrt()
    except TensorRTUnavailable:
        gpu_stack.require("onnx", "onnx", "(without TensorRT, the operator listing reads the graphs with it)")
        return dict(static_reports(bundle))
    return {name: parser_report(bundle.graph_path(name)) for name in bundle.specs}
