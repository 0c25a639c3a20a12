"""Figures, report.md and results.json of `charclip explode --paper` (charclip.explode.paper)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from charclip import runfolder
from charclip.explode.figures import _plt
from charclip.metrics import json_safe

# What the paper's text states about Fig. 7 and the mixed-length run (section 4.1.1). Fig. 7's
# per-length points are an image in the text sources reachable here, so they are not redrawn.
PAPER_STATEMENTS = (
    "Fig. 7 (section 4.1.1): success rate out of 5 seeds, 50 hidden units, lr 0.01, threshold 1, minibatch 20, "
    "up to 5M updates; 'as the length of the sequence increases, using clipping becomes more important'.",
    "Section 4.1.1: one 50-unit 'basic tanh' model trained with MSGD-CR on lengths drawn from 50..200 succeeded "
    "in 5 of 5 seeds.",
)


def plot_cliff(results: dict, path: Path) -> Path:
    """Fig. 6's layout: the error surface in 3-D with the unclipped paths solid and the rescaled ones dashed;
    beside it, the same from above, with the fold curves and the basin boundary of the bifurcation view."""
    plt = _plt()
    c, bif = results["cliff"], results["bifurcation"]
    W, B = np.meshgrid(c["w"], c["b"])
    fig = plt.figure(figsize=(13, 5.5))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    ax.plot_surface(W, B, c["error"], cmap="viridis", alpha=0.55, linewidth=0, rstride=2, cstride=2)
    ax2 = fig.add_subplot(1, 2, 2)
    im = ax2.pcolormesh(W, B, c["error"], cmap="viridis", shading="auto")
    fig.colorbar(im, ax=ax2, label="error E_50")
    for i, p in enumerate(c["paths"]):
        r = p["backends"][c["backend"]]
        for key, style in (("plain", "-"), ("clipped", "--")):
            pts, err = r[key], r[f"{key}_error"]
            label = f"start {p['start']}: " + (
                "plain GD" if key == "plain" else f"rescaled, tau = {r['threshold']:.3g}"
            )
            ax.plot(pts[:, 0], pts[:, 1], err, style, color=f"C{i + 1}", lw=2, marker=".", ms=3)
            ax2.plot(
                pts[:, 0],
                pts[:, 1],
                style,
                color=f"C{i + 1}",
                lw=1.8,
                marker=".",
                ms=3,
                label=label,
            )
    ax2.plot(
        bif["fold_w"],
        bif["fold_b"],
        color="w",
        lw=1.2,
        label="fold bifurcations (two attractors inside)",
    )
    ax2.plot(
        bif["boundary_w"],
        bif["boundary_b"],
        "--",
        color="m",
        lw=2.5,
        dashes=(2, 2),
        label="x_0 on the basin boundary",
    )
    ax2.set_xlim(c["w"][0], c["w"][-1])
    ax2.set_ylim(c["b"][0], c["b"][-1])
    ax.set_xlabel("w")
    ax.set_ylabel("b")
    ax.set_zlabel("E_50")
    ax.view_init(elev=35, azim=-120)
    ax.set_title(
        f"x_t = w sigmoid(x_(t-1)) + b, x_0 = {c['x0']:g}, E = (sigmoid(x_{c['steps']}) - {c['target']:g})^2"
    )
    ax2.set_xlabel("w")
    ax2.set_ylabel("b")
    ax2.set_title(f"from above; gradient descent with lr = {c['lr']:g}")
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_bifurcation(results: dict, path: Path) -> Path:
    """Fig. 3's layout: b on the x-axis, the fixed points of x -> 5 sigmoid(x) + b on the y-axis;
    attractors solid, the unstable point (the boundary between their basins) dashed."""
    plt = _plt()
    bif = results["bifurcation"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for pts, style, label in (
        (bif["stable"], "k.", "attractor"),
        (bif["unstable"], "r.", "unstable (basin boundary)"),
    ):
        a = np.asarray(pts)
        if len(a):
            ax.plot(a[:, 0], a[:, 1], style, ms=2, label=label)
    ax.set_xlabel("b")
    ax.set_ylabel("fixed point x*")
    ax.set_title(
        f"fixed points of x -> {bif['w_fig3']:g} sigmoid(x) + b (the paper's Fig. 3 model)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_temporal_order(results: dict, path: Path) -> Path:
    """Success rate against sequence length, MSGD and MSGD-C, one panel per learning rate, 95% intervals;
    the paper's setting and its text's statements printed beside."""
    plt = _plt()
    t, s = results["temporal_order"], results["settings"]
    lrs = sorted({r["lr"] for r in t["table"]})
    fig, axes = plt.subplots(1, len(lrs) + 1, figsize=(4.5 * (len(lrs) + 1), 4.2), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for clip, color, name in ((False, "C3", "MSGD"), (True, "C0", "MSGD-C")):
            rows = [r for r in t["table"] if r["lr"] == lr and r["clip"] == clip]
            L = np.array([r["length"] for r in rows]) + (0.3 if clip else -0.3)
            rate = np.array([r["rate"] for r in rows])
            lo = rate - np.array([r["ci95"][0] for r in rows])
            hi = np.array([r["ci95"][1] for r in rows]) - rate
            ax.errorbar(
                L,
                rate,
                yerr=[lo, hi],
                fmt="o-",
                color=color,
                capsize=3,
                label=f"{name} (this rerun)",
            )
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(f"success rate ({len(s['seeds'])} seeds, 95% Wilson)")
        ax.set_title(f"{s['init']}, lr = {lr:g}, <= {s['max_updates']} updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    note = axes[0, -1]
    note.axis("off")
    note.text(
        0,
        1,
        "The paper (Fig. 7, section 4.1.1):\n\n"
        + "\n\n".join(_wrap(x, 52) for x in PAPER_STATEMENTS),
        va="top",
        fontsize=8,
    )
    fig.tight_layout()
    runfolder.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def write_paper_report(results: dict, out: Path) -> Path:
    """results.json, cliff.png, bifurcation.png, temporal-order.png and report.md in `out`."""
    s = results["settings"]
    results = {**results, "settings": asdict(s)}
    c, t = results["cliff"], results["temporal_order"]
    runfolder.write_file(
        out / "results.json", json.dumps(json_safe(results), separators=(",", ":"))
    )
    figs = [
        plot_cliff(results, out / "cliff.png").name,
        plot_bifurcation(results, out / "bifurcation.png").name,
        plot_temporal_order(results, out / "temporal-order.png").name,
    ]
    st = results["settings"]
    lines = [
        "# Pascanu, Mikolov and Bengio (2013), rerun",
        "",
        f"`charclip explode --paper{'' if results.get('full', True) else ' --quick'}`, backends: "
        f"{', '.join(results['backends'])}; {results['seconds']:.0f} s on {results['machine']}. "
        "Explained in docs/paper-rerun.md.",
        "",
        "## 1. The cliff (section 2.3, Fig. 6) and the bifurcation view (section 2.2, Fig. 3)",
        "",
        f"x_t = w sigmoid(x_(t-1)) + b, x_0 = {c['x0']:g}, E = (sigmoid(x_{c['steps']}) - {c['target']:g})^2, "
        f"a {st['grid']} x {st['grid']} grid over w in {tuple(st['w_range'])}, b in {tuple(st['b_range'])}; "
        f"gradient descent with lr = {c['lr']:g} for {st['path_updates']} updates from each start, unclipped and "
        "rescaled to the threshold tau = the mean gradient norm of the unclipped run (section 3.2's heuristic).",
        "",
        f"![cliff]({figs[0]})",
        "",
        f"![bifurcation]({figs[1]})",
        "",
        "| start (w, b) | tau | longest step, plain | longest step, rescaled (lr x tau) | final E, plain | "
        "final E, rescaled |",
        "|---|---|---|---|---|---|",
    ]
    for p in c["paths"]:
        r = p["backends"][c["backend"]]
        lines.append(
            f"| {tuple(p['start'])} | {r['threshold']:.3g} | {r['plain_longest_step']:.3g} | "
            f"{r['clipped_longest_step']:.3g} ({c['lr'] * r['threshold']:.3g}) | {r['plain_error'][-1]:.3g} | "
            f"{r['clipped_error'][-1]:.3g} |"
        )
    if c["agreement"]:
        lines += [
            "",
            f"torch and JAX: surface and gradients agree to {c['agreement']['surface_rel']:.1e} (relative); "
            f"the paths to {c['agreement']['paths_abs']:.1e} (absolute; a step at the wall multiplies "
            "rounding differences by the wall's gradient).",
        ]
    lines += [
        "",
        "## 2. The temporal-order task (section 4.1.1, Fig. 7)",
        "",
        f"'{st['init']}' initialisation, {st['hidden']} hidden units, minibatch {st['batch']}, threshold "
        f"{st['threshold']:g} for MSGD-C; success: under {st['success_error']:.0%} wrong on {st['test_size']} fresh "
        f"sequences, checked every {st['check_every']} updates, at most {st['max_updates']} updates; seeds "
        f"{', '.join(map(str, st['seeds']))}; run in {t['backend']}. Diverged: a loss not finite or over 3x the "
        "first.",
        "",
        f"![temporal order]({figs[2]})",
        "",
        "| length | lr | method | solved | rate [95% CI] | diverged | median updates to solve |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in t["table"]:
        med = "-" if r["median_updates"] is None else f"{r['median_updates']:.0f}"
        lines.append(
            f"| {r['length']} | {r['lr']:g} | {'MSGD-C' if r['clip'] else 'MSGD'} | {r['solved']}/{r['runs']} | "
            f"{r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['diverged']}/{r['runs']} | {med} |"
        )
    if t["agreement"] is not None:
        lines += [
            "",
            f"torch and JAX, the same {st['agreement_updates']} updates from the same start in every cell: "
            f"parameters and losses agree to {t['agreement']:.1e}.",
        ]
    lines += ["", "The paper's text on this figure:", ""] + [f"- {x}" for x in PAPER_STATEMENTS]
    path = out / "report.md"
    runfolder.write_file(path, "\n".join(lines) + "\n")
    return path


def paper_summary(results: dict, out: Path) -> str:
    t = results["temporal_order"]
    lines = [
        f"{'MSGD-C' if r['clip'] else 'MSGD':6s} length {r['length']:3d} lr {r['lr']:<5g}: solved {r['solved']}/"
        f"{r['runs']}, diverged {r['diverged']}/{r['runs']}"
        for r in t["table"]
    ]
    if results["cliff"]["agreement"]:
        lines.append(
            f"cliff: torch and JAX surfaces agree to {results['cliff']['agreement']['surface_rel']:.1e}"
        )
    lines.append(f"report: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return "\n".join(lines)
