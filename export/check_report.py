"""The result of ``imagefolder-export check``: one row per graph, scale and output, plus operators.

Shared by the ONNX Runtime check (against PyTorch) and the TensorRT check (against ONNX Runtime);
no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imagefolder.export.opcheck import OperatorReport


@dataclass
class CheckReport:
    rows: list[dict] = field(default_factory=list)  # graph, scale, output, metric, value, tolerance, ok
    operators: dict[str, OperatorReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows) and all(op.ok for op in self.operators.values())

    def table(self) -> str:
        lines = [f"{'graph':<11} {'scale':>5}  {'output':<12} {'metric':<9} {'value':>10} {'tolerance':>10}  ok"]
        for r in self.rows:
            lines.append(f"{r['graph']:<11} {r['scale']:>5}  {r['output']:<12} {r['metric']:<9} "
                         f"{r['value']:>10.3e} {r['tolerance']:>10.0e}  {'yes' if r['ok'] else 'NO'}")
        lines.append("")
        lines.append("TensorRT 10.3 ONNX operator support:")
        for name, report in self.operators.items():
            lines.append(f"  {name:<11} " + report.summary().replace("\n", "\n" + " " * 14))
        return "\n".join(lines)
