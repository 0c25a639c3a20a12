"""`python -m benchmarks.float32_draws`: the ladder's float32 gradient bound on many small draws.

Draws models of the shape where `test_parity_properties.py` found float32 failures (vanilla
RNN, hidden size 1, 2 layers, B = T = 1; vocabulary, embedding, seed and W_hh's spectral
radius drawn as that test draws them), takes one unclipped training step in torch and in
JAX in float32 and in float64, and counts the draws whose float32 gradients differ between
the backends by more than the ladder's bound (each gradient relative to its largest entry).
For each such draw it prints how far each backend's float32 gradient is from the float64
one, which says whose rounding the difference is, and the draw's derived bound (the
largest over the parameters; the ladder compares each parameter with its own). The same --seed examines the same draws
on any version of the code; docs/fast-layer.md quotes a run.
"""

from __future__ import annotations

import argparse

import numpy as np


def draw(rng):
    return (
        int(rng.choice([2, 7])),
        int(rng.choice([1, 3])),
        float(rng.choice([0.5, 1.0, 3.0])),
        int(rng.integers(0, 2**32 - 1)),
    )


def model(vocab: int, embed: int, rho: float, seed: int):
    """(config, float32 weights, x, y, initial state) of one draw, as the test's setups() make it."""
    from charclip.config import ModelConfig
    from charclip.weights import init_params, scale_spectral_radius

    cfg = ModelConfig(
        vocab_size=vocab, cell="rnn", hidden_size=1, num_layers=2, embedding_dim=embed
    )
    params = init_params(cfg, seed, "float32")
    for k in range(cfg.num_layers):
        params[f"rnn.weight_hh_l{k}"] = scale_spectral_radius(params[f"rnn.weight_hh_l{k}"], rho)
    rng = np.random.default_rng(seed)  # x, y and the initial state as the test's setups() draw them
    x, y = rng.integers(0, vocab, (1, 1)), rng.integers(0, vocab, (1, 1))
    h = np.tanh(np.random.default_rng([seed, 1]).standard_normal((2, 1, 1)))
    return cfg, params, x, y, h


def derived_bounds(vocab: int, embed: int, rho: float, seed: int) -> dict[str, float]:
    """The ladder's derived gradient bounds of the draw, by parameter (at least the table's)."""
    from charclip.parity.tolerances import TOLERANCES, at_least, draw_bounds

    _, params, x, y, h = model(vocab, embed, rho, seed)
    b = draw_bounds(params, x, y, h.astype("float32"), "float32")
    return {k: at_least(TOLERANCES["float32"]["grad"], v).rel for k, v in b.grad.items()}


def gradients(vocab: int, embed: int, rho: float, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """One unclipped step's gradients: "torch" and "jax" in float32, "float64" (torch's)."""
    from charclip import backends
    from charclip.config import ClipConfig, TrainConfig

    cfg, params, x, y, h = model(vocab, embed, rho, seed)
    out = {}
    for name, backend, dtype in (
        ("torch", "torch", "float32"),
        ("jax", "jax", "float32"),
        ("float64", "torch", "float64"),
    ):
        train = TrainConfig(
            batch_size=1, seq_len=1, dtype=dtype, beta1=0.0, clip=ClipConfig(mode="none")
        )
        p = {
            k: v.astype(dtype) for k, v in params.items()
        }  # float64: the same float32 values, widened
        trainer = backends.trainer_factory(backend)(
            cfg, train, p, adam=None, device="cpu", hidden={"h": h.astype("float32").astype(dtype)}
        )
        trainer.step(x, y)
        # with beta1 = 0, Adam's first moment after one step is that step's gradient
        out[name] = {
            k[len("exp_avg.") :]: v
            for k, v in trainer.adam_state().items()
            if k.startswith("exp_avg.")
        }
    return out


def worst(a: dict, b: dict) -> tuple[float, str]:
    from charclip.parity.tolerances import errors

    return max((errors(a[k], b[k])[1], k) for k in a)


def main(argv: list[str] | None = None) -> int:
    from charclip.parity.tolerances import TOLERANCES, errors

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.float32_draws", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--draws", type=int, default=300, help="how many models to draw (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument(
        "--only",
        action="append",
        metavar="VOCAB,EMBED,RHO,SEED",
        help="check this draw instead (repeatable): a row of an earlier run's table",
    )
    args = p.parse_args(argv)
    bound = TOLERANCES["float32"]["grad"].rel
    rng = np.random.default_rng(args.seed)
    chosen = [
        (int(v), int(e), float(r), int(s)) for v, e, r, s in (o.split(",") for o in args.only or [])
    ]
    failing = []
    for i in range(len(chosen) or args.draws):
        d = chosen[i] if chosen else draw(rng)
        g = gradients(*d)
        gap = worst(g["torch"], g["jax"])
        if gap[0] > bound:
            t, j = worst(g["float64"], g["torch"]), worst(g["float64"], g["jax"])
            bounds = derived_bounds(*d)
            beyond = [k for k in bounds if errors(g["torch"][k], g["jax"][k])[1] > bounds[k]]
            failing.append((d, gap, t, j, bounds[gap[1]], beyond))
    what = f"{len(chosen)} chosen draws" if chosen else f"{args.draws} draws (seed {args.seed})"
    print(
        f"{what}: {len(failing)} differ between torch and JAX by more than "
        f"the float32 gradient bound {bound:g}\n"
    )
    print(
        "| vocab | embed | rho | seed | torch vs JAX | torch vs float64 | JAX vs float64 "
        "| its derived bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (v, e, rho, seed), gap, t, j, b, _ in failing:
        print(
            f"| {v} | {e} | {rho:g} | {seed} | {gap[0]:.2e} ({gap[1]}) | {t[0]:.2e} | {j[0]:.2e} "
            f"| {b:.2e} |"
        )
    beyond = sum(bool(f[-1]) for f in failing)
    print(f"\n{beyond} of them beyond a parameter's derived bound (charclip.parity.step_bounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
