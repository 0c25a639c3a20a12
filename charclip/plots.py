"""Figures of a training run: loss (train and validation) and the pre-clip gradient norm."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training(metrics_path, out_png, threshold: float | None) -> Path:
    """Draw the run's figure into `out_png`, replacing it atomically (never written through a link).

    Matplotlib's warnings about degenerate data (one step, a constant norm) stay off the console:
    the figure is still written, and the run's own messages are the ones the user needs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _plot_training(metrics_path, out_png, threshold)


def _plot_training(metrics_path, out_png, threshold: float | None) -> Path:
    from charclip.metrics import describe_clipped, read_records
    from charclip.runfolder import save_figure

    rows = [r for r in read_records(Path(metrics_path)) if _numbers(r, "loss", "grad_norm")]
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows], dtype=float)
    norm = np.array([r["grad_norm"] for r in rows], dtype=float)
    clipped = np.array([r.get("clipped") is True for r in rows], dtype=bool)
    val = [
        (r["step"], r["val_loss"])
        for r in read_records(Path(metrics_path))
        if _numbers(r, "val_loss")
    ]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    ax1.plot(steps, loss, lw=0.6, alpha=0.5, label="training loss (per batch)")
    if len(loss) >= 20:
        k = max(len(loss) // 50, 5)
        ax1.plot(
            steps[k - 1 :],
            np.convolve(loss, np.ones(k) / k, mode="valid"),
            lw=1.5,
            label=f"training loss ({k}-step mean)",
        )
    if val:
        ax1.plot(*zip(*val), "o-", label="validation loss")
    ax1.set_ylabel("cross-entropy (nats/char)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.semilogy(steps, norm, lw=0.7, label="gradient norm before clipping")
    if clipped.any():
        ax2.plot(
            steps[clipped],
            norm[clipped],
            ".",
            ms=3,
            color="C3",
            label=describe_clipped(int(clipped.sum()), len(clipped)),
        )
    if threshold is not None:
        ax2.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold tau = {threshold:g}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("global L2 norm")
    ax2.legend()
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, Path(out_png), dpi=110)
    plt.close(fig)
    return Path(out_png)


def _numbers(record: dict, *keys: str) -> bool:
    return all(
        isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
        for k in keys
    )
