"""report.md, results.json and the console summary of `charclip explode`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from charclip import runfolder
from charclip.explode.figures import (
    plot_bounds,
    plot_gradient_through_time,
    plot_sweep,
    plot_training,
    run_label,
)
from charclip.metrics import json_safe


def _fmt(x) -> str:
    return "NaN" if x is None or not math.isfinite(x) else f"{x:.3f}"


def write_report(results: dict, out: Path) -> Path:
    """results.json, four figures and report.md in `out`."""
    backends = results["backends"]
    gtt = results["gradient_through_time"]
    runfolder.write_file(
        out / "results.json", json.dumps(json_safe(results), separators=(",", ":"))
    )
    figs = {
        "gtt": plot_gradient_through_time(gtt, backends, out / "gradient-through-time.png").name,
        "bounds": plot_bounds(gtt, backends, out / "jacobian-bounds.png").name,
        "train": plot_training(results, out / "training.png").name,
        "sweep": plot_sweep(results, out / "threshold-sweep.png").name,
    }
    s = results["settings"]
    T = gtt["seq_len"]
    lines = [
        "# Exploding gradients and their cure",
        "",
        f"`charclip explode{' --quick' if results['quick'] else ''}`, backends: {', '.join(backends)}; "
        f"{results['seconds']:.0f} s. Vanilla RNN (tanh), 1 x {s['hidden']} hidden, embedding {s['embed']}, "
        f"vocabulary {results['vocab_size']}, float64. Explained in docs/exploding-gradients.md.",
        "",
        "## 1. Gradient through time",
        "",
        f"Loss at the last of T = {T} steps, {gtt['batch']} sequences; norm of dL/dh_(T-k) for k = 0..T. "
        f"'linear': embeddings x {gtt['linear_input_scale']:g}, no biases; 'initialised': the weights as drawn.",
        "",
        f"![gradient through time]({figs['gtt']})",
        "",
        f"![bounds]({figs['bounds']})",
        "",
        "| rho | ‖W_hh‖₂ | growth/step, linear | ‖dL/dh_0‖/‖dL/dh_T‖, linear | growth/step, initialised | "
        "‖dL/dh_0‖/‖dL/dh_T‖, initialised | min tanh', initialised |",
        "|---|---|---|---|---|---|---|",
    ]
    lin, ini = gtt["regimes"]["linear"], gtt["regimes"]["initialised"]
    for key in lin:
        a, b = lin[key], ini[key]
        na, nb = a["norms"][backends[0]], b["norms"][backends[0]]
        lines.append(
            f"| {a['rho']:g} | {a['w_hh_norm2']:.2f} | {a['growth_per_step']:.3f} | {na[-1] / na[0]:.3g} | "
            f"{b['growth_per_step']:.3f} | {nb[-1] / nb[0]:.3g} | {b['min_tanh_derivative']:.2g} |"
        )
    if gtt["max_rel_diff_torch_jax"] is not None:
        lines += [
            "",
            f"torch and JAX: largest relative difference over all curves and k: "
            f"{gtt['max_rel_diff_torch_jax']:.1e}.",
        ]
    lines += [
        "",
        "## 2. Training from an unstable start",
        "",
        f"W_hh at spectral radius {s['rho']:g}; plain SGD with learning rate {s['sgd_lr']:g} (Adam with beta1 = 0 and "
        f"eps = {results['sgd_eps']:g}, lr = {s['sgd_lr']:g} x eps, whose step differs from SGD's by at most "
        f"{results['sgd_deviation_bound']:.1e} relative in every run here); {s['steps']} steps of batch {s['batch_size']} x "
        f"{s['seq_len']} on the first {s['corpus_chars']:,} characters of the embedded corpus; seed {s['seed']}. "
        f"Diverged: a non-finite loss or one over {results['divergence_factor']:g} x the first. Converged: not "
        f"diverged and a validation loss under the unigram entropy ({results['unigram_entropy']:.3f} nats/char).",
        "",
        f"![training]({figs['train']})",
        "",
        "| backend | clipping | first loss | max loss | final loss | validation loss | steps clipped | max grad norm "
        "| max spectral radius of W_hh | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["training"]:
        clipped = f"{r['clipped_fraction']:.0%}" if r["mode"] == "norm" else "-"
        verdict_text = (
            "diverged" if r["diverged"] else "converged" if r["converged"] else "did not converge"
        )
        what = (
            f"norm, tau = {r['tau']:g}"
            if r["mode"] == "norm"
            else f"value, v = {r['v']:g}"
            if r["mode"] == "value"
            else "none"
        )
        lines.append(
            f"| {r['backend']} | {what} | {_fmt(r['first_loss'])} | {_fmt(r['max_loss'])} | {_fmt(r['final_loss'])} | "
            f"{_fmt(r['val_loss'])} | {clipped} | {r['max_grad_norm']:.3g} | {np.nanmax(r['spectral_radius']):.3g} | {verdict_text} |"
        )
    if results["training_agreement"]:
        lines += [
            "",
            "Steps over which the torch and JAX losses agree to 1e-9: "
            + ", ".join(
                f"{m}: {a['steps_equal']}/{a['steps']}"
                for m, a in results["training_agreement"].items()
            )
            + " (after a spike, rounding differences grow chaotically).",
        ]
    lines += [
        "",
        f"## 3. Threshold sweep ({results['sweep_backend']})",
        "",
        f"Norm clipping at each tau, seeds {', '.join(map(str, s['sweep_seeds']))}, otherwise as above.",
        "",
        f"![threshold sweep]({figs['sweep']})",
        "",
        "| tau | validation loss per seed | diverged | steps clipped |",
        "|---|---|---|---|",
    ]
    for tau in sorted({r["tau"] for r in results["sweep"]}):
        rs = [r for r in results["sweep"] if r["tau"] == tau]
        vals = ", ".join(_fmt(r["val_loss"]) for r in rs)
        fractions = ", ".join(f"{r['clipped_fraction']:.0%}" for r in rs)
        lines.append(
            f"| {tau:g} | {vals} | {sum(r['diverged'] for r in rs)}/{len(rs)} | {fractions} |"
        )
    path = out / "report.md"
    runfolder.write_file(path, "\n".join(lines) + "\n")
    return path


def _sweep_medians(sweep: list[dict]) -> dict[float, float]:
    """Median validation loss over seeds per tau; a NaN counts as the worst."""
    return {
        t: float(
            np.median(
                [
                    r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf
                    for r in sweep
                    if r["tau"] == t
                ]
            )
        )
        for t in sorted({r["tau"] for r in sweep})
    }


def summary(results: dict, out: Path) -> str:
    gtt = results["gradient_through_time"]
    b0 = results["backends"][0]
    lin = gtt["regimes"]["linear"]
    lines = [
        f"gradient through time (T = {gtt['seq_len']}, tiny inputs): ‖dL/dh_0‖/‖dL/dh_T‖ = "
        + ", ".join(
            f"{c['norms'][b0][-1] / c['norms'][b0][0]:.2g} at rho {c['rho']:g}"
            for c in lin.values()
        )
    ]
    if gtt["max_rel_diff_torch_jax"] is not None:
        lines.append(f"torch and JAX agree to {gtt['max_rel_diff_torch_jax']:.1e} (relative)")
    for r in results["training"]:
        state = (
            "diverged" if r["diverged"] else "converged" if r["converged"] else "did not converge"
        )
        lines.append(
            f"{r['backend']:5s} {run_label(r):40s} max loss {_fmt(r['max_loss'])}, validation {_fmt(r['val_loss'])}: {state}"
        )
    medians = _sweep_medians(results["sweep"])
    best = min(medians, key=medians.get)
    bad = (
        ", ".join(f"{t:g}" for t in sorted({r["tau"] for r in results["sweep"] if r["diverged"]}))
        or "none"
    )
    lines.append(
        f"threshold sweep: best median validation loss {medians[best]:.3f} at tau = {best:g}; diverged at tau = {bad}"
    )
    lines.append(f"report: {out / 'report.md'}")
    return "\n".join(lines)
