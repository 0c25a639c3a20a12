"""The four figures of `charclip explode` (matplotlib, written as PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from charclip import runfolder
from charclip.explode.experiments import DIVERGENCE_FACTOR, MODES, RHOS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gradient_through_time(gtt: dict, backends, path: Path) -> Path:
    """One panel per input regime: ||dL/dh_{T-k}|| / ||dL/dh_T|| against k, measured and rho^k."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    titles = {
        "linear": "tiny inputs: tanh stays linear",
        "initialised": "inputs as initialised: tanh saturates",
    }
    for ax, (regime, curves) in zip(axes, gtt["regimes"].items()):
        for i, c in enumerate(curves.values()):
            n0 = c["norms"][backends[0]][0]
            k = np.arange(len(c["rho_k"]))
            ax.semilogy(
                k,
                np.array(c["norms"][backends[0]]) / n0,
                color=f"C{i}",
                lw=1.8,
                label=f"rho = {c['rho']:g} ({backends[0]})",
            )
            if len(backends) > 1:
                ax.semilogy(
                    k[::5],
                    np.array(c["norms"][backends[1]])[::5] / n0,
                    "o",
                    color=f"C{i}",
                    ms=4,
                    mfc="none",
                    label=f"rho = {c['rho']:g} ({backends[1]})",
                )
            ax.semilogy(k, np.array(c["rho_k"]) / n0, ":", color=f"C{i}", lw=1)
        ax.set_title(titles[regime])
        ax.set_xlabel("k (steps back from the loss)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("||dL/dh_{T-k}|| / ||dL/dh_T||   (dotted: rho^k)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_bounds(gtt: dict, backends, path: Path) -> Path:
    """For every rho and regime: the measured norm against rho^k and the two Jacobian bounds."""
    plt = _plt()
    regimes = gtt["regimes"]
    fig, axes = plt.subplots(
        len(regimes), len(RHOS), figsize=(3 * len(RHOS), 3 * len(regimes)), sharex=True
    )
    for row, (regime, curves) in zip(axes, regimes.items()):
        for ax, c in zip(row, curves.values()):
            k = np.arange(len(c["rho_k"]))
            ax.semilogy(k, c["norm_bound"], color="C3", lw=1, label="prod max(1-h²) ||W_hh||₂")
            ax.semilogy(
                k, c["jacobian_product"], color="C1", lw=1.5, label="prod ||diag(1-h²) W_hh||₂"
            )
            ax.semilogy(k, c["rho_k"], ":", color="k", lw=1, label="rho^k")
            ax.semilogy(k, c["norms"][backends[0]], color="C0", lw=2, label="measured")
            ax.set_title(f"{regime}, rho = {c['rho']:g}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("k")
    for ax in axes[:, 0]:
        ax.set_ylabel("||dL/dh_{T-k}||")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def run_label(r: dict) -> str:
    if r["mode"] == "norm":
        return f"norm clip tau={r['tau']:g} ({r['clipped_fraction']:.0%} clipped)"
    return f"value clip v={r['v']:g}" if r["mode"] == "value" else "no clipping"


def plot_training(results: dict, path: Path) -> Path:
    """Loss and pre-clip gradient norm per step; a column per backend, a colour per clipping mode."""
    plt = _plt()
    backends = results["backends"]
    fig, axes = plt.subplots(
        3, len(backends), figsize=(6.5 * len(backends), 9.5), sharex=True, squeeze=False
    )
    for col, b in enumerate(backends):
        for i, mode in enumerate(MODES):
            r = next(r for r in results["training"] if r["backend"] == b and r["mode"] == mode)
            steps = np.arange(1, len(r["loss"]) + 1)
            loss = np.array(r["loss"], dtype=float)
            axes[0, col].plot(steps, loss, color=f"C{i}", lw=0.9, label=run_label(r))
            if r["first_nonfinite_step"]:
                axes[0, col].axvline(
                    r["first_nonfinite_step"],
                    color=f"C{i}",
                    ls="--",
                    lw=1,
                    label=f"{mode}: loss not finite from step {r['first_nonfinite_step']}",
                )
            axes[1, col].semilogy(
                steps, np.array(r["grad_norm"], dtype=float), color=f"C{i}", lw=0.7
            )
            axes[2, col].semilogy(
                steps, np.array(r["spectral_radius"], dtype=float), color=f"C{i}", lw=1
            )
        s = results["settings"]
        axes[0, col].axhline(
            DIVERGENCE_FACTOR * results["training"][0]["first_loss"],
            color="k",
            ls=":",
            lw=1,
            label=f"{DIVERGENCE_FACTOR:g} x first loss (divergence)",
        )
        axes[0, col].axhline(
            results["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy"
        )
        axes[0, col].set_title(f"{b}: rho = {s['rho']:g}, SGD lr = {s['sgd_lr']:g}")
        axes[0, col].set_ylabel("training loss (nats/char)")
        axes[0, col].legend(fontsize=7)
        axes[1, col].axhline(
            s["max_norm"], color="C2", ls="--", lw=1, label=f"tau = {s['max_norm']:g}"
        )
        axes[1, col].set_ylabel("gradient norm before clipping")
        axes[1, col].legend(fontsize=7)
        axes[2, col].axhline(1.0, color="k", ls=":", lw=1)
        axes[2, col].set_ylabel("spectral radius of W_hh")
        axes[2, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(results: dict, path: Path) -> Path:
    """Final validation loss against tau; diverged runs drawn at the top as crosses."""
    plt = _plt()
    sweep = results["sweep"]
    taus = np.array(sorted({r["tau"] for r in sweep}))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in sweep if not r["diverged"]]
    bad = [r for r in sweep if r["diverged"]]
    ax.semilogx(
        [r["tau"] for r in ok],
        [r["val_loss"] for r in ok],
        "o",
        color="C0",
        label="converged or slow",
    )
    finite = [r["val_loss"] for r in sweep if math.isfinite(r["val_loss"])]
    top = max(finite + [results["unigram_entropy"]]) * 1.05
    ax.semilogx(
        [r["tau"] for r in bad],
        [min(r["val_loss"], top) if math.isfinite(r["val_loss"]) else top for r in bad],
        "x",
        color="C3",
        ms=9,
        mew=2,
        label="diverged (NaN drawn at the top)",
    )
    med = [
        np.median(
            [r["val_loss"] if math.isfinite(r["val_loss"]) else top for r in sweep if r["tau"] == t]
        )
        for t in taus
    ]
    ax.semilogx(taus, med, "-", color="C0", lw=1, alpha=0.6, label="median over seeds")
    ax.axhline(results["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy")
    ax.set_xlabel("norm-clipping threshold tau")
    ax.set_ylabel(f"validation loss after {results['settings']['steps']} steps")
    ax.set_title(
        f"{results['sweep_backend']}: rho = {results['settings']['rho']:g}, SGD lr = {results['settings']['sgd_lr']:g}"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
