"""Write the README's tables of measured numbers from the commands' own JSON, never by hand.

    python docs/make_readme_tables.py            # rewrite the generated blocks (README.md, docs/parity.md)
    python docs/make_readme_tables.py --check    # exit 1 if a generated block differs from what the JSON gives
    python docs/make_readme_tables.py --measure  # first rerun the command that writes the JSON

Each block sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; its
source is a JSON file committed beside the figures, written by a charclip command (named in
SOURCES). parity_tests/behaviour/test_readme_numbers.py reruns the command and fails when the committed
JSON and a fresh run disagree beyond the printed rounding, and when README.md is stale.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PARITY_JSON = ROOT / "docs/figures/parity/parity-float64.json"
DEFAULT_RUN = (
    ROOT / "docs/figures/default-run"
)  # summary.json and metrics.jsonl of one `charclip train`
PRECISION_JSON = ROOT / "docs/figures/precision/precision.json"  # python -m benchmarks.precision
SOURCES = {  # name -> (the JSON, the command that writes it); the default run is measured by measure_default_run
    "default-run": (DEFAULT_RUN / "summary.json", None),
    "parity-table": (
        PARITY_JSON,
        [
            "charclip",
            "parity",
            "--cell",
            "all",
            "--layers",
            "2",
            "--dtype",
            "float64",
            "--no-progress",
            "--json",
            str(PARITY_JSON.relative_to(ROOT)),
            "--plot",
            "docs/figures/parity/drift-float64.png",
        ],
    ),
    "precision": (
        PRECISION_JSON,
        [sys.executable, "-m", "charclip.benchmarks.precision", "--no-progress"],
    ),
}
README_CELL = "lstm"  # the configuration the README shows; docs/parity.md shows all three


def sig2(x: float) -> str:
    """A relative error as printed in the tables: two significant digits, 0 as 0."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}"


def _rows(report: dict) -> dict[str, dict]:
    return {r["quantity"]: r for r in report["rows"]}


def _worst(rows: dict[str, dict], prefix: str) -> float:
    return max(r["max_rel"] for q, r in rows.items() if q.startswith(prefix))


def parity_table(reports: list[dict]) -> str:
    """The README's parity table, from `charclip parity --json` output."""
    report = next(r for r in reports if r["config"]["cell"] == README_CELL)
    c, rows = report["config"], _rows(report)
    final = ", ".join(sig2(r["max_rel"]) for q, r in rows.items() if q.startswith("final "))
    tol = f"{rows['logits']['tol']:.0e}"
    clip_row = next(q for q in rows if q.startswith("clipped steps"))
    n_clipped, n_steps = re.match(r"clipped steps: (\d+) of (\d+)", clip_row).groups()
    traj = next(r for q, r in rows.items() if q.startswith("params over"))
    sample = next(q for q in rows if q.startswith("sampled text"))
    chars = re.search(r"\((\d+) chars", sample).group(1)
    lines = [
        f"| quantity ({c['cell'].upper()} {c['layers']}x{c['hidden']}, {c['dtype']}, {c['device'].upper()}) | max rel err | tolerance |",
        "|---|---|---|",
        f"| logits / final state | {sig2(rows['logits']['max_rel'])} / {final} | {tol} |",
        f"| loss | {sig2(rows['loss']['max_rel'])} | {tol} |",
        f"| worst parameter gradient | {sig2(_worst(rows, 'grad '))} | {tol} |",
        f"| global gradient norm | {sig2(rows['global grad norm']['max_rel'])} | {tol} |",
        f"| norm-clipped / value-clipped grads | {sig2(_worst(rows, 'norm-clipped'))} / {sig2(_worst(rows, 'value-clipped'))} | {tol} |",
        f"| Adam update after clipping | {sig2(rows['Adam update after clipping']['max_rel'])} | {tol} |",
        f"| parameters over {n_steps} steps (worst) | {sig2(traj['max_rel'])} | {traj['tol']:.0e} |",
        f"| clipped steps ({n_clipped} of {n_steps}) | {'same steps' if rows[clip_row]['ok'] else 'DIFFER'} | exact |",
        f"| {chars} sampled characters | {'identical' if rows[sample]['ok'] else 'DIFFER'} | exact |",
    ]
    return "\n".join(lines)


def parity_output(reports: list[dict]) -> str:
    """What `charclip parity` prints for the README's configuration, rebuilt from its JSON."""
    from charclip.parity import Row, format_table

    report = next(r for r in reports if r["config"]["cell"] == README_CELL)
    c = report["config"]
    head = (
        f"{c['cell']} {c['layers']}x{c['hidden']} (embedding {c['embedding']}, vocabulary {c['vocab']}), {c['dtype']}, "
        f"batch {c['batch']}x{c['seq_len']}, {c['device']}, clipping: {c['clip_impl']}"
    )
    return "```\n" + head + "\n" + format_table([Row(**r) for r in report["rows"]]) + "\n```"


def default_run(summary: dict) -> str:
    """The README's paragraph on the default run, from its summary.json and metrics.jsonl."""
    records = [
        json.loads(line)
        for line in (DEFAULT_RUN / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if line
    ]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    clipped = [r["step"] for r in steps if r["clipped"]]
    norms = sorted(r["grad_norm"] for r in steps)
    p10, p90 = norms[len(norms) // 10], norms[(9 * len(norms)) // 10]
    every = vals[1]["step"] - vals[0]["step"] if len(vals) > 1 else vals[0]["step"]
    where = f", all among the first {max(clipped)}" if clipped else ""
    load = summary["load_average"]
    text = (
        f"Measured with `python docs/make_readme_tables.py --measure` on this project's 2-core CPU (load average "
        f"{load[0]:.1f} when it started, {load[1]:.1f} at the end; {summary['backend']} backend, the default): the run "
        f"reaches **{summary['val_loss']:.2f} nats/char validation** (training {summary['train_loss']:.2f}) after "
        f"{summary['steps']} steps, {summary['seconds']:.0f} s of training ({summary['wall_seconds']:.0f} s in all, "
        f"with start-up, validation, plotting and sampling). Validation loss every {every} steps: "
        + ", ".join(f"{r['val_loss']:.3f}" for r in vals)
        + ". "
        f"Clipping fired on {len(clipped)} of {len(steps)} steps{where} (largest pre-clip norm {norms[-1]:.2f}); "
        f"ordinary steps' norms lie between {p10:.2f} and {p90:.2f} (10th to 90th percentile). "
        "torch on 2 threads is not bit-reproducible from run to run, so a rerun differs in the third decimal. "
        "The closing sample (temperature 0.8) reads like this:"
    )
    wrapped, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > 90:
            wrapped.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    wrapped.append(line)
    return "\n".join(wrapped) + "\n\n```\n" + summary["sample"].strip("\n") + "\n```"


def precision_table(result: dict) -> str:
    """The README's mixed-precision table, from `python -m benchmarks.precision` output."""
    c, env = result["config"], result["environment"]
    runs = result["runs"]
    full = {r["backend"]: r for r in runs if r["precision"] == "full"}
    lines = [
        f"| backend | precision | validation loss after {c['steps']} steps | vs float32 | ms per step (median) "
        "| time vs float32 (median of paired ratios) | overflowed steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        base = full[r["backend"]]
        delta = "" if r["precision"] == "full" else f"{r['val_loss'] - base['val_loss']:+.4f}"
        ratio = "1" if r["precision"] == "full" else f"{r['time_vs_full']['median']:.2f}x"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['val_loss']:.4f} | {delta} | "
            f"{r['step_seconds']['median'] * 1e3:,.0f} | {ratio} | {r['overflow_steps']} |"
        )
    worst = max(abs(r["val_loss"] - full[r["backend"]]["val_loss"]) for r in runs)
    lines.append("")
    lines.append(
        f"Every bf16 and fp16 run ends within {worst:.4f} nats/char of its backend's float32 validation loss. "
        f"Default model ({c['model']}), batch {c['batch']}x{c['seq_len']}, validation on {c['eval_batches']} "
        f"batches; {env['cpu']}, {env['cores']} cores, torch {env['versions']['torch']}, jax "
        f"{env['versions']['jax']}; load average {result['load_start']:.1f} at the start, "
        f"{result['load_end']:.1f} at the end."
    )
    return "\n".join(lines)


# block name -> (file it sits in, what writes it)
TARGETS = {
    "parity-table": (README, parity_table),
    "parity-lstm-output": (ROOT / "docs/parity.md", parity_output),
    "default-run": (README, default_run),
    "precision": (ROOT / "docs/usage.md", precision_table),
}
SOURCE_OF = {
    "parity-table": "parity-table",
    "parity-lstm-output": "parity-table",
    "default-run": "default-run",
    "precision": "precision",
}


def render(name: str, data) -> str:
    return TARGETS[name][1](data)


def _block(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- generated: {name} -->\n)(.*?)(\n<!-- end generated: {name} -->)", re.S
    )


def rewrite(text: str, target: Path = README) -> str:
    """`text` (the contents of `target`) with each of its generated blocks written afresh."""
    for name, (path, _) in TARGETS.items():
        if path != target:
            continue
        pattern = _block(name)
        if not pattern.search(text):
            raise SystemExit(f"{target.name} has no generated block {name!r}")
        source = SOURCES[SOURCE_OF[name]][0]
        table = render(name, json.loads(source.read_text(encoding="utf-8")))
        text = pattern.sub(lambda m: m.group(1) + table + m.group(3), text)
    return text


def measure_default_run() -> int:
    """`charclip train` with every default, into a fresh folder; keep its summary, metrics and plot."""
    import os
    import shutil
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start_load, t0 = os.getloadavg()[0], time.perf_counter()
        done = subprocess.run(
            ["charclip", "train", "--out", str(run_dir), "--no-progress"], cwd=ROOT
        )
        wall, end_load = time.perf_counter() - t0, os.getloadavg()[0]
        if done.returncode != 0:
            return done.returncode
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        summary.update(load_average=[start_load, end_load], wall_seconds=round(wall, 1))
        for key in ("checkpoint", "metrics", "plot"):  # paths into a folder that is gone
            summary.pop(key, None)
        DEFAULT_RUN.mkdir(parents=True, exist_ok=True)
        (DEFAULT_RUN / "summary.json").write_text(
            json.dumps(summary, indent=1) + "\n", encoding="utf-8"
        )
        shutil.copy(run_dir / "metrics.jsonl", DEFAULT_RUN / "metrics.jsonl")
        shutil.copy(run_dir / "training.png", ROOT / "docs/figures/default-run.png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--check", action="store_true", help="exit 1 if README.md is not what the JSON gives"
    )
    g.add_argument(
        "--measure", action="store_true", help="rerun the commands that write the JSON first"
    )
    p.add_argument(
        "--only",
        choices=("parity-table", "default-run", "precision"),
        help="with --measure: rerun only this one",
    )
    a = p.parse_args(argv)
    if a.measure:
        if a.only in (None, "default-run"):
            print("default-run: charclip train (every default)", flush=True)
            if measure_default_run():
                return 1
        for name, (_, command) in SOURCES.items():
            if command is None or a.only not in (None, name):
                continue
            print(f"{name}: {' '.join(command)}", flush=True)
            done = subprocess.run(command, cwd=ROOT)
            if done.returncode not in (
                0,
                1,
            ):  # 1: parity found a difference, which the table then shows
                return done.returncode
    stale = []
    for target in sorted({path for path, _ in TARGETS.values()}):
        text = target.read_text(encoding="utf-8")
        new = rewrite(text, target)
        if new != text:
            stale.append(target.relative_to(ROOT))
            if not a.check:
                target.write_text(new, encoding="utf-8")
    if a.check and stale:
        print(
            f"stale generated tables in {', '.join(map(str, stale))}: run python docs/make_readme_tables.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
