"""Draw the figures of docs/clipping.md into docs/figures/.

    python docs/make_clipping_figures.py

1. clip_2d.png: one 2-D gradient clipped by norm (same direction, onto the circle of
   radius tau) and by value (each component onto [-v, v]: the square), side by side.
2. clip_run.png: the gradient norm before and after clipping over a synthetic run of a
   small tanh RNN trained by SGD with NumPy, whose recurrent matrix starts with spectral
   radius above 1 so that some steps explode.

Only NumPy and matplotlib: the figures do not depend on either backend. The clipping is
the NumPy witness's (`charclip.witness`, optax's convention), not a copy of it.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from charclip.witness import clip_by_global_norm, global_norm  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"


def draw_2d(path: Path) -> None:
    g = np.array([2.4, 0.9])
    tau = v = 1.0
    by_norm, by_value = clip_by_global_norm({"g": g}, tau)[0]["g"], np.clip(g, -v, v)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, clipped, title in (
        (axes[0], by_norm, "by global norm (tau = 1)"),
        (axes[1], by_value, "by value (v = 1)"),
    ):
        ax.add_patch(
            plt.Circle((0, 0), tau, fill=False, ls="--", color="0.5")
            if ax is axes[0]
            else plt.Rectangle((-v, -v), 2 * v, 2 * v, fill=False, ls="--", color="0.5")
        )
        ax.annotate("", g, (0, 0), arrowprops=dict(arrowstyle="->", color="tab:red", lw=2))
        ax.annotate("", clipped, (0, 0), arrowprops=dict(arrowstyle="->", color="tab:blue", lw=2))
        ax.plot([], [], color="tab:red", label=f"g = ({g[0]:.1f}, {g[1]:.1f})")
        ax.plot([], [], color="tab:blue", label=f"clipped = ({clipped[0]:.2f}, {clipped[1]:.2f})")
        angle = np.degrees(np.arctan2(clipped[1], clipped[0]) - np.arctan2(g[1], g[0]))
        ax.set_title(f"{title}: direction turned {angle:+.1f} deg")
        ax.set_xlim(-1.3, 2.7)
        ax.set_ylim(-1.3, 1.5)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.8)
        ax.axvline(0, color="0.85", lw=0.8)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rnn_gradient(params, xs, ys):
    """Loss and gradient of a tanh RNN with a squared-error readout, by BPTT."""
    w_xh, w_hh, w_hy = params
    hs = [np.zeros(w_hh.shape[0])]
    for x in xs:
        hs.append(np.tanh(w_xh @ x + w_hh @ hs[-1]))  # (H,)
    preds = [w_hy @ h for h in hs[1:]]
    loss = 0.5 * sum(float(np.sum((p - y) ** 2)) for p, y in zip(preds, ys))
    grads = [np.zeros_like(w) for w in params]
    dh_next = np.zeros(w_hh.shape[0])
    for t in reversed(range(len(xs))):
        dy = preds[t] - ys[t]
        grads[2] += np.outer(dy, hs[t + 1])
        dh = w_hy.T @ dy + dh_next
        da = dh * (1 - hs[t + 1] ** 2)  # the diag(1 - h_t^2) of the Jacobian
        grads[0] += np.outer(da, xs[t])
        grads[1] += np.outer(da, hs[t])
        dh_next = w_hh.T @ da  # ... times W_hh: one factor of the product per step back
    return loss, grads


def draw_run(
    path: Path, steps: int = 300, tau: float = 20.0, lr: float = 0.01, radius: float = 1.5
) -> None:
    rng = np.random.default_rng(0)
    hidden, inputs, seq = 16, 4, 40
    w_hh = rng.normal(size=(hidden, hidden))
    w_hh *= radius / max(abs(np.linalg.eigvals(w_hh)))  # spectral radius above 1
    params = [rng.normal(size=(hidden, inputs)) * 0.5, w_hh, rng.normal(size=(1, hidden)) * 0.5]
    before, after = [], []
    for _ in range(steps):
        xs = rng.normal(size=(seq, inputs))
        ys = np.cumsum(xs[:, :1], axis=0) * 0.1  # a target that needs long memory
        _, grads = rnn_gradient(params, xs, ys)
        clipped, norm = clip_by_global_norm(dict(enumerate(grads)), tau)
        before.append(norm)
        after.append(global_norm(clipped))
        params = [w - lr * clipped[i] for i, w in enumerate(params)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.semilogy(before, lw=0.8, color="tab:red", label="global norm before clipping")
    ax.semilogy(after, lw=0.8, color="tab:blue", label="after clipping")
    ax.axhline(tau, ls="--", color="0.4", label=f"tau = {tau}")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("gradient norm")
    clipped = np.mean(np.array(before) >= tau)
    ax.set_title(
        f"tanh RNN, H = {hidden}, T = {seq}, rho(W_hh) = {radius} at start, SGD lr {lr}: "
        f"{clipped:.0%} of steps clipped"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    draw_2d(FIGURES / "clip_2d.png")
    draw_run(FIGURES / "clip_run.png")


if __name__ == "__main__":
    main()
