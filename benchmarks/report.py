"""Turn the results dict into a markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}" if s < 10 else f"{s * 1e3:.0f}"


def _spread(s: dict) -> str:
    return f"{_ms(s['median'])} ({_ms(s['min'])}-{_ms(s['max'])})"


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [
        f"# charclip benchmarks: {r['machine']} ({r['mode']} mode)",
        "",
        f"{env['time']}; {env['cpu']}, {env['cores']} cores; torch {env['versions']['torch']} "
        f"({r['torch_threads']} intra-op threads), jax {env['versions']['jax']}, optax {env['versions']['optax']}; "
        f"XLA_FLAGS={env['env'].get('XLA_FLAGS')!r}.",
        f"Load average at start {', '.join(f'{x:.1f}' for x in env['loadavg'])}; at end "
        f"{', '.join(f'{x:.1f}' for x in r['loadavg_end'])}."
        + (
            " **The machine was loaded (load > cores): absolute times are pessimistic; ratios are timed alternately and hold better.**"
            if max(env["loadavg"][0], r["loadavg_end"][0]) > env["cores"]
            else ""
        ),
        "",
        "Times in ms: median (min-max) over the repeats after warm-up.",
        "",
    ]
    g = r.get("goals")
    if g:
        lines += ["## Goals", "", "| goal | measured | status |", "|---|---|---|"]
        lines += [f"| {x['goal']} | {x['measured']} | {x['status']} |" for x in g]
        lines.append("")
    if r.get("throughput"):
        peak = r.get("peak", {}).get("peak_flop_per_s")
        lines += [
            "## Training throughput (one full step: forward, loss, backward, clip, Adam)",
            "",
            "JAX is the fast layer (`charclip.jax.fastrnn`, training's default); JAX scan is the `lax.scan` reference "
            "differentiated by autodiff. torch/JAX: torch's time over JAX's, the median of the per-round ratios of "
            "one interleaved run (quartiles in brackets; > 1: JAX is faster). Load: 1-minute load average before "
            "and after the measurement.",
            "",
            "| configuration | torch ms/step | JAX ms/step | JAX scan ms/step | torch/JAX | torch/JAX scan | load | "
            "first step torch / JAX / scan (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in r["throughput"]:
            q, qs = t["ratios"]["jax"], t["ratios"]["jax_scan"]
            lines.append(
                f"| {t['label']} | {_spread(t['torch'])} | {_spread(t['jax'])} | {_spread(t['jax_scan'])} | "
                f"**{q['median']:.2f}** ({q['q1']:.2f}-{q['q3']:.2f}) | {qs['median']:.2f} ({qs['q1']:.2f}-{qs['q3']:.2f}) | "
                f"{t['loadavg'][0]:.1f}, {t['loadavg'][1]:.1f} | "
                f"{t['first_step_s']['torch']:.2f} / {t['first_step_s']['jax']:.2f} / {t['first_step_s']['jax_scan']:.2f} |"
            )
        lines.append("")
        if peak:
            p = r["peak"]
            lines += [
                "### Roofline: achieved matmul rate against the sgemm peak",
                "",
                f"Peak: the best float32 {p['n']}x{p['n']} matmul of this run, "
                + ", ".join(f"{n} {v['flop_per_s'] / 1e9:.0f}" for n, v in p["impls"].items())
                + " GFLOP/s. FLOPs per step by formula (`charclip.benchmarks.training.step_flops`: forward matmuls, "
                "backward twice that), over the median step time.",
                "",
                "| configuration | GFLOP/step | torch GFLOP/s (% of peak) | JAX | JAX scan |",
                "|---|---|---|---|---|",
            ]
            for t in r["throughput"]:
                cells = [
                    f"{t[b]['flop_per_s'] / 1e9:.1f} ({t[b]['flop_per_s'] / peak:.0%})"
                    for b in ("torch", "jax", "jax_scan")
                ]
                lines.append(
                    f"| {t['label']} | {t['step_flop'] / 1e9:.2f} | " + " | ".join(cells) + " |"
                )
            lines.append("")
    for key, title in (
        ("jax_variants", "JAX variants"),
        ("torch_table", "layer 0's input projection in torch: per row vs table"),
        ("torch_threads", "torch intra-op threads"),
        ("torch_compile", "torch eager vs torch.compile"),
        ("cudnn", "cuDNN (GPU only)"),
    ):
        v = r.get("variants", {}).get(key)
        if not v:
            continue
        lines += [f"## {title} ({v['label']})", ""]
        if "skipped" in v:
            lines += [f"Skipped: {v['skipped']}.", ""]
            continue
        if key == "torch_table":
            lines += [
                "Forward and backward of the projection alone (ms). torch's nn.RNN/LSTM/GRU project the embedded input "
                "inside their own kernels, so a torch model cannot take the table without giving them up.",
                "",
                "| variant | ms |",
                "|---|---|",
            ]
            lines += [f"| {name} | {_spread(s)} |" for name, s in v["variants"].items()]
            lines.append("")
            continue
        best = min(s["median"] for s in v["variants"].values())
        lines += [
            "| variant | ms/step | chars/s | time / fastest |"
            + (" first step (s) |" if key == "jax_variants" else ""),
            "|---|---|---|---|" + ("---|" if key == "jax_variants" else ""),
        ]
        for name, s in v["variants"].items():
            lines.append(
                f"| {name} | {_spread(s)} | {s['chars_per_s']:.0f} | {s['median'] / best:.2f} |"
                + (f" {s['first_step_s']:.1f} |" if key == "jax_variants" else "")
            )
        if "loadavg" in v:
            lines.append(
                f"\nLoad average before and after: {v['loadavg'][0]:.1f}, {v['loadavg'][1]:.1f}."
            )
        if "compile_s" in v:
            lines.append(
                f"\ntorch.compile: first two steps (compiling without and with a hidden state) took {v['compile_s']:.1f} s."
            )
        lines.append("")
    st = r.get("variants", {}).get("jax_single_thread")
    if st and "torch" in st:
        lines += [
            f"JAX with XLA on one thread (fresh process, `XLA_FLAGS={st['XLA_FLAGS']}`): torch {_spread(st['torch'])} ms, "
            f"JAX {_spread(st['jax'])} ms per step, JAX/torch **{st['jax_over_torch']:.2f}**.",
            "",
        ]
    elif st:
        lines += [f"JAX with XLA on one thread: {st.get('skipped')}", ""]
    c = r.get("clipping")
    if c and "copy_bandwidth" in c:
        bw = c["copy_bandwidth"]
        lines += [
            "## Clipping",
            "",
            f"Copy bandwidth ({bw['elements']:.0e} float32, read + write): "
            + ", ".join(f"{n} {_gb(s['bytes_per_s'])} GB/s" for n, s in bw["impls"].items())
            + f"; best {_gb(bw['best_bytes_per_s'])} GB/s. A clip moves at least 3 x 4 bytes per parameter.",
            "",
        ]
        for key, what in (
            ("by_size", "parameters (10 tensors)"),
            ("by_tensors", "tensors (fixed total size)"),
        ):
            rows = c.get(key) or []
            if not rows:
                continue
            names = list(rows[0]["impls"])
            lines += [
                f"### Time (ms) and bandwidth (share of copy bandwidth) by number of {what}",
                "",
                "| "
                + ("parameters" if key == "by_size" else "tensors")
                + " | "
                + " | ".join(names)
                + " |",
                "|---" * (len(names) + 1) + "|",
            ]
            for row in rows:
                cells = []
                for n in names:
                    s = row["impls"].get(n)
                    cells.append(
                        "-"
                        if s is None
                        else f"{_ms(s['median'])} ({s['bytes_per_s'] / bw['best_bytes_per_s']:.0%})"
                    )
                lines.append(
                    f"| {row['params'] if key == 'by_size' else row['tensors']:.0e} | ".replace(
                        "e+0", "e"
                    )
                    + " | ".join(cells)
                    + " |"
                )
            lines.append("")
        s = c.get("in_step")
        if s:
            lines += [
                f"### Clipping inside a training step ({s['case']}, {s['params']} parameters in {s['tensors']} tensors)",
                "",
                "| implementation | clip ms | share of that backend's step |",
                "|---|---|---|",
            ]
            for n, v in s["impls"].items():
                lines.append(f"| {n} | {_spread(v)} | {v.get('share_of_step', float('nan')):.2%} |")
            if s.get("step_difference"):
                lines.append(
                    "\nStep time with clipping minus without (same batches, alternately timed runs): "
                    + "; ".join(
                        f"{b} {d * 1e3:+.1f} ms ({d / base:+.1%})"
                        for b, (d, base) in s["step_difference"].items()
                    )
                    + "."
                )
            lines.append("")
    sc = r.get("scaling")
    if sc:
        lines += ["## How cost grows", ""]
        for key, var in (("seq", "sequence length"), ("hidden", "hidden size")):
            pts = sc.get(key)
            if pts:
                lines.append(
                    f"- Step time vs {var}: fitted exponent torch {pts['exponent']['torch']:.2f}, JAX {pts['exponent']['jax']:.2f} "
                    f"(time ~ {var}^k over {pts['x'][0]}..{pts['x'][-1]})."
                )
        mem = sc.get("memory")
        if mem:
            lines.append(
                "- Memory vs sequence length: "
                + "; ".join(
                    f"T={m['seq']}: torch saved-for-backward {m['torch_saved_mb']:.0f} MB"
                    + (
                        f", torch peak RSS {m['torch_peak_rss_mb']:.0f} MB"
                        if m.get("torch_peak_rss_mb") is not None
                        else ""
                    )
                    + (
                        f", JAX XLA peak {m['jax_peak_mb']:.0f} MB (temp {m['jax_temp_mb']:.0f} MB)"
                        if m.get("jax_peak_mb") is not None
                        else ""
                    )
                    for m in mem
                )
                + "."
            )
        lines.append("")
    fs = r.get("first_step")
    if fs:
        lines += ["## Time to first step", ""]
        if "jax_compile_split" in fs:
            j = fs["jax_compile_split"]
            lines.append(
                f"- JAX default step: trace + lower {j['trace_lower_s']:.2f} s, XLA compile {j['compile_s']:.2f} s."
            )
        for b in ("torch", "jax"):
            f = fs.get(f"fresh_{b}")
            if f and "skipped" not in f:
                lines.append(
                    f"- Fresh {b} process: import {f['import_s']:.1f} s, first step {f['first_step_s']:.2f} s, second "
                    f"{f['second_step_s']:.2f} s; {f['to_first_step_s']:.1f} s from start to the end of the first step."
                )
        lines.append("")
    if r.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def fit_exponent(x, y) -> float:
    """k in y ~ c x^k, least squares in log-log."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def plots(r: dict, out: Path) -> list[str]:
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    if r.get("throughput"):
        rows = r["throughput"]
        fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.6))
        y = np.arange(len(rows))
        for off, b in ((-0.27, "torch"), (0, "jax"), (0.27, "jax_scan")):
            ax.barh(
                y + off,
                [t[b]["chars_per_s"] for t in rows],
                height=0.27,
                label={"jax": "jax (fast layer)"}.get(b, b),
                xerr=[
                    [
                        t[b]["chars_per_s"] - t["case"]["batch"] * t["case"]["seq"] / t[b]["max"]
                        for t in rows
                    ],
                    [
                        t["case"]["batch"] * t["case"]["seq"] / t[b]["min"] - t[b]["chars_per_s"]
                        for t in rows
                    ],
                ],
            )
        ax.set_yticks(y, [t["label"] for t in rows])
        ax.invert_yaxis()
        ax.set_xlabel(
            "characters per second (one full training step; bars: median, whiskers: min-max)"
        )
        ax.legend()
        save(fig, "throughput.png")
        peak = r.get("peak", {}).get("peak_flop_per_s")
        if peak:
            fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.6))
            for off, b in ((-0.27, "torch"), (0, "jax"), (0.27, "jax_scan")):
                ax.barh(
                    y + off,
                    [t[b]["flop_per_s"] / peak for t in rows],
                    height=0.27,
                    label={"jax": "jax (fast layer)"}.get(b, b),
                )
            ax.axvline(
                1.0, color="k", lw=0.8, ls="--", label=f"sgemm peak ({peak / 1e9:.0f} GFLOP/s)"
            )
            ax.axvline(0.85, color="r", lw=0.8, ls=":", label="goal: 85% of peak")
            ax.set_yticks(y, [t["label"] for t in rows])
            ax.invert_yaxis()
            ax.set_xlabel("matmul FLOPs per step (formula) / median step time / sgemm peak")
            ax.legend(fontsize=8)
            save(fig, "roofline.png")
    sc = r.get("scaling", {})
    for key, xlabel in (("seq", "sequence length T"), ("hidden", "hidden size H")):
        pts = sc.get(key)
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in ("torch", "jax"):
            ax.loglog(pts["x"], pts[b], "o-", label=f"{b} (slope {pts['exponent'][b]:.2f})")
        x = np.asarray(pts["x"], float)
        ref = 1 if key == "seq" else 2
        ax.loglog(
            x,
            pts["torch"][0] * (x / x[0]) ** ref,
            "k--",
            lw=0.8,
            label=f"slope {ref} ({'linear' if ref == 1 else 'quadratic'})",
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per step (median)")
        ax.set_title(f"step time vs {xlabel} ({pts['label']})", fontsize=9)
        ax.legend()
        save(fig, f"scaling_{key}.png")
    mem = sc.get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(6, 4))
        seq = [m["seq"] for m in mem]
        ax.plot(
            seq, [m["torch_saved_mb"] for m in mem], "o-", label="torch: tensors saved for backward"
        )
        if any(m.get("torch_peak_rss_mb") is not None for m in mem):
            ax.plot(
                seq,
                [m.get("torch_peak_rss_mb") for m in mem],
                "s--",
                label="torch: peak RSS - RSS before (fresh process)",
            )
        if any(m.get("jax_peak_mb") is not None for m in mem):
            ax.plot(
                seq,
                [m.get("jax_peak_mb") for m in mem],
                "^-",
                label="JAX: XLA memory analysis (args + out + temp)",
            )
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("MB")
        ax.set_title("memory of one training step vs sequence length", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "memory_seq.png")
    c = r.get("clipping")
    if c and "copy_bandwidth" in c:
        bw = c["copy_bandwidth"]["best_bytes_per_s"]
        for key, xlabel in (
            ("by_size", "parameters (10 tensors)"),
            ("by_tensors", "number of tensors (fixed total)"),
        ):
            rows = c.get(key)
            if not rows:
                continue
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
            x = [row["params"] if key == "by_size" else row["tensors"] for row in rows]
            for n in rows[0]["impls"]:
                t = [row["impls"][n]["median"] if n in row["impls"] else np.nan for row in rows]
                a1.loglog(x, t, "o-", label=n, ms=3)
                a2.semilogx(
                    x,
                    [row["params"] * 12 / ti / bw for row, ti in zip(rows, t)],
                    "o-",
                    ms=3,
                    label=n,
                )
            if key == "by_size":
                a1.loglog(
                    x,
                    [12 * n / bw for n in x],
                    "k--",
                    lw=0.8,
                    label="memory bound: 3 x 4 bytes / copy bandwidth",
                )
            a1.set_xlabel(xlabel)
            a1.set_ylabel("seconds per clip (median)")
            a1.legend(fontsize=7)
            a2.axhline(1.0, color="k", lw=0.8, ls="--")
            a2.axhline(0.7, color="r", lw=0.8, ls=":")
            a2.set_xlabel(xlabel)
            a2.set_ylabel("achieved (3 x bytes / time) / copy bandwidth")
            fig.suptitle("cost of clipping by global norm", fontsize=10)
            save(fig, f"clip_{key}.png")
    return names
