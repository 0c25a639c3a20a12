"""Soak test: thousands of training steps in each backend, watching the process's memory.

A leak (a growing autograd graph, a retraced jit, an ever-longer history) shows up as resident
memory (RSS) that keeps climbing with the step count. Each backend runs in its own subprocess, so
the numbers are that backend's alone; every `--every` steps it records its current RSS, and at the
end the peak (ru_maxrss). Writes a JSON and a PNG; not part of the test suite.

    python -m benchmarks.soak --steps 5000 --out soak
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from dataclasses import replace
import numpy as np
from tqdm import tqdm
from charclip import corpus
from charclip.batching import Position, Streams, split
from charclip.config import ModelConfig, TrainConfig
from charclip.backends import module as backend_module
from charclip.vocab import Vocab
from charclip.weights import init_params

backend, steps, every, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

text = corpus.shakespeare()[:500_000]
vocab = Vocab.from_text(text)
cfg = TrainConfig(steps=steps, batch_size=32, seq_len=64, dtype="float32")
model = ModelConfig(vocab_size=len(vocab), hidden_size=hidden, num_layers=2, embedding_dim=32)
streams = Streams(split(vocab.encode(text), cfg.val_fraction)[0], cfg.batch_size, cfg.seq_len)
trainer = backend_module(backend, "train").Trainer(model, cfg, init_params(model, cfg.seed, cfg.dtype))
pos, rows, t0 = Position(), [], time.perf_counter()
for step in tqdm(range(1, steps + 1), desc=backend, unit="step", file=sys.stderr):
    if pos.batch == 0:
        trainer.reset_hidden()
    trainer.step(*streams.batch(cfg.seed, pos))
    pos = streams.next(pos)
    if step % every == 0 or step == 1:
        rows.append({"step": step, "rss_mib": round(rss_mib(), 2), "seconds": round(time.perf_counter() - t0, 2)})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"backend": backend, "rows": rows, "peak_rss_mib": round(peak, 2)}))
"""


def run_backend(backend: str, steps: int, every: int, hidden: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, backend, str(steps), str(every), str(hidden)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(result: dict) -> dict:
    """Growth of RSS over the second half of the run, where warm-up (compilation, allocator pools) is over."""
    rows = result["rows"]
    half = [r for r in rows if r["step"] >= rows[-1]["step"] / 2]
    growth = half[-1]["rss_mib"] - half[0]["rss_mib"]
    per_1k = growth / max(half[-1]["step"] - half[0]["step"], 1) * 1000
    return {
        "rss_first_mib": rows[0]["rss_mib"],
        "rss_last_mib": rows[-1]["rss_mib"],
        "peak_rss_mib": result["peak_rss_mib"],
        "second_half_growth_mib": round(growth, 2),
        "growth_mib_per_1k_steps": round(per_1k, 3),
        "seconds": rows[-1]["seconds"],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(
            [x["step"] for x in r["rows"]],
            [x["rss_mib"] for x in r["rows"]],
            label=f"{r['backend']} (peak {r['peak_rss_mib']:.0f} MiB)",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("charclip soak: memory against steps")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--every", type=int, default=50, help="steps between memory readings")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["torch", "jax"])
    p.add_argument("--out", default="soak", help="output folder for soak.json and soak.png")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_backend(b, a.steps, a.every, a.hidden) for b in a.backends]
    report = {
        "steps": a.steps,
        "hidden": a.hidden,
        "backends": {r["backend"]: summarise(r) for r in results},
        "runs": results,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "soak.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot(results, out / "soak.png")
    print(json.dumps(report["backends"], indent=1))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
