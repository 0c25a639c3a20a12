"""`python -m benchmarks.first_step`: seconds from starting `charclip train` to its first step.

Each run is a fresh process, `charclip train --backend B --steps 2 --no-progress
--sample-chars 0` on the default corpus and model, timed from its start until the first
line of its metrics.jsonl (written when step 1 has finished), then stopped. JAX is timed
three ways: with its persistent compilation cache switched off, with a cache folder that
is empty (the first run of a configuration, which fills it), and with that folder filled
(every later run); torch has no compile step. The cold runs come first, then the rounds
alternate torch and the warm JAX run; the medians are printed with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_to_first_step(
    backend: str, cache: str, extra: list[str], timeout: float = 600.0
) -> tuple[float, float]:
    """Seconds from the process's start to its metrics file's first line, and that line's `time`
    (from the training loop's start to step 1's end: the step's compile, without imports and
    data); the process is then stopped."""
    env = {
        k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"
    }  # charclip's own setting decides
    env["CHARCLIP_COMPILATION_CACHE"] = cache
    with tempfile.TemporaryDirectory(prefix="charclip-first-step-") as out:
        metrics = Path(out) / "run" / "metrics.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "charclip",
            "train",
            "--backend",
            backend,
            "--steps",
            "2",
            "--no-progress",
            "--sample-chars",
            "0",
            "--out",
            str(Path(out) / "run"),
            *extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            while not (metrics.is_file() and metrics.read_text(encoding="utf-8").strip()):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(cmd)} ended before its first step:\n{proc.stderr.read()}"
                    )
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{' '.join(cmd)}: no step in {timeout:g} s")
                time.sleep(0.01)
            wall = time.perf_counter() - t0
            time.sleep(0.05)  # the line is flushed whole; read it again once it is surely complete
            return wall, json.loads(metrics.read_text(encoding="utf-8").splitlines()[0])["time"]
        finally:
            proc.terminate()
            proc.communicate()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.first_step", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating torch / warm-JAX rounds (default 3)"
    )
    p.add_argument("train_options", nargs="*", help="more `charclip train` options, after --")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    times: dict[str, list[tuple[float, float]]] = {
        "jax, cache off": [],
        "jax, empty cache (first run)": [],
        "jax, filled cache (later runs)": [],
        "torch": [],
    }
    with tempfile.TemporaryDirectory(prefix="charclip-xla-") as cache:
        times["jax, cache off"].append(time_to_first_step("jax", "off", args.train_options))
        times["jax, empty cache (first run)"].append(
            time_to_first_step("jax", cache, args.train_options)
        )
        for _ in range(args.rounds):
            times["torch"].append(time_to_first_step("torch", "off", args.train_options))
            times["jax, filled cache (later runs)"].append(
                time_to_first_step("jax", cache, args.train_options)
            )
    shown = " ".join(
        ["charclip train --steps 2 --no-progress --sample-chars 0", *args.train_options]
    )
    print(
        f"`{shown}`: seconds from the process's start to step 1 finished; load average "
        f"{load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print(
        "| run | start to step 1, median s | runs (s) | loop start to step 1, median s | runs (s) |"
    )
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        walls, loops = [t[0] for t in ts], [t[1] for t in ts]
        print(
            f"| {name} | {statistics.median(walls):.2f} | {', '.join(f'{t:.2f}' for t in walls)} | "
            f"{statistics.median(loops):.2f} | {', '.join(f'{t:.2f}' for t in loops)} |"
        )
    warm, torch = times["jax, filled cache (later runs)"], times["torch"]
    for i, what in enumerate(("start to step 1", "loop start to step 1")):
        gap = statistics.median(t[i] for t in warm) - statistics.median(t[i] for t in torch)
        print(f"\nwarm JAX minus torch, {what}: {gap:+.2f} s (medians)", end="")
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
