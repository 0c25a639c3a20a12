"""`python -m benchmarks.layouts`: how fast XLA runs the products of a recurrent layer's backward pass,
by operand layout. The fast layer's layout choices (docs/fast-layer.md) rest on this table.

The weight gradient dW (G, K) = d^T x sums over all T*B rows of d (rows, G) and x (rows, K).
Written as `d.T @ x`, XLA folds the transpose into the dot (a dot contracting both
operands' first dimension); with d^T laid out first it is a plain (G, rows) x (rows, K)
product. Timed alternately; prints one line per form with GFLOP/s and the load.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from charclip.benchmarks.harness import interleaved


def forms(rows: int, g: int, k: int, batch: int):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    barrier = jax.lax.optimization_barrier
    big = 2 * rows * g * k
    small = 2 * batch * g * k
    return {
        "dW = d.T @ x (transpose folded into the dot)": (
            lambda d, x: d.T @ x,
            arr(rows, g),
            arr(rows, k),
            big,
        ),
        "dW = barrier(d.T) @ x (transpose laid out, then plain matmul)": (
            lambda d, x: barrier(d.T) @ x,
            arr(rows, g),
            arr(rows, k),
            big,
        ),
        "dW = dT @ x, dT given (plain matmul alone)": (
            lambda dt, x: dt @ x,
            arr(g, rows),
            arr(rows, k),
            big,
        ),
        "dW^T = x.T @ d": (lambda d, x: x.T @ d, arr(rows, g), arr(rows, k), big),
        "projection x @ W.T (all steps)": (lambda x, w: x @ w.T, arr(rows, k), arr(g, k), big),
        "dx = d @ W (all steps)": (lambda d, w: d @ w, arr(rows, g), arr(g, k), big),
        f"one step h @ W.T ({batch} rows)": (lambda h, w: h @ w.T, arr(batch, k), arr(g, k), small),
        f"one step dh = da @ W ({batch} rows)": (
            lambda a, w: a @ w,
            arr(batch, g),
            arr(g, k),
            small,
        ),
    }


def run(rows: int, g: int, k: int, batch: int, repeats: int) -> dict:
    import jax

    fns, flops = {}, {}
    for name, (fn, a, b, f) in forms(rows, g, k, batch).items():
        jitted = jax.jit(fn)
        fns[name] = lambda jitted=jitted, a=a, b=b: jitted(a, b).block_until_ready()
        flops[name] = f
    load = os.getloadavg()[0]
    res = interleaved(fns, repeats=repeats, warmup=2)
    return {
        "shape": {"rows": rows, "G": g, "K": k, "batch": batch},
        "loadavg": [load, os.getloadavg()[0]],
        "forms": {n: {**s, "flop_per_s": flops[n] / s["median"]} for n, s in res.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.layouts", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--rows", type=int, default=64 * 64, help="T*B (default: the default configuration's 4096)"
    )
    p.add_argument("--gates", type=int, default=1024, help="G = gates x H (default: LSTM, H=256)")
    p.add_argument(
        "--k", type=int, default=256, help="the other operand's width (H, or the input width)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    from charclip.jax.device import enable_x64

    enable_x64()  # as every charclip run has it

    r = run(a.rows, a.gates, a.k, a.batch, a.repeats)
    print(
        f"rows={a.rows} G={a.gates} K={a.k} batch={a.batch}, float32, median of {a.repeats} interleaved; "
        f"load {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f}"
    )
    for name, s in r["forms"].items():
        unit = (s["median"] * 1e6, "us") if s["median"] < 1e-3 else (s["median"] * 1e3, "ms")
        print(f"  {name:64s} {unit[0]:8.2f} {unit[1]}  {s['flop_per_s'] / 1e9:6.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
