"""How long `charclip conform` (the whole conformance table) takes.

    python -m benchmarks.conform [--max-examples N] [--jobs J] [--out benchmarks/results/conform.json]
                                 [--write docs/conformance.md]

Runs the command once, as a user would, and reports its wall time and the CPU time of
all its processes (user + system, from the children's resource usage): on a machine
shared with other work the wall time says little, and CPU seconds / cores is what the
table costs on an otherwise idle machine of that many cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(max_examples: int, jobs: int, targets: list[str], write: Path | None = None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "charclip",
        "conform",
        "--max-examples",
        str(max_examples),
        "--jobs",
        str(jobs),
    ]
    for t in targets:
        cmd += ["--target", t]
    if write:
        cmd += ["--write", str(write)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"charclip conform failed: {out.stderr.strip().splitlines()[-1:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "jobs": jobs,
        "cpu_seconds_per_job": round(cpu / jobs, 1),
        "load_average_1min": os.getloadavg()[0],
        "cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.conform", description=__doc__.splitlines()[0]
    )
    p.add_argument("--max-examples", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--target", action="append", default=[])
    p.add_argument("--out", type=Path, help="write the result as JSON")
    p.add_argument("--write", type=Path, help="passed on to charclip conform (docs/conformance.md)")
    a = p.parse_args(argv)
    r = measure(a.max_examples, a.jobs, a.target, a.write)
    print(json.dumps(r, indent=1))
    if a.out:
        a.out.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
