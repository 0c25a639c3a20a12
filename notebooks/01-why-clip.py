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
# # 1. Why clip, and where
#
# Gradient clipping in three small pictures: one weight whose gradient is far too large,
# the one place in a training loop where clipping belongs, and the difference between
# clipping a gradient's norm and clipping its values. Then a trap that a well-known version
# of this lesson falls into.
#
# Everything is computed with PyTorch's `torch.nn.utils.clip_grad_norm_` /
# `clip_grad_value_` and with charclip's drop-in of them, `charclip.torch.clipping`. The math is
# in [docs/clipping.md](../docs/clipping.md).

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
import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

from charclip.torch import clipping  # charclip's clipping, a drop-in for torch.nn.utils'

print(f"torch {torch.__version__}")


def fmt(v: torch.Tensor) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v.tolist()) + "]"

# %% [markdown]
# ## One weight, one huge gradient
#
# Take a single weight `w = 10` and the loss `w**4`. Its gradient is `4 w**3`. Clipping the
# gradient's norm to `max_norm = 1` keeps its sign (its direction, in one dimension) and
# sets its size to 1.

# %%
w = torch.tensor(10.0, requires_grad=True)
loss = w**4
loss.backward()
print(f"loss = {loss.item():g}, gradient 4 w^3 = {w.grad.item():g}")

before = torch.nn.utils.clip_grad_norm_([w], max_norm=1.0)
print(f"torch.nn.utils.clip_grad_norm_: returned norm {before.item():g}, gradient now {w.grad.item():.8g}")

w.grad = torch.tensor(4 * 10.0**3)
before = clipping.clip_grad_norm_([w], max_norm=1.0)
print(f"charclip.torch.clipping.clip_grad_norm_: returned norm {before.item():g}, gradient now {w.grad.item():.8g}")

# %% [markdown]
# Both functions return the norm measured *before* clipping: a loop can log it to see how
# often, and by how much, clipping acts.
#
# ## Where clipping goes in the loop
#
# Clipping edits `.grad`. So it must come after `loss.backward()` has written the gradient
# and before `optimizer.step()` reads it. Three loops of plain SGD (learning rate 0.1) from
# `w = 10` on the same loss show why:
#
# - no clipping;
# - clipping in the right place: `backward()`, clip, `step()`;
# - clipping after `step()`: the step has already used the raw gradient, and `zero_grad()`
#   throws the clipped one away, so this loop is the unclipped one.

# %%
def train_one_weight(where: str, steps: int = 150, lr: float = 0.1) -> list[float]:
    """w after each SGD step on w**4 from w = 10, clipping at max_norm 1 in `where`."""
    w = torch.nn.Parameter(torch.tensor(10.0))
    optimizer = torch.optim.SGD([w], lr=lr)
    path = [w.item()]
    for _ in range(steps):
        optimizer.zero_grad()
        loss = w**4
        loss.backward()
        if where == "after backward":
            clipping.clip_grad_norm_([w], max_norm=1.0)  # the right place
        optimizer.step()
        if where == "after step":
            clipping.clip_grad_norm_([w], max_norm=1.0)  # too late: step() has used the raw gradient
        path.append(w.item())
    return path


paths = {where: train_one_weight(where) for where in ("nowhere", "after backward", "after step")}
for where, path in paths.items():
    shown = ", ".join(f"{v:.4g}" for v in path[:5])
    print(f"clip {where:15s} w: {shown}, ... after {len(path) - 1} steps: {path[-1]:.4g}")

same = all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(paths["nowhere"], paths["after step"]))
print(f"clipping after step() gives the unclipped trajectory exactly: {same}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
for (where, path), style in zip(paths.items(), (dict(lw=4, alpha=0.4), dict(lw=1.5), dict(ls="--", marker="."))):
    size = np.array([abs(v) if math.isfinite(v) else np.nan for v in path])  # NaN: not drawn
    ax.semilogy(size, label=f"clip {where}", **style)
ax.set_xlabel("SGD step")
ax.set_ylabel("|w|")
ax.set_title("SGD on w**4 from w = 10, lr 0.1 (the line stops where w is no longer finite)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# Unclipped, the first step jumps from 10 past zero to a large negative value, where the
# gradient is larger still; in a few steps `w` overflows float32 and then becomes NaN.
# Clipping after `step()` draws the same line. Clipped in the right place, each step moves `w` by at most
# `lr * max_norm = 0.1`, until the gradient drops below 1 and plain SGD takes over.
#
# ## Norm clipping or value clipping
#
# With more than one weight there are two common ways to clip. Norm clipping scales the whole
# gradient vector by one factor, so its direction is kept and its length is at most
# `max_norm`. Value clipping clamps every entry to `[-clip_value, clip_value]` on its own,
# which changes the direction. Take the 2-D gradient `[10, 1]` and a threshold of 1.

# %%
def clipped_copy(grad: list[float], clip) -> torch.Tensor:
    """A parameter whose .grad is `grad`, clipped in place by `clip`; returns the new .grad."""
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    clip([p])
    return p.grad


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return math.degrees(math.acos(min(1.0, cos.item())))


g = torch.tensor([10.0, 1.0])
results = {
    "norm, torch": clipped_copy(g.tolist(), lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm=1.0)),
    "norm, charclip": clipped_copy(g.tolist(), lambda ps: clipping.clip_grad_norm_(ps, max_norm=1.0)),
    "value, torch": clipped_copy(g.tolist(), lambda ps: torch.nn.utils.clip_grad_value_(ps, clip_value=1.0)),
    "value, charclip": clipped_copy(g.tolist(), lambda ps: clipping.clip_grad_value_(ps, clip_value=1.0)),
}
print(f"original {g.tolist()}: norm {torch.linalg.vector_norm(g).item():.4f}")
for name, r in results.items():
    print(f"{name:16s} {fmt(r)}: norm {torch.linalg.vector_norm(r).item():.4f}, "
          f"turned by {angle_deg(g, r):.2f} degrees")

# %%
norm_clipped, value_clipped = results["norm, charclip"].numpy(), results["value, charclip"].numpy()
theta = np.linspace(0, 2 * np.pi, 200)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, (lo, hi) in zip(axes, ((-1.5, 10.5), (-1.3, 1.3))):
    ax.plot(np.cos(theta), np.sin(theta), color="C0", lw=1, label="norm ball ||g|| <= 1")
    ax.add_patch(plt.Rectangle((-1, -1), 2, 2, fill=False, color="C1", lw=1, label="value box |g_i| <= 1"))
    ax.plot([0, 11 * g[0]], [0, 11 * g[1]], ":", color="gray", lw=1, label="direction of [10, 1]")
    ax.annotate("", xy=g.numpy(), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="k"))
    ax.annotate("", xy=norm_clipped, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="C0", lw=2))
    ax.annotate("", xy=value_clipped, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="C1", lw=2))
    ax.plot(*g.numpy(), "ko", ms=4, label="original [10, 1]")
    ax.plot(*norm_clipped, "o", color="C0", label=f"norm-clipped {fmt(results['norm, charclip'])}")
    ax.plot(*value_clipped, "o", color="C1", label=f"value-clipped {fmt(results['value, charclip'])}")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo if hi < 2 else -1.5, hi if hi < 2 else 2.5)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
axes[0].set_title("the gradient and both clipped versions")
axes[1].set_title("close up: on the ball, or at the box's corner")
axes[1].legend(fontsize=8, loc="lower left")
plt.show()

# %% [markdown]
# Norm clipping lands on the unit circle, on the dashed line: same direction, length 1.
# Value clipping lands on the corner `[1, 1]` of the box: length `sqrt(2)`, turned by the
# angle printed above. The per-entry clamp treats the small coordinate as if it mattered as
# much as the large one.
#
# ## The trap: clipping a plain tensor
#
# A well-known version of this lesson builds the vector `[10, 1]` as a plain tensor and
# passes it to `clip_grad_norm_` to show the clipped result. It prints `[10.0, 1.0]`,
# unchanged, and no error is raised:

# %%
g = torch.tensor([10.0, 1.0])
returned = torch.nn.utils.clip_grad_norm_(g, max_norm=1.0)
print(f"after torch.nn.utils.clip_grad_norm_(g, 1.0): g = {g.tolist()}, returned norm {returned.item():g}")
print(f"g.grad is {g.grad}")

# %% [markdown]
# Why: `clip_grad_norm_(parameters, max_norm)` clips the *gradients of parameters*, the
# `.grad` tensors, not the tensors you pass. A lone tensor is taken as a list of one
# parameter; its `.grad` is `None`, so there is no gradient to measure or scale, the norm
# comes back as 0 and nothing changes. The returned norm is the tell: 0 for a vector whose
# norm is plainly 10.05.
#
# The right call hands the function what it expects: a parameter whose `.grad` holds the
# vector, as after a real `backward()`.

# %%
p = torch.nn.Parameter(torch.zeros(2))
p.grad = torch.tensor([10.0, 1.0])
returned = torch.nn.utils.clip_grad_norm_([p], max_norm=1.0)
print(f"p.grad = {fmt(p.grad)}, returned norm {returned.item():.4f}, "
      f"norm now {torch.linalg.vector_norm(p.grad).item():.4f}")

# %% [markdown]
# And charclip's drop-in, `charclip.torch.clipping.clip_grad_norm_`, given the same plain tensor
# (the sentence below is built from what the call did):

# %%
g = torch.tensor([10.0, 1.0])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        returned, raised = clipping.clip_grad_norm_(g, max_norm=1.0), None
    except Exception as e:  # shown, not hidden: this cell reports what the function does
        returned, raised = None, e
outcome = [f"g is now {g.tolist()} ({'unchanged' if g.tolist() == [10.0, 1.0] else 'changed'})"]
if raised is not None:
    outcome.append(f"it raised {type(raised).__name__}: {raised}")
else:
    outcome.append(f"it returned {returned.item():g}")
outcome += [f"it warned ({w.category.__name__}): {w.message}" for w in caught]
if raised is None and not caught:
    outcome.append("it gave no warning")
print("charclip.torch.clipping.clip_grad_norm_(g, 1.0) on a plain tensor: " + "; ".join(outcome) + ".")

# %% [markdown]
# A cheap check catches this mistake, and others like it, in any loop: after clipping, the
# gradient's norm must be at most `max_norm`, and the returned pre-clip norm must not be 0
# for a model that has a gradient.
#
# **Next:** [2. Exploding gradients in a char-RNN](02-exploding-gradients.ipynb).
