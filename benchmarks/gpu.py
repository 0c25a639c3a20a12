"""`python -m benchmarks.gpu`: the GPU check in one command (about 8 minutes on one H100/H200).

1. The parity ladder on the device for rnn, lstm and gru in float32 and float64, with
   full float32 precision pinned on both sides (no TF32), plus the JAX fast layer's
   gradients against autodiff of the `lax.scan` reference, float64, on the device.
2. One training step: torch (+cuDNN on a GPU) vs JAX fast layer vs JAX scan, each cell
   at the default size, timed alternately; and `jax.experimental.rnn` (cuDNN's LSTM
   through JAX, forward + backward of the recurrent layers only) where it runs.
3. Clipping by global norm at 1e8 and 1e9 parameters against the device's copy bandwidth.

Writes results.json and results.md to benchmarks/results/<gpu-name>/ (or --out).
`--device cpu --tiny` runs the same code on a tiny grid (the suite's smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from charclip.benchmarks import harness
from charclip.benchmarks.suite import RESULTS
from charclip.config import DEVICES


@dataclasses.dataclass(frozen=True)
class Grid:
    parity: dict  # keyword arguments of charclip.parity.run_parity
    cells: tuple[str, ...]
    dtypes: tuple[str, ...]
    case: dict  # changes to the default benchmark case
    repeats: int
    clip_params: tuple[int, ...]


FULL = Grid(
    parity=dict(steps=50),
    cells=("rnn", "lstm", "gru"),
    dtypes=("float32", "float64"),
    case={},
    repeats=9,
    clip_params=(10**8, 10**9),
)
# Every code path once, at sizes that compile and run in seconds: the suite's smoke test.
TINY = Grid(
    parity=dict(
        steps=2,
        hidden_size=6,
        embedding_dim=3,
        batch_size=2,
        seq_len=5,
        sample_chars=20,
        corpus_chars=5000,
    ),
    cells=("lstm",),
    dtypes=("float64",),
    case=dict(hidden=8, layers=2, embed=4, batch=2, seq=4),
    repeats=2,
    clip_params=(10**4,),
)


def sync(device: str):
    import torch

    if device == "gpu":
        torch.cuda.synchronize()


def parity_ladder(grid: Grid, device: str) -> list[dict]:
    """charclip.parity's ladder for every cell and dtype (full precision pinned on a GPU, by run_parity)."""
    from charclip import parity

    out = []
    for dtype in grid.dtypes:
        for cell in grid.cells:
            rep = parity.run_parity(cell, 2, dtype, device=device, progress=False, **grid.parity)
            worst = max(
                rep.rows, key=lambda r: r.max_rel / r.tol if r.tol > 0 else float(r.max_rel > 0)
            )
            out.append(
                {
                    "cell": cell,
                    "dtype": dtype,
                    "layers": rep.config["layers"],
                    "ok": rep.ok,
                    "notes": rep.notes,
                    "failed": [r.quantity for r in rep.rows if not r.ok],
                    "worst": {
                        "quantity": worst.quantity,
                        "max_rel": worst.max_rel,
                        "tol": worst.tol,
                    },
                }
            )
    return out


def fast_vs_scan(grid: Grid, device: str) -> list[dict]:
    """float64 gradients of the JAX fast layer against autodiff of the scan reference, on the device."""
    import jax
    import jax.numpy as jnp

    from charclip.config import ModelConfig
    from charclip.jax import model as M
    from charclip.jax.device import resolve as device_of
    from charclip.weights import init_params

    dev = device_of(device)
    p = grid.parity
    hidden, embed, batch, seq = (
        p.get(k, d)
        for k, d in (("hidden_size", 32), ("embedding_dim", 16), ("batch_size", 8), ("seq_len", 32))
    )
    out = []
    for cell in grid.cells:
        cfg = ModelConfig(
            vocab_size=11, cell=cell, hidden_size=hidden, num_layers=2, embedding_dim=embed
        )
        params = jax.device_put(
            {k: jnp.asarray(v) for k, v in init_params(cfg, 0, "float64").items()}, dev
        )
        rng = np.random.default_rng(0)
        x, y = (jax.device_put(rng.integers(0, 11, (batch, seq)), dev) for _ in range(2))
        state = jax.device_put(
            tuple(
                jnp.asarray(rng.normal(size=(2, batch, hidden)))
                for _ in M.zero_state(cfg, batch, jnp.float64)
            ),
            dev,
        )
        grads = {
            layer: jax.jit(
                jax.grad(lambda q, layer=layer: M.loss(q, x, y, state, cfg=cfg, layer=layer)[0])
            )(params)
            for layer in ("scan", "fast")
        }
        rel = max(
            float(jnp.max(jnp.abs(grads["fast"][k] - g)) / max(float(jnp.max(jnp.abs(g))), 1.0))
            for k, g in grads["scan"].items()
        )
        out.append(
            {"cell": cell, "max_rel_diff": rel, "ok": rel <= 1e-12}
        )  # the bound of parity_tests/parity/test_fast_layer.py
    return out


def jax_cudnn_lstm(case, device: str, repeats: int) -> dict:
    """Forward + backward of `jax.experimental.rnn.lstm` (cuDNN; GPU only) for the case's recurrent layers."""
    if device != "gpu":
        return {"skipped": "jax.experimental.rnn runs on a GPU only"}
    try:
        import jax
        import jax.numpy as jnp
        from jax.experimental import rnn

        h, L = case.hidden, case.layers
        key = jax.random.key(0)
        w = rnn.init_lstm_weight(key, case.embed, h, L, False)
        x = jax.random.normal(key, (case.batch, case.seq, case.embed), jnp.float32)
        h0 = c0 = jnp.zeros((L, case.batch, h), jnp.float32)
        lengths = jnp.full((case.batch,), case.seq, jnp.int32)

        def loss(w, x):
            y, _, _ = rnn.lstm(x, h0, c0, w, lengths, case.embed, h, L, 0.0, False)
            return jnp.sum(y)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        first = harness.timed(lambda: jax.block_until_ready(step(w, x)))[1]
        res = harness.interleaved(
            {"jax.experimental.rnn.lstm fwd+bwd": lambda: jax.block_until_ready(step(w, x))},
            repeats=repeats,
            warmup=1,
        )
        return {"first_call_s": first, **res}
    except (
        Exception
    ) as e:  # experimental API: report what failed instead of failing the whole check
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def throughput(grid: Grid, device: str) -> dict:
    from charclip.benchmarks import training
    from charclip.benchmarks.training import Case

    rows = [
        training.throughput(
            Case.default(cell=cell, **grid.case), device=device, repeats=grid.repeats
        )
        for cell in grid.cells
    ]
    lstm = Case.default(cell="lstm", **grid.case)
    return {
        "rows": rows,
        "jax_cudnn_lstm": {"label": lstm.label, **jax_cudnn_lstm(lstm, device, grid.repeats)},
        "peak": training.sgemm_peak(device, grid.repeats, n=8192 if device == "gpu" else 256),
    }


def copy_bandwidth(n: int, device: str, repeats: int) -> dict:
    """(read + write) bytes/s of a torch device-to-device copy of n float32 values: the clipping bound."""
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync(device)

    res = harness.interleaved({"torch copy_": copy}, repeats=repeats, warmup=2)["torch copy_"]
    return {"elements": n, **res, "bytes_per_s": 2 * 4 * n / res["median"]}


def clipping(grid: Grid, device: str) -> list[dict]:
    from charclip.benchmarks import clip_cost

    out = []
    for n in grid.clip_params:
        bw = copy_bandwidth(n, device, grid.repeats)
        try:
            t = clip_cost.clip_times(
                clip_cost.split_sizes(n, 10), device=device, repeats=grid.repeats
            )
        except Exception as e:  # e.g. out of device memory at 1e9
            out.append(
                {
                    "params": n,
                    "copy": bw,
                    "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                }
            )
            continue
        for s in t["impls"].values():
            s["share_of_copy_bandwidth"] = s["bytes_per_s"] / bw["bytes_per_s"]
        out.append({"params": n, "copy": bw, **t})
        _free(device)
    return out


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "gpu":
        import torch

        torch.cuda.empty_cache()


def markdown(r: dict) -> str:
    env = r["environment"]
    ms = lambda s: f"{s['median'] * 1e3:.3g}"  # noqa: E731
    lines = [
        f"# charclip GPU check: {r['machine']}",
        "",
        f"{env['time']}; torch {env['versions']['torch']}, jax {env['versions']['jax']}; devices {env['jax_devices']}; "
        f"load {env['loadavg'][0]:.1f}; {r['total_seconds']:.0f} s in all.",
        "",
        "## Parity ladder on the device (full float32 precision pinned)",
        "",
        "| cell | layers | dtype | ok | worst rung (max rel / tol) | failed |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["parity"]:
        w = p["worst"]
        lines.append(
            f"| {p['cell']} | {p['layers']} | {p['dtype']} | {'yes' if p['ok'] else '**NO**'} | "
            f"{w['quantity']}: {w['max_rel']:.1e} / {w['tol']:.0e} | {', '.join(p['failed']) or '-'} |"
        )
    lines += [
        "",
        "JAX fast layer vs autodiff of the scan, float64 gradients (max |diff| / max(|grad|, 1)): "
        + ", ".join(
            f"{f['cell']} {f['max_rel_diff']:.1e}{'' if f['ok'] else ' **over 1e-12**'}"
            for f in r["fast_vs_scan"]
        ),
        "",
    ]
    t = r["throughput"]
    peak = t["peak"]["peak_flop_per_s"]
    lines += [
        "## One training step (ms; torch/JAX: median per-round ratio, > 1: JAX faster)",
        "",
        f"sgemm peak ({t['peak']['n']}x{t['peak']['n']}, float32): {peak / 1e9:.0f} GFLOP/s. The step and the peak run at each "
        "framework's default matmul precision (JAX's float32 default may use TF32 on a GPU; the parity ladder above "
        "pins full precision).",
        "",
        "| configuration | torch | JAX fast | JAX scan | torch/JAX fast | torch/JAX scan | % of peak torch / fast / scan |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in t["rows"]:
        pct = " / ".join(f"{row[b]['flop_per_s'] / peak:.0%}" for b in ("torch", "jax", "jax_scan"))
        lines.append(
            f"| {row['label']} | {ms(row['torch'])} | {ms(row['jax'])} | {ms(row['jax_scan'])} | "
            f"**{row['ratios']['jax']['median']:.2f}** | {row['ratios']['jax_scan']['median']:.2f} | {pct} |"
        )
    c = t["jax_cudnn_lstm"]
    lines += [
        "",
        f"jax.experimental.rnn (cuDNN LSTM, recurrent layers only, fwd+bwd), {c['label']}: "
        + (
            f"skipped: {c['skipped']}"
            if "skipped" in c
            else f"{ms(c['jax.experimental.rnn.lstm fwd+bwd'])} ms"
        ),
        "",
        "## Clipping by global norm against the device's copy bandwidth",
        "",
        "| parameters | copy GB/s | implementation: ms (share of copy bandwidth) |",
        "|---|---|---|",
    ]
    for row in r["clipping"]:
        impls = row.get("skipped") or ", ".join(
            f"{n}: {ms(s)} ({s['share_of_copy_bandwidth']:.0%})" for n, s in row["impls"].items()
        )
        lines.append(f"| {row['params']:.0e} | {row['copy']['bytes_per_s'] / 1e9:.0f} | {impls} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", choices=DEVICES, default="gpu")
    p.add_argument(
        "--tiny", action="store_true", help="a tiny grid (seconds): checks that the script runs"
    )
    p.add_argument(
        "--out", metavar="DIR", help="results folder (default: benchmarks/results/<gpu-name>)"
    )
    args = p.parse_args(argv)
    import torch

    from charclip.jax.device import enable_x64

    enable_x64()  # as every charclip run has it

    if args.device == "gpu" and not torch.cuda.is_available():
        print(
            "charclip.benchmarks.gpu: error: PyTorch sees no CUDA GPU; use --device cpu --tiny to check the script",
            file=sys.stderr,
        )
        return 2
    grid = TINY if args.tiny else FULL
    machine = harness.machine_name(args.device)
    out = Path(args.out) if args.out else RESULTS / (machine + ("-tiny" if args.tiny else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = {
        "machine": machine,
        "grid": dataclasses.asdict(grid),
        "environment": harness.environment(args.device),
    }
    for name, fn in (
        ("parity", parity_ladder),
        ("fast_vs_scan", fast_vs_scan),
        ("throughput", throughput),
        ("clipping", clipping),
    ):
        t = time.perf_counter()
        r[name] = fn(grid, args.device)
        print(
            f"charclip.benchmarks.gpu: {name} done in {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    r["total_seconds"] = time.perf_counter() - t0
    r["loadavg_end"] = list(os.getloadavg())
    md = markdown(r)
    (out / "results.json").write_text(json.dumps(r, indent=1, default=float) + "\n")
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"\nresults: {out}/results.json and results.md")
    return 0 if all(x["ok"] for x in r["parity"] + r["fast_vs_scan"]) else 1


if __name__ == "__main__":
    sys.exit(main())
