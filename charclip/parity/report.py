"""The parity report: its data, the table printed, and the drift plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from charclip import runfolder
from charclip.parity.tolerances import Row, tolerances_for

if TYPE_CHECKING:
    from charclip.parity.ladder import Trajectory


@dataclass
class Report:
    config: dict
    rows: list[Row]
    trajectory: Trajectory | None
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "ok": self.ok,
            "notes": self.notes,
            "rows": [asdict(r) for r in self.rows],
            "trajectory": asdict(self.trajectory) if self.trajectory else None,
        }


def format_table(rows: list[Row]) -> str:
    def num(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.2e}"

    width = max(len(r.quantity) for r in rows)
    lines = [
        f"{'quantity':<{width}}  {'max abs err':>11}  {'max rel err':>11}  {'tolerance':>9}  verdict",
        "-" * (width + 50),
    ]
    for r in rows:
        lines.append(
            f"{r.quantity:<{width}}  {num(r.max_abs):>11}  {num(r.max_rel):>11}  {r.tol:>9.0e}  "
            f"{'ok' if r.ok else 'DIFFERS'}"
        )
    return "\n".join(lines)


def plot_drift(reports: list[Report], out_png) -> Path:
    """Per-step parameter and loss drift between the backends (log scale), one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for i, rep in enumerate(reports):
        tr, c = rep.trajectory, rep.config
        label = f"{c['cell']} {c['layers']}x{c['hidden']} {c['dtype']}"
        steps = np.arange(1, tr.steps + 1)
        floor = np.finfo(c["dtype"]).eps / 10  # exact agreement (0) is drawn here, at the bottom
        ax1.semilogy(
            steps, np.maximum(tr.param_drift_rel, floor), color=f"C{i}", lw=1.2, label=label
        )
        clipped = np.array(tr.clipped["torch"])
        ax1.plot(
            steps[clipped],
            np.maximum(np.array(tr.param_drift_rel)[clipped], floor),
            ".",
            color=f"C{i}",
            ms=5,
        )
        ax2.semilogy(
            steps, np.maximum(tr.loss_drift_rel, floor), color=f"C{i}", lw=1.2, label=label
        )
        tol = tolerances_for(c["dtype"], c.get("precision", "full"), c["cell"])["trajectory"].rel
        ax1.axhline(tol, color=f"C{i}", ls="--", lw=0.8)
    ax1.set_ylabel("params: max|torch - jax| / max|p|")
    ax1.set_title("torch vs JAX drift per training step (dots: clipped steps; dashed: tolerance)")
    ax1.legend()
    ax1.grid(alpha=0.3, which="both")
    ax2.set_ylabel("loss: relative difference")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    runfolder.save_figure(fig, out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
