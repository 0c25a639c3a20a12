"""How long `prove_port` takes on a real model: the 2-layer transformer encoder port.

`nn.TransformerEncoder` (2 x `nn.TransformerEncoderLayer`, d_model 128, 4 heads, feed-forward
256, GELU) between Linear layers, against its Flax NNX port (charclip/parity/examples.py), in
float64: localisation of every submodule, every gradient, the first AdamW update, and a 20-step
AdamW trajectory with its one-ulp-perturbed torch copy. Batch 8, sequence 64.

    python -m benchmarks.port                 # prints the timing, writes benchmarks/results/port.json
    python -m benchmarks.port --write-docs    # and the generated table in docs/porting.md

The first proof in a process pays JAX's compilation; the figure is the wall time of one whole
`prove_port` call from a cold start (what a user waits for), and of a second call (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "porting.md"
CONFIG = dict(d_in=16, d_model=128, heads=4, layers=2, seq=64, batch=8, classes=32, steps=20)


def measure() -> dict:
    import torch

    from charclip.parity import prove_port
    from charclip.parity.examples import make_transformer

    torch.set_num_threads(
        1
    )  # beside XLA's threads on a small machine (charclip.torch.probe.one_thread)
    times, report = [], None
    for _ in range(2):
        model, port, batches, options = make_transformer(**CONFIG)
        t0 = time.perf_counter()
        report = prove_port(model, port, batches, **options)
        times.append(time.perf_counter() - t0)
    forward = [r for r in report.rows if r.phase == "forward"]
    non_traj = [r.max_rel for r in report.rows if r.phase != "trajectory"]
    return {
        "config": CONFIG,
        "dtype": "float64",
        "optimizer": "adamw",
        "cold_s": round(times[0], 1),
        "warm_s": round(times[1], 1),
        "ok": report.ok,
        "rows": len(report.rows),
        "forward_rows": len(forward),
        "worst_rel_error_ladder": max(non_traj),
        "trajectory_worst_gap": max(report.trajectory.gap),
        "cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def table(r: dict) -> str:
    c = r["config"]
    return "\n".join(
        [
            "| model | proof | cold (s) | warm (s) | rows | worst error, one step | worst trajectory gap | verdict |",
            "|---|---|---|---|---|---|---|---|",
            f"| {c['layers']}-layer encoder, d_model {c['d_model']}, {c['heads']} heads, seq {c['seq']}, batch "
            f"{c['batch']} | float64, all submodules, AdamW x {c['steps']} steps | {r['cold_s']} | {r['warm_s']} | "
            f"{r['rows']} | {r['worst_rel_error_ladder']:.1e} | {r['trajectory_worst_gap']:.1e} | "
            f"{'exact to the bounds' if r['ok'] else 'DIFFERS'} |",
            "",
            f"Measured by `python -m benchmarks.port --write-docs` on {r['cores']} CPU cores ({r['machine']}).",
        ]
    )


def broken_example() -> str:
    """The start of the table of the 1-layer transformer port with LayerNorm eps 1e-6 (one step):
    the verdict, the notes and the forward rows up to the first backward row."""
    from charclip.parity import prove_port
    from charclip.parity.examples import make_transformer

    model, port, batches, options = make_transformer("layernorm_eps", layers=1, steps=1)
    report = prove_port(model, port, batches, trajectory=False, **options)
    rows = report.table().splitlines()
    cut = next(i for i, line in enumerate(rows) if line.startswith("backward"))
    return "```\n" + "\n".join(rows[: cut + 1]) + f"\n... ({len(rows) - cut - 1} more rows)\n```"


def write_docs(r: dict) -> None:
    text = DOC.read_text(encoding="utf-8")
    for name, body in (("benchmark", table(r)), ("example", broken_example())):
        block = f"<!-- {name}:port:start -->\n{body}\n<!-- {name}:port:end -->"
        text, n = re.subn(
            rf"<!-- {name}:port:start -->.*?<!-- {name}:port:end -->",
            lambda _, b=block: b,
            text,
            flags=re.DOTALL,
        )
        if n != 1:
            raise SystemExit(f"docs/porting.md has no <!-- {name}:port:start/end --> block")
    DOC.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--write-docs", action="store_true", help="rewrite the generated table in docs/porting.md"
    )
    p.add_argument(
        "--example-only",
        action="store_true",
        help="with --write-docs: rewrite only the localisation example, keep results/port.json's timing",
    )
    a = p.parse_args(argv)
    out = ROOT / "benchmarks" / "results" / "port.json"
    if a.example_only:
        write_docs(json.loads(out.read_text(encoding="utf-8")))
        return 0
    r = measure()
    out.write_text(json.dumps(r, indent=1), encoding="utf-8")
    print(table(r))
    if a.write_docs:
        write_docs(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
