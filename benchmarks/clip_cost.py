"""What clipping by global norm costs, against the machine's memory bandwidth.

Clipping reads every gradient entry twice (once for the norm, once to scale it) and
writes it once, so `3 x 4 bytes x parameters` must cross the memory bus at least:
`3 x bytes / measured copy bandwidth` is the fastest any implementation can be once
the gradients no longer fit in cache. The copy bandwidth is measured here too, as
(read + write) bytes per second of a large array copy.

Every implementation clips the same gradients with a threshold far below their norm,
so the scaling really happens, and each call's output is fed to the next call. The
libraries cost the same whether a step clips or not (they are branch-free); ours in
torch skips the multiply by 1 on the CPU, so the torch callables lower the threshold by
10% on every call (`shrinking`): each call clips the previous one's output again.
"""

from __future__ import annotations

import itertools

import numpy as np

from charclip.benchmarks.harness import interleaved, timed
from charclip.config import BACKENDS, DEVICES

MAX_NORM = 1e-3  # far below the norm of N(0, 1) gradients: every call scales


def shrinking():
    """A threshold for each call: MAX_NORM * 0.9**k for k = 0..99, then from the start again
    (one call in 100 then finds the gradient below it; the others all clip)."""
    k = itertools.count()
    return lambda: MAX_NORM * 0.9 ** (next(k) % 100)


def split_sizes(total: int, n_tensors: int) -> list[int]:
    """`n_tensors` sizes summing to `total`, as equal as possible."""
    base, extra = divmod(total, n_tensors)
    return [base + (i < extra) for i in range(n_tensors)]


def copy_bandwidth(n: int, repeats: int) -> dict:
    """(read + write) bytes/s of copying n float32 values, with NumPy and with torch."""
    import torch

    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    ts, td = torch.from_numpy(src), torch.from_numpy(dst)
    res = interleaved(
        {"numpy copyto": lambda: np.copyto(dst, src), "torch copy_": lambda: td.copy_(ts)},
        repeats=repeats,
    )
    moved = 2 * src.nbytes
    out = {name: {**s, "bytes_per_s": moved / s["median"]} for name, s in res.items()}
    return {
        "elements": n,
        "bytes_moved": moved,
        "impls": out,
        "best_bytes_per_s": max(v["bytes_per_s"] for v in out.values()),
    }


def _torch_impls(sizes: list[int], device: str):
    """Callables clipping one set of torch gradients of the given sizes, by implementation name."""
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)

    def params():
        ps = []
        for n in sizes:
            p = torch.nn.Parameter(torch.empty(n, device=dev))  # never read: only .grad is
            p.grad = torch.randn(n, generator=gen).to(dev)
            ps.append(p)
        return ps

    def flat_params():
        """Gradients that are views into one flat buffer, so the whole clip is two kernels."""
        flat = torch.randn(sum(sizes), generator=gen).to(dev)
        ps = []
        for g in torch.split(flat, sizes):
            p = torch.nn.Parameter(torch.empty(g.numel(), device=dev))
            p.grad = g
            ps.append(p)
        return ps, flat

    def flat_clip(flat, tau):
        norm = torch.linalg.vector_norm(flat)
        flat.mul_(torch.clamp(tau / (norm + 1e-6), max=1.0))  # torch's formula, on one buffer
        return norm

    impls = {}
    a, b = params(), params()
    ta, tb = shrinking(), shrinking()
    impls["torch clip_grad_norm_ (foreach)"] = lambda: (
        torch.nn.utils.clip_grad_norm_(a, ta(), foreach=True),
        sync(),
    )
    impls["torch clip_grad_norm_ (per-tensor loop)"] = lambda: (
        torch.nn.utils.clip_grad_norm_(b, tb(), foreach=False),
        sync(),
    )
    try:
        from charclip.torch import clipping
    except ImportError:
        clipping = None
    if clipping is not None:
        # The drop-in as a user calls it (torch's convention), as --clip-impl reference trains with it
        # (optax's convention, for cross-backend parity), and with the exact bound.
        c, d, e = params(), params(), params()
        tc, td, te = shrinking(), shrinking(), shrinking()
        impls["charclip.torch.clipping (ours)"] = lambda: (
            clipping.clip_grad_norm_(c, tc()),
            sync(),
        )
        impls["charclip.torch.clipping (ours, optax convention)"] = lambda: (
            clipping.clip_grad_norm_(d, td(), convention="optax"),
            sync(),
        )
        impls["charclip.torch.clipping (ours, strict)"] = lambda: (
            clipping.clip_grad_norm_(e, te(), strict=True),
            sync(),
        )
    _, flat = flat_params()
    tf = shrinking()
    impls["torch flat buffer"] = lambda: (flat_clip(flat, tf()), sync())
    return impls


def _jax_impls(sizes: list[int], device: str):
    """Callables clipping one pytree of JAX gradients, each jitted with its input donated (updated in place)."""
    import jax
    import jax.numpy as jnp
    import optax

    dev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    rng = np.random.default_rng(0)

    def tree():
        return jax.device_put(
            {f"g{i:04d}": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)},
            dev,
        )

    def driver(fn, state):
        """Feed each call's output to the next: the donated input buffer is reused for the output."""
        jitted = jax.jit(fn, donate_argnums=0)
        box = [state]

        def run():
            box[0] = jax.block_until_ready(jitted(box[0]))

        return run

    impls = {}
    tx = optax.clip_by_global_norm(MAX_NORM)
    empty = tx.init(None)
    impls["optax.clip_by_global_norm (jit)"] = driver(lambda g: tx.update(g, empty)[0], tree())
    try:
        from charclip.jax import clipping

        # Ours as a user swaps it in: the same stateless transform, called the same way.
        ours, strict = (
            clipping.clip_by_global_norm(MAX_NORM),
            clipping.clip_by_global_norm(MAX_NORM, strict=True),
        )
        impls["charclip.jax.clipping.clip_by_global_norm (jit)"] = driver(
            lambda g: ours.update(g, None)[0], tree()
        )
        impls["charclip.jax.clipping.clip_by_global_norm strict (jit)"] = driver(
            lambda g: strict.update(g, None)[0], tree()
        )
    except ImportError:
        pass

    def flat_clip(flat):
        norm = jnp.sqrt(jnp.sum(jnp.square(flat)))
        return jnp.where(
            norm < MAX_NORM, flat, flat / norm * MAX_NORM
        )  # optax's formula, on one buffer

    impls["jax flat buffer (jit)"] = driver(
        flat_clip, jax.device_put(rng.standard_normal(sum(sizes), dtype=np.float32), dev)
    )
    return impls


def clip_times(sizes: list[int], *, device: str, repeats: int, backends=("torch", "jax")) -> dict:
    """Median/min/max seconds of each clipping implementation on gradients of `sizes`, timed alternately.

    The first call of each (a JAX compile, a torch warm-up) is timed apart as `first_call_s`.
    """
    impls = {}
    if "torch" in backends:
        impls.update(_torch_impls(sizes, device))
    if "jax" in backends:
        impls.update(_jax_impls(sizes, device))
    first = {name: timed(fn)[1] for name, fn in impls.items()}
    res = interleaved(impls, repeats=repeats, warmup=1)
    n = sum(sizes)
    moved = 3 * 4 * n
    return {
        "params": n,
        "tensors": len(sizes),
        "bytes_min": moved,
        "impls": {
            name: {**s, "first_call_s": first[name], "bytes_per_s": moved / s["median"]}
            for name, s in res.items()
        },
    }


def model_grad_sizes(model_cfg) -> list[int]:
    """Sizes of the parameter tensors of a char-RNN (the gradients clipped in one training step)."""
    from charclip.weights import param_shapes

    return [int(np.prod(s)) for s in param_shapes(model_cfg).values()]


def clip_in_step(case, *, device: str, repeats: int) -> dict:
    """Isolated clip time on the default model's gradient shapes, next to a full step (both backends)."""
    from charclip.benchmarks.training import tokens

    model_cfg, _ = case.configs(tokens()[1])
    sizes = model_grad_sizes(model_cfg)
    return {"case": case.label, **clip_times(sizes, device=device, repeats=repeats)}


def memory_bound_s(n_params: int, copy_bytes_per_s: float) -> float:
    """Physical lower bound of one clip: 3 x 4 bytes per float32 parameter at the copy bandwidth."""
    return 3 * 4 * n_params / copy_bytes_per_s


def side_by_side(
    layouts: dict[str, list[int]], *, device: str, repeats: int, backends: tuple[str, ...]
) -> str:
    """A markdown table: each implementation's median clip time next to the library's, in one
    interleaved run per layout (a label and its tensor sizes), with GB/s and the share of
    the measured copy bandwidth."""
    import os

    load_before = os.getloadavg()
    params = max(sum(sizes) for sizes in layouts.values())
    bw = copy_bandwidth(params, repeats)
    best = bw["best_bytes_per_s"]
    lines = [
        f"Copy bandwidth ({params:.0e} float32, read + write): "
        + ", ".join(f"{n} {v['bytes_per_s'] / 1e9:.2f} GB/s" for n, v in bw["impls"].items()),
        "",
        "| tensors | implementation | median ms (min-max) | vs library | GB/s | % of copy bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    for k, sizes in layouts.items():
        res = clip_times(sizes, device=device, repeats=repeats, backends=backends)
        library = {
            "torch": res["impls"].get("torch clip_grad_norm_ (foreach)"),
            "jax": res["impls"].get("optax.clip_by_global_norm (jit)"),
        }
        for name, v in res["impls"].items():
            lib = library["torch" if name.startswith("torch") else "jax"]
            ratio = f"{v['median'] / lib['median']:.2f}x" if lib else ""
            lines.append(
                f"| {k} | {name} | {v['median'] * 1e3:.3g} ({v['min'] * 1e3:.3g}-{v['max'] * 1e3:.3g}) | {ratio} "
                f"| {v['bytes_per_s'] / 1e9:.2f} | {100 * v['bytes_per_s'] / best:.0f}% |"
            )
    load = f"before: {', '.join(f'{x:.2f}' for x in load_before)}; after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    lines += ["", f"Load average (1, 5, 15 min) {load}; {repeats} interleaved repeats."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.clip_cost`: the clip-cost targets alone (1e8 parameters in 1 and 1000 tensors)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.clip_cost", description=main.__doc__)
    p.add_argument("--params", type=float, default=1e8)
    p.add_argument("--tensors", type=int, nargs="+", default=[1, 1000])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument(
        "--in-step",
        action="store_true",
        help="the default model's gradient shapes (one training step's clip)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the table to FILE (markdown)")
    a = p.parse_args(argv)
    if a.in_step:
        from charclip.benchmarks.training import Case, tokens

        sizes = model_grad_sizes(Case.default().configs(tokens()[1])[0])
        layouts = {f"default step ({len(sizes)})": sizes}
    else:
        layouts = {str(k): split_sizes(int(a.params), k) for k in a.tensors}
    table = side_by_side(layouts, device=a.device, repeats=a.repeats, backends=tuple(a.backends))
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
