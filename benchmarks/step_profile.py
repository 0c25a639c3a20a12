"""`python -m benchmarks.step_profile`: where one training step's time goes, JAX and torch.

JAX: each piece of the fast layer's step is jitted on its own, with the default model's
shapes, and all pieces are timed alternately (medians; the load is printed): the whole
step, its loss and gradients, the recurrent matmuls alone (one per step, in a loop as the
layer runs them), the gate elementwise work alone (the same loops without the matmul), the
weight-gradient and input-side GEMMs over all T*B rows, the head, and clipping plus Adam.
The pieces are measured apart, so their sum differs from the whole step by what the
step's own program does differently (fusion across pieces, buffers, loop bookkeeping).

torch: `torch.profiler` over the same number of whole steps, CPU time per operator
(self time, so nothing is counted twice), grouped into the same headings where an
operator belongs to one (oneDNN's fused LSTM, forward and backward, is one operator each).

`--trace N`: instead, the JAX step's own program, traced with `jax.profiler` (run with
XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true): the time of each of its N largest operations
(XLA's fused kernels, by name, summed over the loop's iterations), per step. The names are
those of the optimized HLO (`jax.jit(...).lower(...).compile().as_text()`).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from charclip.benchmarks.harness import interleaved
from charclip.benchmarks.training import Case, batches, trainers


def _jax_pieces(case: Case, t, data):
    import jax
    import jax.numpy as jnp

    from charclip.config import GATES
    from charclip.jax import fastrnn
    from charclip.jax import model as M
    from charclip.jax import train as TR

    cfg, mcfg = t.cfg, t.model_cfg
    p, state = t.params, t._hidden_for(case.batch)
    x, y = (jnp.asarray(a) for a in data[0])
    hid, g = case.hidden, GATES[case.cell] * case.hidden
    rows = case.batch * case.seq
    rng = np.random.default_rng(0)

    def arr(*shape, scale=0.1):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    w_hh, b_hh = p["rnn.weight_hh_l1"], p["rnn.bias_hh_l1"]
    xw = arr(case.seq, case.batch, g)
    st = tuple(part[1] for part in state)
    cell = case.cell
    fwd_step = fastrnn._FORWARD[cell]
    bwd_step = fastrnn._BACKWARD[cell]
    _, _, saved = jax.jit(fastrnn._scan_forward, static_argnums=(0, 5))(cell, xw, st, w_hh, b_hh, 1)
    hs = arr(case.seq, case.batch, hid)
    dhs = arr(case.seq, case.batch, hid)
    extra = saved[-1] if cell == "lstm" else hs

    def sync(f):
        return lambda *a: jax.block_until_ready(f(*a))

    # recurrent matmuls alone: one (B, H) x (H, G) product per step, carried as the layer does
    def rec_fwd(w_t, h0):
        def body(h, _):
            return (h @ w_t)[:, :hid], None

        return jax.lax.scan(body, h0, None, length=case.seq)[0]

    def rec_bwd(w, d):
        def body(dh, d_t):
            return (d_t + jnp.tile(dh, (1, g // hid))) @ w, None

        return jax.lax.scan(body, jnp.zeros((case.batch, hid), jnp.float32), d)[0]

    # gate elementwise work alone: the same loops with each matmul replaced by a slice or a
    # broadcast of its operand (`_NoMatmul`), so only the elementwise work and the loop remain
    def gates_fwd(xw, st):
        def body(carry, xw_t):
            return fwd_step(_NoMatmul(g), jnp.zeros((1, g), jnp.float32), carry, xw_t)

        return jax.lax.scan(body, st, xw)

    def gates_bwd(dhs, hs, saved, extra):
        def body(carry, xs):
            return bwd_step(_NoMatmul(hid), carry, xs)

        return jax.lax.scan(body, st, (dhs, hs, saved, extra), reverse=True)

    def layer_fwd(xw, st, w, b):
        return fastrnn.layer(cell, xw, st, w, b, 1)

    def layer_fwd_bwd(xw, st, w, b, dhs):
        out, vjp = jax.vjp(lambda *a: fastrnn.layer(cell, *a, 1), xw, st, w, b)
        zeros = jax.tree.map(jnp.zeros_like, out[1])
        return vjp((dhs, zeros))

    d_all, h_all = arr(case.seq, case.batch, g), arr(case.seq, case.batch, hid)
    w_ih = p["rnn.weight_ih_l1"]

    def head_fwd_bwd(seq, w, b, y):
        def f(seq, w, b):
            logits = seq @ w.T + b[None, None, :]
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, y.T[..., None], axis=-1))

        return jax.grad(f, argnums=(0, 1, 2))(seq, w, b)

    grads = jax.jit(lambda p, x, y, s: TR.loss_and_grads(mcfg, cfg, p, x, y, s)[1])(p, x, y, state)
    measure = TR.gradient_norm(cfg)

    def opt(grads, opt_state, params):
        norm = measure(grads)
        upd, new = TR.optax_update(t.tx, grads, opt_state, params)
        return TR.optax.apply_updates(params, upd), new, norm

    def table0(p, x):
        return jax.grad(lambda p: jnp.sum(fastrnn.input_table(p, x.T)[x.T]))(p)

    lg = jax.jit(lambda p, x, y, s: TR.loss_and_grads(mcfg, cfg, p, x, y, s))
    loss_only = jax.jit(lambda p, x, y, s: M.loss(p, x, y, s, cfg=mcfg, layer="fast"))
    n_layers = case.layers
    L = f" x{n_layers} layers" if n_layers > 1 else ""
    pieces = {
        "whole step (Trainer.step)": lambda: t.step(*data[0]),
        "loss and gradients (no clip, no Adam)": lambda: jax.block_until_ready(lg(p, x, y, state)),
        "forward only (loss)": lambda: jax.block_until_ready(loss_only(p, x, y, state)),
        f"layer forward (one layer; {L.strip() or '1 layer'} in the step)": (
            functools_partial(sync(jax.jit(layer_fwd)), xw, st, w_hh, b_hh)
        ),
        "layer forward + backward (one layer)": functools_partial(
            sync(jax.jit(layer_fwd_bwd)), xw, st, w_hh, b_hh, dhs
        ),
        "recurrent matmul, forward loop (one layer)": functools_partial(
            sync(jax.jit(rec_fwd)), w_hh.T, st[0]
        ),
        "recurrent matmul, backward loop (one layer)": functools_partial(
            sync(jax.jit(rec_bwd)), w_hh, d_all
        ),
        "gate elementwise, forward loop (one layer)": functools_partial(
            sync(jax.jit(gates_fwd)), xw, st
        ),
        "gate elementwise, backward loop (one layer)": functools_partial(
            sync(jax.jit(gates_bwd)), dhs, hs, saved, extra
        ),
        "weight-gradient GEMM dW = d^T h (one weight)": functools_partial(
            sync(jax.jit(fastrnn._weight_grad)), d_all, h_all
        ),
        "input projection x W^T, all steps (layer 1)": functools_partial(
            sync(jax.jit(lambda a, w: a @ w.T)), h_all, w_ih
        ),
        "input gradient d W, all steps (layer 1)": functools_partial(
            sync(jax.jit(lambda d, w: d @ w)), d_all, w_ih
        ),
        "layer 0 table, forward + backward": functools_partial(sync(jax.jit(table0)), p, x),
        "head + softmax, forward + backward": functools_partial(
            sync(jax.jit(head_fwd_bwd)), h_all, p["head.weight"], p["head.bias"], y
        ),
        "clip + Adam": functools_partial(sync(jax.jit(opt)), grads, t.opt_state, p),
    }
    counts = {
        "layer forward": n_layers,
        "layer forward + backward": n_layers,
        "recurrent matmul, forward": n_layers,
        "recurrent matmul, backward": n_layers,
        "gate elementwise, forward": n_layers,
        "gate elementwise, backward": n_layers,
        "weight-gradient GEMM": 2 * n_layers - 1,
        "input projection": n_layers - 1,
        "input gradient": n_layers - 1,
    }
    flops = {
        "recurrent matmul": 2 * rows * hid * g,
        "weight-gradient GEMM": 2 * rows * hid * g,
        "input projection": 2 * rows * hid * g,
        "input gradient": 2 * rows * hid * g,
    }
    return pieces, counts, flops


class _NoMatmul:
    """Stands for a weight matrix in `a @ w`: returns a's first `width` columns, or a tiled to
    `width` columns, the product's shape without its work."""

    def __init__(self, width: int):
        self.width = width

    def __rmatmul__(self, a):
        import jax.numpy as jnp

        n = a.shape[-1]
        return a[:, : self.width] if n >= self.width else jnp.tile(a, (1, self.width // n))


def functools_partial(f, *args):
    return lambda: f(*args)


def _torch_profile(t, data, steps: int) -> list[tuple[str, float, int]]:
    """(operator, self CPU ms per step, calls per step) for torch's step, largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):
        t.step(*data[i % len(data)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            t.step(*data[i % len(data)])
    rows = []
    for e in prof.key_averages():
        rows.append((e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps))
    rows.sort(key=lambda r: -r[1])
    del torch
    return rows


def _trace(case: Case, t, data, steps: int, top: int) -> None:
    """Per-operation time of the JAX step's program, from a `jax.profiler` trace."""
    import collections
    import glob
    import tempfile

    import jax
    from jax._src.lib import _profile_data  # jax's reader of the trace (xplane.pb) files

    for i in range(2):
        t.step(*data[i % len(data)])
    folder = tempfile.mkdtemp(prefix="charclip-trace-")
    jax.profiler.start_trace(folder)
    for i in range(steps):
        t.step(*data[i % len(data)])
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
    total, calls = collections.Counter(), collections.Counter()
    for plane in _profile_data.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # the thread that runs the compiled program
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor"):
                    continue
                total[ev.name] += ev.duration_ns
                calls[ev.name] += 1
    print(f"{case.label}: the JAX step's operations, ms per step (mean of {steps} traced steps)\n")
    print("| operation (optimized HLO) | ms per step | calls per step |")
    print("|---|---|---|")
    for name, ns in total.most_common(top):
        print(f"| {name} | {ns / 1e6 / steps:.2f} | {calls[name] // steps} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__)
    ap.add_argument("--cell", default="lstm", choices=("rnn", "lstm", "gru"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=14, help="torch operators listed")
    ap.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="N",
        help="trace the JAX step instead and list its N largest operations",
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    case = Case.default(cell=args.cell)
    data = batches(case, 4)
    if args.trace:
        _trace(case, trainers(case, "cpu", ("jax",))["jax"], data, args.repeats, args.trace)
        return 0
    tr = trainers(case, "cpu", ("torch", "jax"))
    load0 = os.getloadavg()[0]
    pieces, counts, flops = _jax_pieces(case, tr["jax"], data)
    pieces["torch whole step (Trainer.step)"] = lambda: tr["torch"].step(*data[0])
    res = interleaved(pieces, repeats=args.repeats, warmup=1)
    load1 = os.getloadavg()[0]
    print(
        f"{case.label}, float32, one core; median of {args.repeats} interleaved rounds; "
        f"load {load0:.1f} -> {load1:.1f}\n"
    )
    step = res["whole step (Trainer.step)"]["median"]
    print(
        "| JAX piece (each jitted alone) | ms | x per step | ms per step | share of step "
        "| GFLOP/s |"
    )
    print("|---|---|---|---|---|---|")
    for name, s in res.items():
        if name.startswith("torch"):
            continue
        k = next((v for key, v in counts.items() if name.startswith(key)), 1)
        f = next((v for key, v in flops.items() if name.startswith(key)), None)
        ms = s["median"] * 1e3
        rate = f"{f / s['median'] / 1e9:.1f}" if f else ""
        print(f"| {name} | {ms:.2f} | {k} | {ms * k:.2f} | {ms * k / step / 1e3:.0%} | {rate} |")
    tstep = res["torch whole step (Trainer.step)"]["median"]
    print(f"\ntorch whole step: {tstep * 1e3:.2f} ms (JAX/torch time {step / tstep:.2f})\n")
    prof = _torch_profile(tr["torch"], data, max(3, args.repeats // 2))
    total = sum(r[1] for r in prof)
    print(f"torch.profiler, self CPU time per step (sum {total:.1f} ms), top {args.top}:\n")
    print("| torch operator | ms per step | calls per step | share |")
    print("|---|---|---|---|")
    for name, ms, n in prof[: args.top]:
        print(f"| {name} | {ms:.2f} | {n} | {ms / total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
