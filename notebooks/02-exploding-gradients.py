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
# # 2. Exploding gradients in a char-RNN
#
# Why does the gradient of a recurrent network explode, by how much, and what does clipping
# do about it in training? This notebook measures it on a vanilla (tanh) char-RNN with
# charclip's own experiment code, `charclip.explode`, the engine of `charclip explode`
# ([docs/exploding-gradients.md](../docs/exploding-gradients.md) has the long version).
# It runs in well under a minute on a laptop CPU.

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
import time
import warnings
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np

from charclip import explode
from charclip.config import ModelConfig
from charclip.weights import init_params, scale_spectral_radius

# %% [markdown]
# ## The Jacobian product
#
# One step of the RNN is `h_t = tanh(W_ih x_t + b + W_hh h_{t-1})`. The derivative of the new
# state with respect to the old one is
#
# $$J_t = \frac{\partial h_t}{\partial h_{t-1}} = \operatorname{diag}(1 - h_t^2)\, W_{hh},$$
#
# and a loss at the last step T reaches the state k steps earlier through k of these factors:
# $\partial L / \partial h_{T-k} = J_{T-k+1}^\top \cdots J_T^\top \, \partial L / \partial h_T$.
# Every entry of $1 - h_t^2$ lies in (0, 1]: the tanh derivative can only shrink the product.
# Where tanh stays linear ($h \approx 0$), the product is $W_{hh}^k$, and its size is set by the
# **spectral radius** ρ of $W_{hh}$, its largest eigenvalue in absolute value: by Gelfand's
# formula $\|W^k\|^{1/k} \to \rho$, so the gradient grows or shrinks like $\rho^k$.
#
# Take the model's own initial `W_hh` (drawn by `charclip.weights.init_params`),
# rescale it to several radii with `charclip.weights.scale_spectral_radius`, and compare
# $\|W_{hh}^k\|_2$ with $\rho^k$:

# %%
model_cfg = ModelConfig(vocab_size=65, cell="rnn", hidden_size=64, num_layers=1, embedding_dim=16)
w0 = init_params(model_cfg, seed=0, dtype="float64")["rnn.weight_hh_l0"]
K = np.arange(51)
powers = {}
for rho in explode.RHOS:
    w = scale_spectral_radius(w0, rho)
    radius = np.max(np.abs(np.linalg.eigvals(w)))
    powers[rho] = np.array([np.linalg.norm(np.linalg.matrix_power(w, k), ord=2) for k in K])
    print(f"rho = {rho:<4g} spectral radius {radius:.4f}, ||W_hh||_2 = {np.linalg.norm(w, ord=2):.3f}, "
          f"||W^50||_2 = {powers[rho][-1]:.3g} vs rho^50 = {rho**50:.3g}, ||W^50||^(1/50) = {powers[rho][-1] ** (1 / 50):.4f}")

fig, ax = plt.subplots(figsize=(7, 4))
for i, (rho, p) in enumerate(powers.items()):
    ax.semilogy(K, p, color=f"C{i}", lw=2, label=f"||W^k||_2, rho = {rho:g}")
    ax.semilogy(K, float(rho) ** K, ":", color=f"C{i}", lw=1)
ax.set_xlabel("k")
ax.set_ylabel("||W_hh^k||_2   (dotted: rho^k)")
ax.set_title("the linear Jacobian product grows like rho^k")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8, ncol=2)
plt.show()

# %% [markdown]
# The matrix norm $\|W_{hh}\|_2$ (the largest singular value) is larger than ρ, so a bound
# built from it, $\|W_{hh}\|_2^k$, overstates the growth; the slope of the measured curves is
# ρ. For ρ < 1 the product vanishes, for ρ > 1 it explodes, and ρ = 1 is the knife edge.
#
# ## Your settings
#
# Change these two numbers and rerun from here down (in Jupyter: select this cell, then
# *Run → Run Selected Cell and All Below*). `RHO` is the spectral radius of `W_hh` at the start
# of training; `TAU` is the threshold of norm clipping. Try a stable matrix, `RHO = 0.9`, or
# larger thresholds, `TAU = 3` or `TAU = 10`, and see which runs still diverge.

# %%
RHO = 1.5  # spectral radius of W_hh at the start of training
TAU = 0.5  # norm-clipping threshold

# %% [markdown]
# `charclip.explode.run_all` runs the experiments of `charclip explode`, here in their quick
# size (`QUICK`), in PyTorch (add `"jax"` to the backends to run JAX as well):
#
# 1. the gradient through time: the norm of $\partial L/\partial h_{T-k}$ for a loss at the
#    last of T steps, for each ρ above, once with inputs so small that tanh stays linear
#    and once with the inputs as initialised;
# 2. training from the unstable start `RHO` with no clipping, value clipping and norm clipping
#    at `TAU`, with plain SGD (charclip's Adam set up to act as SGD: Adam's per-coordinate
#    scaling would cap every step by itself and hide the explosion).

# %%
settings = replace(explode.QUICK, rho=RHO, max_norm=TAU, taus=())  # taus=(): no threshold sweep
# run_all imports tqdm.auto, which warns in a kernel without ipywidgets; no progress bar is shown here anyway.
warnings.filterwarnings("ignore", message="IProgress not found")
t0 = time.perf_counter()
results = explode.run_all(settings, ("torch",), progress=False)
s = results["settings"]
print(f"{time.perf_counter() - t0:.1f} s: vanilla RNN 1 x {s['hidden']}, vocabulary {results['vocab_size']}, "
      f"{s['steps']} SGD steps of {s['batch_size']} x {s['seq_len']} characters, float64; gradient through time "
      f"over T = {results['gradient_through_time']['seq_len']} steps")

# %% [markdown]
# ## Measured: the gradient through time

# %%
gtt = results["gradient_through_time"]
titles = {"linear": "tiny inputs: tanh stays linear", "initialised": "inputs as initialised: tanh saturates"}
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
for ax, (regime, curves) in zip(axes, gtt["regimes"].items()):
    for i, c in enumerate(curves.values()):
        norms = np.array(c["norms"]["torch"])
        k = np.arange(len(norms))
        ax.semilogy(k, norms / norms[0], color=f"C{i}", lw=2, label=f"rho = {c['rho']:g}")
        ax.semilogy(k, np.array(c["rho_k"]) / norms[0], ":", color=f"C{i}", lw=1)
    ax.set_title(titles[regime])
    ax.set_xlabel("k (steps back from the loss)")
    ax.grid(alpha=0.3, which="both")
axes[0].set_ylabel("||dL/dh_{T-k}|| / ||dL/dh_T||   (dotted: rho^k)")
axes[1].legend(fontsize=8, ncol=2, loc="lower left")
plt.show()

for regime, curves in gtt["regimes"].items():
    print(f"{regime:11s} growth per step: " + ", ".join(
        f"{c['growth_per_step']:.3f} at rho {c['rho']:g}" for c in curves.values()))
print("smallest tanh derivative, initialised: " + ", ".join(
    f"{c['min_tanh_derivative']:.2g} at rho {c['rho']:g}" for c in gtt["regimes"]["initialised"].values()))

# %% [markdown]
# With tanh linear, the measured gradient follows $\rho^k$: the growth per step printed above
# is ρ. With ordinary inputs the units saturate, the factors $1 - h_t^2$ fall far below 1, and
# the same matrices give much less growth, or none. For the largest radius, here is the measured
# norm against the two upper bounds of `explode.jacobian_bounds`: the product of the step
# Jacobians' norms $\prod_t \|\operatorname{diag}(1 - h_t^2) W_{hh}\|_2$, and the looser
# $\prod_t \max_i(1 - h_{t,i}^2)\,\|W_{hh}\|_2$. Both lie far above the measured norm, even
# above $\rho^k$: each factor's norm can exceed ρ (as $\|W_{hh}\|_2$ does), and a product of
# norms ignores that successive factors stretch different directions.

# %%
c = gtt["regimes"]["initialised"][f"{max(explode.RHOS):g}"]
k = np.arange(len(c["rho_k"]))
fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(k, c["rho_k"], ":", color="k", label="rho^k")
ax.semilogy(k, c["norm_bound"], color="C3", lw=1, label="prod max(1 - h^2) ||W_hh||_2")
ax.semilogy(k, c["jacobian_product"], color="C1", lw=1.5, label="prod ||diag(1 - h^2) W_hh||_2")
ax.semilogy(k, c["norms"]["torch"], color="C0", lw=2, label="measured ||dL/dh_{T-k}||")
ax.set_xlabel("k")
ax.set_title(f"inputs as initialised, rho = {c['rho']:g}")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Measured: training from an unstable start, with and without clipping

# %%
labels = {"none": "no clipping", "value": f"value clip v = {s['max_value']:g}", "norm": f"norm clip tau = {s['max_norm']:g}"}
fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
for i, r in enumerate(results["training"]):
    steps = np.arange(1, len(r["loss"]) + 1)
    axes[0].plot(steps, np.array(r["loss"], dtype=float), color=f"C{i}", lw=1, label=labels[r["mode"]])
    axes[1].semilogy(steps, np.array(r["grad_norm"], dtype=float), color=f"C{i}", lw=0.8)
axes[0].axhline(results["divergence_factor"] * results["training"][0]["first_loss"], color="k", ls=":", lw=1,
                label=f"{results['divergence_factor']:g} x first loss: diverged")
axes[0].axhline(results["unigram_entropy"], color="gray", ls="--", lw=1, label="unigram entropy")
axes[0].set_ylabel("training loss (nats/char)")
axes[0].set_title(f"rho = {s['rho']:g} at the start, SGD lr = {s['sgd_lr']:g}")
axes[0].legend(fontsize=8)
axes[1].axhline(s["max_norm"], color="C2", ls="--", lw=1, label=f"tau = {s['max_norm']:g}")
axes[1].set_ylabel("gradient norm before clipping")
axes[1].set_xlabel("step")
axes[1].legend(fontsize=8)
for ax in axes:
    ax.grid(alpha=0.3, which="both")
plt.show()

for r in results["training"]:
    verdict = "diverged" if r["diverged"] else "converged" if r["converged"] else "did not converge"
    nonfinite = f", loss not finite from step {r['first_nonfinite_step']}" if r["first_nonfinite_step"] else ""
    clipped = f", steps clipped {r['clipped_fraction']:.0%}" if r["mode"] == "norm" else ""
    print(f"{labels[r['mode']]:22s} max loss {r['max_loss']:.3g}, validation loss {r['val_loss']:.3f}, "
          f"largest gradient norm {r['max_grad_norm']:.3g}{clipped}{nonfinite}: {verdict}")
print(f"(diverged: a loss over {results['divergence_factor']:g} x the first, or not finite; converged: validation "
      f"loss under the unigram entropy {results['unigram_entropy']:.3f}, which a model ignoring context cannot beat)")

# %% [markdown]
# The spikes in the gradient norm are the explosion measured above, met in training: one
# large gradient times the learning rate throws the weights far away, and the loss with them.
# Norm clipping caps the length of those steps at `lr * TAU` while keeping their direction,
# and leaves the ordinary steps (below `TAU`) alone. Value clipping caps each coordinate, which
# also bounds the step, but changes its direction and needs a threshold matched to the size of
# the individual entries. Rerun with your own `RHO` and `TAU` above to find where each breaks.
#
# **Next:** [3. Training versus inference](03-training-vs-inference.ipynb).
