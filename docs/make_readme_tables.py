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
SOURCES = {
    "parity-table": (PARITY_JSON, ["charclip", "parity", "--cell", "all", "--layers", "2", "--dtype", "float64",
                                   "--no-progress", "--json", str(PARITY_JSON.relative_to(ROOT)),
                                   "--plot", "docs/figures/parity/drift-float64.png"]),
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
    head = (f"{c['cell']} {c['layers']}x{c['hidden']} (embedding {c['embedding']}, vocabulary {c['vocab']}), {c['dtype']}, "
            f"batch {c['batch']}x{c['seq_len']}, {c['device']}, clipping: {c['clip_impl']}")
    return "```\n" + head + "\n" + format_table([Row(**r) for r in report["rows"]]) + "\n```"


# block name -> (file it sits in, what writes it)
TARGETS = {"parity-table": (README, parity_table), "parity-lstm-output": (ROOT / "docs/parity.md", parity_output)}
SOURCE_OF = {"parity-table": "parity-table", "parity-lstm-output": "parity-table"}


def render(name: str, data) -> str:
    return TARGETS[name][1](data)


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {name} -->\n)(.*?)(\n<!-- end generated: {name} -->)", re.S)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the JSON gives")
    g.add_argument("--measure", action="store_true", help="rerun the commands that write the JSON first")
    a = p.parse_args(argv)
    if a.measure:
        for name, (_, command) in SOURCES.items():
            print(f"{name}: {' '.join(command)}", flush=True)
            done = subprocess.run(command, cwd=ROOT)
            if done.returncode not in (0, 1):  # 1: parity found a difference, which the table then shows
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
        print(f"stale generated tables in {', '.join(map(str, stale))}: run python docs/make_readme_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
