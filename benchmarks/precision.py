"""Mixed precision against float32 on the default model: loss reached and time per step.

    python -m benchmarks.precision [--steps N] [--backends torch jax] [--out FILE]

Six trainers (torch and JAX, each in full float32, bf16 and fp16) start from the same
weights and take the same batches of the embedded Shakespeare, one step each in turn
(the order rotating every round), so a burst of load from elsewhere hits all of them
alike and the per-round time ratios to float32 stay meaningful. After the last step each
is evaluated on the same validation batches. The default output,
`docs/figures/precision/precision.json`, feeds the table in docs/usage.md
(`python docs/make_readme_tables.py`); a run with other settings should go elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from charclip.benchmarks.harness import environment, paired_ratio, stats
from charclip.config import BACKENDS, PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs/figures/precision/precision.json"


TINY = {
    "model": dict(hidden_size=16, num_layers=1, embedding_dim=8),
    "train": dict(batch_size=4, seq_len=8),
}


def measure(
    steps: int,
    backends_: list[str],
    eval_batches: int = 16,
    progress: bool = True,
    tiny: bool = False,
) -> dict:
    from tqdm.auto import tqdm

    from charclip import backends
    from charclip.batching import Position
    from charclip.config import ModelConfig, TrainConfig
    from charclip.run import prepare_data
    from charclip.weights import init_params

    shape = TINY if tiny else {"model": {}, "train": {}}
    cfg0 = TrainConfig(steps=steps, **shape["train"])
    data = prepare_data(None, cfg0)
    model_cfg = ModelConfig(vocab_size=len(data.vocab), **shape["model"])
    params = init_params(model_cfg, cfg0.seed, cfg0.dtype)
    names = [(b, p) for b in backends_ for p in PRECISIONS]
    trainers = {
        (b, p): backends.trainer_factory(b)(
            model_cfg, TrainConfig(steps=steps, precision=p, **shape["train"]), params
        )
        for b, p in names
    }
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    overflows = {n: 0 for n in names}
    load_start = os.getloadavg()[0]
    position = Position()
    for step in tqdm(range(steps), disable=not progress, desc="precision"):
        x, y = data.train.batch(cfg0.seed, position)
        order = names[step % len(names) :] + names[: step % len(names)]
        for n in order:
            t0 = time.perf_counter()
            r = trainers[n].step(x, y)  # returns after .item() / float(): the work is done
            times[n].append(time.perf_counter() - t0)
            losses[n].append(r.loss)
            overflows[n] += r.overflow
        position = data.train.next(position)
    val = {n: trainers[n].evaluate(data.val.eval_batches(eval_batches)) for n in names}
    load_end = os.getloadavg()[0]
    m = model_cfg
    out = {
        "config": {
            "steps": steps,
            "model": f"{m.cell} {m.num_layers}x{m.hidden_size}, embedding {m.embedding_dim}",
            "batch": cfg0.batch_size,
            "seq_len": cfg0.seq_len,
            "eval_batches": eval_batches,
        },
        "environment": environment("cpu"),
        "load_start": load_start,
        "load_end": load_end,
        "runs": [],
    }
    for b, p in names:
        t = times[(b, p)][1:]  # the first step compiles (JAX) or warms up
        full = times[(b, "full")][1:]
        out["runs"].append(
            {
                "backend": b,
                "precision": p,
                "val_loss": val[(b, p)],
                "train_loss_last10": statistics.mean(losses[(b, p)][-10:]),
                "overflow_steps": overflows[(b, p)],
                "step_seconds": stats(t),
                "time_vs_full": paired_ratio({"samples": t}, {"samples": full}),
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="training steps of each trainer")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON written (default: the source of docs/usage.md's table)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny model instead of the default one (the suite's smoke test)",
    )
    a = p.parse_args(argv)
    if a.steps < 12:
        print("charclip.benchmarks.precision: error: --steps must be at least 12", file=sys.stderr)
        return 2
    if a.tiny and a.out == DEFAULT_OUT:
        print(
            "charclip.benchmarks.precision: error: --tiny results do not go to the committed table's source; pass --out",
            file=sys.stderr,
        )
        return 2
    result = measure(
        a.steps,
        a.backends,
        progress=not a.no_progress,
        tiny=a.tiny,
        eval_batches=2 if a.tiny else 16,
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in result["runs"]:
        print(
            f"{r['backend']:5s} {r['precision']:4s} val {r['val_loss']:.4f}  train(last 10) {r['train_loss_last10']:.4f}  "
            f"step {r['step_seconds']['median'] * 1e3:8.0f} ms  x{r['time_vs_full']['median']:.2f} of full  "
            f"overflows {r['overflow_steps']}"
        )
    print(f"load {result['load_start']:.1f} -> {result['load_end']:.1f}; json: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
