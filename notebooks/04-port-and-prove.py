# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Port and prove
#
# You have a model in PyTorch and you have rewritten it in JAX. Does the JAX version compute
# *the same thing*, forward and backward, through clipping and an optimizer step? "The loss
# looks similar" is not an answer: a wrong backward pass can leave the forward pass, and the
# first loss, exactly right.
#
# charclip proves its own char-RNN port with a ladder of comparisons (llm.c's idea): the
# forward output, the loss, every gradient by name, the global norm, the clipped gradients,
# one optimizer step, a short trajectory. `charclip.parity.prove_port` runs that ladder for
# a model of yours: a torch `nn.Module` and a JAX function over its `state_dict`. Here the
# model is not charclip's: a two-layer MLP with ReLU, trained with MSE, SGD and norm clipping.

# %%
# Install charclip where it is missing (Colab, a fresh environment). Where charclip is
# importable already, as in the repository's own test run, this cell does nothing.
import importlib
import importlib.util
import os
import pathlib

if importlib.util.find_spec("charclip") is None:
    # In a clone of the repository, the folder above this notebook is charclip's source.
    # Elsewhere (Colab), set CHARCLIP_SOURCE to a pip requirement for it first: a folder
    # you uploaded or a "git+https://..." address of the repository.
    here = pathlib.Path.cwd()
    root = next((p for p in (here, *here.parents) if (p / "pyproject.toml").is_file() and (p / "charclip").is_dir()), None)
    source = os.environ.get("CHARCLIP_SOURCE") or (str(root) if root else None)
    if source is None:
        raise RuntimeError("charclip is not installed: set CHARCLIP_SOURCE to its folder or git address and rerun")
    # The %pip magic, written as a call so that it can sit inside this `if`.
    get_ipython().run_line_magic("pip", f"install --quiet {source}")
    importlib.invalidate_caches()

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from charclip.parity import TOLERANCES, prove_port
jax.config.update("jax_enable_x64", True)  # JAX's 64-bit mode: float64 means float64 below

torch.set_num_threads(1)  # small tensors: one thread is faster beside XLA's pool

# %% [markdown]
# ## The model, twice
#
# The torch model is an ordinary `nn.Module`. The JAX port is a plain function of
# `(params, x)`, where `params` is the module's `state_dict` as arrays: the same names and the
# same shapes, so a `nn.Linear` weight is `(out_features, in_features)` and the port multiplies
# by its transpose. That is the one convention a port has to keep.

# %%
class MLP(nn.Module):
    def __init__(self, d_in=4, d_hidden=16, d_out=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp_apply(params, x):
    """The JAX port: params["fc1.weight"] is (16, 4), as in torch."""
    h = jax.nn.relu(x @ params["fc1.weight"].T + params["fc1.bias"])  # (B, 16)
    return h @ params["fc2.weight"].T + params["fc2.bias"]  # (B, 2)


torch.manual_seed(0)
model = MLP()
print({name: tuple(t.shape) for name, t in model.state_dict().items()})

# %% [markdown]
# A small regression task: targets from a fixed random function of the inputs, eight batches.

# %%
rng = np.random.default_rng(0)
W_true = rng.standard_normal((4, 2))
batches = []
for _ in range(8):
    x = rng.standard_normal((32, 4))
    batches.append((x, np.tanh(x @ W_true)))
print(len(batches), "batches of", batches[0][0].shape, "->", batches[0][1].shape)

# %% [markdown]
# ## The ladder
#
# `prove_port` casts the module's weights to `dtype` (float64 by default), hands the same
# numbers to both sides and compares each rung. Clipping is the libraries' own:
# `clip_grad_norm_` in torch, `optax.clip_by_global_norm` in JAX. They differ by design:
# torch scales by tau / (norm + 1e-6), optax by tau / norm, so on a clipped step the two
# differ by about 1e-6 / tau relative. The ladder widens exactly those rows by exactly that
# gap, and the reason column says so; every other bound comes from the tolerance table.

# %%
TAU, LR = 0.5, 0.1
report = prove_port(model, mlp_apply, batches, loss="mse", lr=LR, max_norm=TAU)
print(report.table())
print("\nverdict:", "the port is exact" if report.ok else f"differs first at: {report.first_failure.quantity}")

# %% [markdown]
# Each bound and why it is what it is. In float64 the unit roundoff is 1.1e-16, so an
# agreement near 1e-16 on every rung is the two frameworks doing the same arithmetic in a
# different order.

# %%
for row in report.rows:
    print(f"{row.quantity:45s} bound {row.tol:.1e}: {row.reason}")

# %%
grad_rows = [r for r in report.rows if r.quantity.startswith("grad ")]
worst = max(grad_rows, key=lambda r: r.max_rel)
print(f"worst gradient: {worst.quantity}, relative error {worst.max_rel:.1e} "
      f"({worst.max_rel / np.finfo(np.float64).eps:.1f} float64 ulps)")

# %% [markdown]
# ## float32
#
# The same port in float32. The errors grow to float32's roundoff (6e-8) times the operation
# count, and the table's float32 bounds say how much that allows and why.

# %%
report32 = prove_port(model, mlp_apply, batches, loss="mse", lr=LR, max_norm=TAU, dtype="float32")
print(report32.table())
print("\nfloat32 trajectory bound:", TOLERANCES["float32"]["trajectory"].reason)

# %% [markdown]
# ## Three wrong ports, and where the ladder catches them
#
# A proof is only worth something if it fails on a wrong port. Three classic slips:
#
# 1. a weight read in the wrong layout (`(in, out)` instead of torch's `(out, in)`);
# 2. leaky ReLU where torch has ReLU: right wherever the pre-activation is positive;
# 3. a hand-written backward pass (`jax.custom_vjp`) that forgets a bias gradient: the forward
#    pass, and so the loss, are exactly right.

# %%
def wrong_layout(params, x):
    w2 = params["fc2.weight"].reshape(params["fc2.weight"].shape[::-1])  # reshaped, not transposed
    h = jax.nn.relu(x @ params["fc1.weight"].T + params["fc1.bias"])
    return h @ w2 + params["fc2.bias"]


def leaky(params, x):
    h = jax.nn.leaky_relu(x @ params["fc1.weight"].T + params["fc1.bias"], 0.01)
    return h @ params["fc2.weight"].T + params["fc2.bias"]


@jax.custom_vjp
def add_bias(h, b):
    return h + b


add_bias.defvjp(lambda h, b: (h + b, None), lambda _, g: (g, jnp.zeros(g.shape[-1], g.dtype)))  # the bug


def forgot_bias_grad(params, x):
    h = jax.nn.relu(add_bias(x @ params["fc1.weight"].T, params["fc1.bias"]))
    return h @ params["fc2.weight"].T + params["fc2.bias"]


results = {}
for name, port in [("wrong layout", wrong_layout), ("leaky ReLU", leaky), ("forgot a bias gradient", forgot_bias_grad)]:
    r = prove_port(model, port, batches, loss="mse", lr=LR, max_norm=TAU)
    results[name] = r
    failing = [row.quantity for row in r.rows if not row.ok]
    print(f"{name:24s} ok={r.ok}; first failing rung: {r.first_failure.quantity}; {len(failing)} of {len(r.rows)} rungs fail")

# %% [markdown]
# The third is the dangerous one: its forward output and loss agree to rounding, so a test
# that compares outputs (as many port checks do) passes it. Only the gradient rungs see it.

# %%
r = results["forgot a bias gradient"]
for row in r.rows[:8]:
    print(f"{row.quantity:30s} {row.max_rel:9.1e}  {'ok' if row.ok else 'DIFFERS'}")

# %% [markdown]
# ## The picture
#
# Relative error per rung, for the right port and the three wrong ones, against each rung's
# bound. A right port sits at rounding level on every rung; a wrong one jumps by many orders
# of magnitude at the rung where the mistake acts.

# %%
labels = [row.quantity for row in report.rows]
fig, ax = plt.subplots(figsize=(9, 4.5))
floor = 1e-18  # an exact agreement (0) is drawn here
ax.semilogy(range(len(labels)), [max(row.tol, floor) for row in report.rows], "k--", lw=1, label="bound")
for i, (name, rep) in enumerate([("right port", report), *results.items()]):
    ax.semilogy(range(len(labels)), [max(row.max_rel, floor) if np.isfinite(row.max_rel) else 1.0 for row in rep.rows],
                "o-", ms=4, lw=1, label=name, color=f"C{i}")
ax.set_xticks(range(len(labels)))
ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
ax.set_ylabel("max relative error, torch vs JAX")
ax.set_title("The port ladder: where a right and three wrong ports stand")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Your own model
#
# Replace `MLP` and `mlp_apply` with yours. `loss="cross_entropy"` takes logits `(..., C)` and
# integer targets. The API is documented in
# [docs/parity.md](../docs/parity.md#prove-a-port-of-your-own-model-charclipparityprove_port).
