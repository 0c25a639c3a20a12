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
# `charclip.parity.prove_port` compares a torch `nn.Module` and its JAX rewrite phase by phase:
# every submodule's output in execution order (torch forward hooks against the values the port
# marks with `tap`), the loss, every gradient in reverse order of use, the first optimizer
# update of every parameter, and a trajectory. Each row has a bound derived from the dtype's
# unit roundoff and the number of terms summed, and the first row out of its bound is named:
# the phase, the layer or parameter, the step. docs/porting.md is the reference.

# %%
# Install charclip where it is missing (Colab, a fresh environment). Where charclip is
# importable already, as in the repository's own test run, this cell does nothing.
import importlib
import importlib.util
import os
import pathlib

if importlib.util.find_spec("charclip") is None:
    # In a clone of the repository, the folder above this notebook is charclip's source.
    # Elsewhere (Colab): upload a wheel built in a clone (`pip wheel --no-deps .`) beside this
    # notebook, or set CHARCLIP_SOURCE to a pip requirement: a folder or a "git+https://..." address.
    here = pathlib.Path.cwd()
    root = next((p for p in (here, *here.parents) if (p / "pyproject.toml").is_file() and (p / "charclip").is_dir()), None)
    wheels = sorted(here.glob("charclip-*.whl"))
    source = (
        os.environ.get("CHARCLIP_SOURCE") or (str(root) if root else None) or (str(wheels[-1]) if wheels else None)
    )
    if source is None:
        raise RuntimeError(
            "charclip is not installed: upload a charclip wheel beside this notebook, or set CHARCLIP_SOURCE "
            "to its folder or git address, and rerun"
        )
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

from charclip.parity import prove_port, tap

torch.set_num_threads(1)  # small tensors: one thread is faster beside XLA's pool

# %% [markdown]
# ## The model, twice
#
# The torch model is an ordinary `nn.Module`. The JAX port is a plain function of
# `(params, x)`, where `params` is the module's `state_dict` as arrays: the same names and the
# same shapes, so a `nn.Linear` weight is `(out_features, in_features)`. Each intermediate the
# port computes is wrapped in `tap(name, value)` with the name of the torch submodule it
# stands for; outside a proof `tap` just returns its value.

# %%
class MLP(nn.Module):
    def __init__(self, d_in=4, d_hidden=16, d_out=2):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def mlp_apply(params, x, act=jnp.tanh):
    """The JAX port: params["fc1.weight"] is (16, 4), as in torch."""
    h = tap("fc1", x @ params["fc1.weight"].T + params["fc1.bias"])  # (B, 16)
    h = tap("act", act(h))
    return tap("fc2", h @ params["fc2.weight"].T + params["fc2.bias"])  # (B, 2)


torch.manual_seed(0)
model = MLP()
rng = np.random.default_rng(0)
W_true = rng.standard_normal((4, 2))
batches = []
for _ in range(8):
    x = rng.standard_normal((32, 4))
    batches.append((x, np.tanh(x @ W_true)))
print({name: tuple(t.shape) for name, t in model.state_dict().items()}, len(batches), "batches")

# %% [markdown]
# ## The proof
#
# float64 is the proving mode: the two frameworks then agree to about 1e-16, and anything
# larger is a difference in the algorithm. The table shows each row's error, its bound and the
# bound's formula with its inputs (`u` the unit roundoff, `n` the terms summed so far).

# %%
report = prove_port(model, mlp_apply, batches, loss="mse", optimizer="adamw", lr=1e-2, max_norm=None,
                    dtype="float64")
print(report.table())
print("\nok:", report.ok, "| divergence:", report.divergence)

# %% [markdown]
# ## Wrong ports, and where they are caught
#
# 1. leaky ReLU after the tanh, where torch has none: right wherever tanh is positive;
# 2. a hand-written backward (`jax.custom_vjp`) that forgets the first bias's gradient: the
#    forward pass and the loss are exactly right, so an output comparison passes it;
# 3. Adam with its epsilon inside the square root (optax's `eps_root`), the training loop's
#    slip rather than the model's.

# %%
import optax


@jax.custom_vjp
def add_bias(h, b):
    return h + b


add_bias.defvjp(lambda h, b: (h + b, None), lambda _, g: (g, jnp.zeros(g.shape[-1], g.dtype)))  # the bug


def forgot_bias_grad(params, x):
    h = tap("fc1", add_bias(x @ params["fc1.weight"].T, params["fc1.bias"]))
    return tap("fc2", tap("act", jnp.tanh(h)) @ params["fc2.weight"].T + params["fc2.bias"])


wrong = {
    "leaky ReLU": (lambda p, x: mlp_apply(p, x, lambda h: jax.nn.leaky_relu(jnp.tanh(h), 0.1)), {}),
    "forgot a bias gradient": (forgot_bias_grad, {}),
    "Adam eps inside sqrt": (mlp_apply, {"jax_optimizer": optax.adamw(1e-2, eps=0.0, eps_root=1e-8,
                                                                      weight_decay=0.01)}),
}
results = {}
for name, (port, extra) in wrong.items():
    r = prove_port(model, port, batches, loss="mse", optimizer="adamw", lr=1e-2, max_norm=None, **extra)
    results[name] = r
    print(f"{name:24s} -> {r.divergence.phase:8s} at {r.divergence.where}")

# %% [markdown]
# The localisation shows the rows before the divergence agreeing to rounding, so the layer
# named is the first place the port is wrong, not merely a place where it shows.

# %%
print(results["forgot a bias gradient"].table())

# %% [markdown]
# ## The picture
#
# Relative error per row against each row's bound, for the right port and the wrong ones. A
# right port sits at rounding level everywhere; a wrong one jumps by many orders of magnitude
# at the phase and place where the mistake acts.

# %%
labels = [row.quantity for row in report.rows]
fig, ax = plt.subplots(figsize=(9, 4.5))
floor = 1e-18  # an exact agreement (0) is drawn here
ax.semilogy(range(len(labels)), [max(row.tol, floor) for row in report.rows], "k--", lw=1, label="bound")
for i, (name, rep) in enumerate([("right port", report), *results.items()]):
    err = {row.quantity: row.max_rel for row in rep.rows}  # the trajectory row's name holds its worst step
    err = [err.get(q, next((v for k, v in err.items() if k.startswith("trajectory")), np.nan)
                   if q.startswith("trajectory") else np.nan) for q in labels]
    ax.semilogy(range(len(labels)), [max(e, floor) if np.isfinite(e) else 1.0 for e in err],
                "o-", ms=4, lw=1, label=name, color=f"C{i}")
ax.set_xticks(range(len(labels)))
ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
ax.set_ylabel("max relative error, torch vs JAX")
ax.set_title("prove_port: where a right and three wrong ports stand")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A Flax NNX port of a real torch module
#
# `charclip/parity/examples.py` ports `nn.TransformerEncoderLayer` to Flax NNX. The NNX
# module's submodules carry torch's names (`encoder.layers.0.linear1`), so their outputs are
# compared without taps; Flax's `kernel`s are (in, out) and are transposed, as the notes say;
# the packed attention projection is matched by `mapping`. A LayerNorm epsilon of 1e-6 where
# torch has 1e-5 is found at the first LayerNorm.

# %%
from charclip.parity import examples

for broken in (None, "layernorm_eps"):
    torch_model, nnx_port, data, options = examples.make_transformer(broken, layers=1, steps=2)
    r = prove_port(torch_model, nnx_port, data, **options)
    print(f"{broken or 'correct port'}: {r.divergence or 'agrees within every bound'}")
print("\n".join(n for n in r.notes if n.startswith("layout")))

# %% [markdown]
# ## Your own model
#
# Replace `MLP` and `mlp_apply` with yours, or write a `SPEC.py` defining `torch_model`,
# `jax_forward`, `batches` (and `options`) and run `charclip prove SPEC.py`. In a test suite,
# `charclip.parity.assert_port_equal` fails with the table. See
# [docs/porting.md](../docs/porting.md).
