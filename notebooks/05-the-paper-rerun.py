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
# # 5. The paper, rerun
#
# Gradient norm clipping comes from one paper: Pascanu, Mikolov and Bengio, *On the difficulty of
# training recurrent neural networks* (ICML 2013, arXiv 1211.5063). This notebook reruns its
# experiments in PyTorch and in JAX with `charclip.explode.paper`, the engine of
# `charclip explode --paper`, at a size that runs in well under a minute: the cliff of its one-unit
# network (section 2.3, Fig. 6), the bifurcations behind it (section 2.2, Fig. 3), and the
# temporal-order task (section 4.1.1, Fig. 7). The full run, its figures and an honest account of
# what was scaled down are in [docs/paper-rerun.md](../docs/paper-rerun.md).

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
import tempfile
from dataclasses import replace
from pathlib import Path

from IPython.display import Image, Markdown, display

from charclip.explode import paper
from charclip.explode.paper_report import plot_bifurcation, plot_cliff

out = Path(tempfile.mkdtemp())

# %% [markdown]
# ## The cliff
#
# One hidden unit, no input: $x_t = w\,\sigma(x_{t-1}) + b$ with $x_0 = 0.5$, and the error
# $E_{50} = (\sigma(x_{50}) - 0.7)^2$ after 50 steps (eq. 8). Each backend computes the error and
# its gradient on a grid over $(w, b)$; from two starting points, gradient descent runs twice:
# plainly, and with the gradient rescaled to norm $\tau$ whenever it is longer (Algorithm 1).
# The paper's advice for $\tau$ (section 3.2) is to look at the average gradient norm over many
# updates; here $\tau$ is the mean norm of the plain run from the same start.

# %%
small = replace(paper.SMALL, path_updates=30)
cliff = paper.cliff(small, ("torch", "jax"))
print("torch vs JAX: surface and gradient agree to", f"{cliff['agreement']['surface_rel']:.1e}", "(relative);",
      "paths to", f"{cliff['agreement']['paths_abs']:.1e}")
for p in cliff["paths"]:
    r = p["backends"]["torch"]
    print(f"start {p['start']}: tau = {r['threshold']:.3g}; longest step plain {r['plain_longest_step']:.3g}, "
          f"rescaled {r['clipped_longest_step']:.3g} (lr * tau = {small.path_lr * r['threshold']:.3g}); "
          f"final error plain {r['plain_error'][-1]:.3g}, rescaled {r['clipped_error'][-1]:.3g}")

# %% [markdown]
# ## Where the wall comes from
#
# The map $x \mapsto w\,\sigma(x) + b$ has one attractor, or, inside a wedge of the $(w, b)$ plane
# bounded by two *fold bifurcations*, two attractors with an unstable fixed point between their
# basins. Section 2.2 argues that gradients explode when a change of the parameters moves the
# starting state across that basin boundary. The white curves below are the folds; the magenta
# dashes are the parameters for which $x_0 = 0.5$ sits exactly on the boundary. The wall of the
# error surface lies on the magenta line, inside the wedge. The second figure is the paper's
# Fig. 3 model ($w = 5$, $b$ varied).

# %%
results = {"cliff": cliff, "bifurcation": paper.bifurcation(small)}
display(Image(filename=str(plot_cliff(results, out / "cliff.png"))))
display(Image(filename=str(plot_bifurcation(results, out / "bifurcation.png"))))

# %% [markdown]
# ## The temporal-order task
#
# Sequences of six symbols: one of A, B near the start, one near the middle, distractors
# elsewhere; the class is their order (AA, AB, BA, BB). 50 tanh units, the paper's "basic tanh"
# initialisation, minibatches of 20, threshold 1. A run succeeds when under 1% of fresh sequences
# are misclassified. Here: length 10 and a learning rate of 0.3, far above the paper's 0.01, so
# that plain SGD meets exploding gradients within a few hundred updates.

# %%
tiny = replace(paper.SMALL, test_size=1000, max_updates=500, check_every=250)
for clip in (False, True):
    r = paper.temporal_order_run("jax", tiny, 10, 0.3, clip, seed=0)
    print(f"{'MSGD-C' if clip else 'MSGD  '}: solved {r['solved']}, diverged {r['diverged']}, "
          f"max gradient norm {r['max_norm']:.3g}, wrong on fresh sequences {[e for _, e in r['checks']]}")

# %% [markdown]
# ## The full run
#
# `charclip explode --paper` runs every length, learning rate, method and seed; its committed
# report is below (docs/figures/paper). The paper's own Fig. 7 stops at lengths of 50 to 250 after
# up to 5 million updates; on a 2-core CPU this run stops at length 30 and 3000 updates, so it
# shows the mechanism, not the paper's long-range numbers (docs/paper-rerun.md says which claims it
# can and cannot support).

# %%
full = Path("../docs/figures/paper")
report = (full / "report.md").read_text(encoding="utf-8")
display(Markdown(report[report.index("## 2."):].replace("![temporal order](temporal-order.png)", "")))
display(Image(filename=str(full / "temporal-order.png")))
