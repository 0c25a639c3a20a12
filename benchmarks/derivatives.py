"""`python -m benchmarks.derivatives`: how accurate the float32 activation derivatives are.

Over a fine grid of pre-activations a >= 0 (both functions are symmetric about 0, so the
negative side's errors are those of the positive side, and of 1 - s for the sigmoid), it
prints the worst relative error against float64 of:

- torch's autograd (tanh' = 1 - y^2 and sigmoid' = y (1 - y), from the rounded output y);
- JAX's autodiff, which the `lax.scan` reference uses (tanh' = (1 - y)(1 + y),
  sigmoid' = y (1 - y));
- the fast layer's (`charclip.jax.fastrnn`): tanh' from the pre-activation (`fastrnn.tanh_grad`),
  sigmoid' = s (1 - s) as torch.

docs/fast-layer.md quotes this table.
"""

from __future__ import annotations

import argparse

import numpy as np

RANGES = ((0.0, 3.0), (3.0, 6.0), (6.0, 9.0))


def _torch_grad(fn, a: np.ndarray) -> np.ndarray:
    import torch

    x = torch.tensor(a, requires_grad=True)
    fn(x).sum().backward()
    return x.grad.numpy()


def table(points: int) -> list[tuple[str, str, list[float]]]:
    import jax
    import jax.numpy as jnp
    import torch

    from charclip.jax import fastrnn

    a = np.linspace(0.0, RANGES[-1][1], points, dtype=np.float32)
    a64 = a.astype(np.float64)
    e = np.exp(-a64)
    truth = {"tanh": 4 * e * e / (1 + e * e) ** 2, "sigmoid": e / (1 + e) ** 2}
    aj = jnp.asarray(a)

    def autodiff(fn):
        return np.asarray(jax.jit(jax.vmap(jax.grad(fn)))(aj))

    def sigmoid_from_output(x):
        s = jax.nn.sigmoid(x)
        return s * (1 - s)

    rows = [
        ("tanh", "torch autograd", _torch_grad(torch.tanh, a)),
        ("tanh", "JAX autodiff (scan reference)", autodiff(jnp.tanh)),
        ("tanh", "fast layer (fastrnn.tanh_grad)", np.asarray(jax.jit(fastrnn.tanh_grad)(aj))),
        ("sigmoid", "torch autograd", _torch_grad(torch.sigmoid, a)),
        ("sigmoid", "JAX autodiff (scan reference)", autodiff(jax.nn.sigmoid)),
        ("sigmoid", "fast layer (s (1 - s))", np.asarray(jax.jit(sigmoid_from_output)(aj))),
    ]
    out = []
    for fn, who, d in rows:
        rel = np.abs(d.astype(np.float64) - truth[fn]) / truth[fn]
        out.append((fn, who, [float(rel[(a >= lo) & (a < hi)].max()) for lo, hi in RANGES]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.derivatives", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--points", type=int, default=200_001, help="grid points over [0, 9] (default 200001)"
    )
    args = p.parse_args(argv)
    head = " | ".join(f"|a| in [{lo:g}, {hi:g})" for lo, hi in RANGES)
    print(f"worst relative error of the float32 derivative against float64, {args.points} points\n")
    print(f"| function | computed by | {head} |")
    print("|---|---|" + "---|" * len(RANGES))
    for fn, who, errs in table(args.points):
        print(f"| {fn} | {who} | " + " | ".join(f"{x:.1e}" for x in errs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
