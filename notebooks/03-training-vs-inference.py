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
# # 3. Training versus inference
#
# A char-RNN is trained and used in two different ways. In training, the true text is fed in
# (*teacher forcing*) and the model is scored on its prediction at **every** step. In
# inference, it is fed its own output, one character at a time, and the next character is
# drawn from its prediction (*sampling*, here with temperature and top-k).
#
# This notebook trains charclip's model (`charclip.torch`) both with charclip's objective and with a
# common alternative that scores only the **last** step, on the same text and budget; samples
# from the result; and explains, with numbers, what the loss of a model trained on random
# targets says, relative to ln V.

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
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from charclip import corpus, sampling
from charclip.batching import Position, Streams, split
from charclip.config import ModelConfig, TrainConfig
from charclip.vocab import Vocab
from charclip.weights import init_params
from charclip.torch import model as M
from charclip.torch.sample import sample
from charclip.torch.train import Trainer

# %% [markdown]
# ## One corpus, one budget
#
# A slice of charclip's embedded Shakespeare, a small one-layer LSTM, Adam at charclip's default
# learning rate, norm clipping at charclip's default threshold, the same initial weights and the
# same batches for both objectives (the sizes are printed below).

# %%
text = corpus.load(None)[:300_000]
vocab = Vocab.from_text(text)
train_tokens, val_tokens = split(vocab.encode(text), 0.1)
cfg = TrainConfig(steps=200, batch_size=32, seq_len=64)
model_cfg = ModelConfig(vocab_size=len(vocab), cell="lstm", hidden_size=128, num_layers=1, embedding_dim=32)
train = Streams(train_tokens, cfg.batch_size, cfg.seq_len)
val = Streams(val_tokens, cfg.batch_size, cfg.seq_len, what="validation text")
initial = init_params(model_cfg, cfg.seed)
EVAL_EVERY, EVAL_BATCHES = 25, 4


def validation_loss(params: dict[str, np.ndarray]) -> float:
    """Cross-entropy per character over every step of the validation batches (the same yardstick for both)."""
    return Trainer(model_cfg, cfg, params).evaluate(val.eval_batches(EVAL_BATCHES))


print(f"vocabulary V = {len(vocab)}, {len(train_tokens):,} training characters, LSTM 1 x {model_cfg.hidden_size}; "
      f"{cfg.steps} steps of batch {cfg.batch_size} x T = {cfg.seq_len} characters, Adam lr {cfg.lr:g}, "
      f"norm clipping at {cfg.clip.max_norm:g}")

# %% [markdown]
# ### charclip's objective: cross-entropy at every step
#
# `charclip.torch.train.Trainer.step` runs the model over the T input characters of each
# sequence and scores its prediction of each of the T next characters; the hidden state is
# carried from batch to batch (truncated backpropagation through time).

# %%
def train_every_step() -> tuple[dict, list[float]]:
    trainer = Trainer(model_cfg, cfg, initial)
    pos, curve = Position(), []
    for step in range(1, cfg.steps + 1):
        if pos.batch == 0:
            trainer.reset_hidden()
        trainer.step(*train.batch(cfg.seed, pos))
        pos = train.next(pos)
        if step % EVAL_EVERY == 0:
            curve.append(validation_loss(trainer.params_numpy()))
    return trainer.params_numpy(), curve


t0 = time.perf_counter()
every_params, every_curve = train_every_step()
every_s = time.perf_counter() - t0
print(f"every step: validation loss {every_curve[-1]:.3f} after {cfg.steps} steps ({every_s:.1f} s)")

# %% [markdown]
# ### The alternative: predict one token from the last step's logits
#
# Many first char-RNN examples cut the text into windows and train the network to predict only
# the character that follows each window, from the logits of its last step. The loop below is
# the same as charclip's in everything else: same model, initial weights, batches, optimizer,
# clipping and carried hidden state. Only the loss differs: one target per sequence instead of T.

# %%
def train_last_step() -> tuple[dict, list[float]]:
    model = M.build(model_cfg, initial)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    pos, h, curve = Position(), None, []
    for step in range(1, cfg.steps + 1):
        if pos.batch == 0:
            h = None
        x, y = train.batch(cfg.seed, pos)
        pos = train.next(pos)
        logits, h = model(torch.from_numpy(x), h)  # (B, T, V)
        loss = F.cross_entropy(logits[:, -1], torch.from_numpy(y[:, -1]))  # the last step only
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip.max_norm)
        optimizer.step()
        h = tuple(t.detach() for t in h)
        if step % EVAL_EVERY == 0:
            curve.append(validation_loss(M.to_numpy(model)))
    return M.to_numpy(model), curve


t0 = time.perf_counter()
last_params, last_curve = train_last_step()
last_s = time.perf_counter() - t0
print(f"last step:  validation loss {last_curve[-1]:.3f} after {cfg.steps} steps ({last_s:.1f} s)")

# %%
steps = np.arange(1, len(every_curve) + 1) * EVAL_EVERY
reached = next(s for s, v in zip(steps, every_curve) if v <= last_curve[-1]) if min(every_curve) <= last_curve[-1] else None
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(steps, every_curve, "o-", label="every step (charclip)")
ax.plot(steps, last_curve, "s-", label="last step only")
ax.axhline(math.log(len(vocab)), color="gray", ls="--", lw=1, label=f"ln V = {math.log(len(vocab)):.2f} (uniform guess)")
ax.set_xlabel("training step")
ax.set_ylabel("validation loss (nats/char)")
ax.set_title("same model, data and budget; only the loss differs")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

targets = cfg.batch_size * cfg.seq_len
print(f"Targets per step: {targets} with every-step training, {cfg.batch_size} with last-step training, "
      f"for the same forward and backward pass over {targets} characters ({every_s:.1f} s and {last_s:.1f} s in all, "
      f"evaluation included).")
if reached is not None:
    print(f"Every-step training reached the last-step model's final validation loss ({last_curve[-1]:.3f}) after "
          f"{reached} steps, {cfg.steps / reached:.0f}x fewer than the {cfg.steps} the last-step model took; "
          f"after {cfg.steps} steps it is at {every_curve[-1]:.3f}.")
else:
    print(f"Every-step training did not reach {last_curve[-1]:.3f} within {cfg.steps} steps.")

# %% [markdown]
# Teacher forcing at every step gets T training signals out of each sequence for the price of
# one forward and backward pass; the last-step objective throws T - 1 of them away. (Training on
# a sliding window with a last-step loss recovers the data, but then pays T passes for what one
# pass gives here.)
#
# ## Inference: sampling, with temperature and top-k
#
# At inference there is no true text to feed in. `charclip.torch.sample.sample` feeds a *prime*,
# then repeatedly turns the last logits into a character and feeds it back. The draw itself is
# `charclip.sampling.draw`, shared by both backends: softmax of `logits / temperature`, after
# keeping only the `top_k` largest logits when `top_k` is given, sampled by inverting the
# cumulative distribution at a uniform number u. Feeding `draw` a fine grid of u shows the
# distribution it samples from, here for the character after the prime `"ROMEO:\n"`:

# %%
prime = "ROMEO:\n"
model = M.build(model_cfg, every_params).eval()
with torch.no_grad():
    logits = model(torch.from_numpy(vocab.encode(prime)[None]))[0][0, -1].numpy()  # (V,)

grid = (np.arange(20_000) + 0.5) / 20_000  # u on a fine grid: frequencies = probabilities to 5e-5
settings = [(0.5, None), (1.0, None), (1.5, None), (1.0, 3)]
fig, ax = plt.subplots(figsize=(9, 3.5))
top = np.argsort(logits)[::-1][:10]
for i, (temperature, top_k) in enumerate(settings):
    counts = np.bincount([sampling.draw(logits, u, temperature, top_k) for u in grid], minlength=len(vocab))
    p = counts / len(grid)
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    label = f"T = {temperature:g}" + (f", top-k = {top_k}" if top_k else "")
    ax.bar(np.arange(10) + 0.2 * i - 0.3, p[top], width=0.2, label=f"{label} (entropy {entropy:.2f} nats)")
    print(f"{label:17s} most likely: " + ", ".join(f"{vocab.chars[j]!r} {p[j]:.3f}" for j in top[:4]))
ax.set_xticks(np.arange(10), [repr(vocab.chars[j]) for j in top])
ax.set_ylabel("probability")
ax.set_title(f"the next character after {prime!r}")
ax.legend(fontsize=8)
plt.show()

# %%
for temperature, top_k in settings:
    text_out = sample(model_cfg, every_params, vocab, prime, 160, temperature=temperature, top_k=top_k, seed=0)
    print(f"--- temperature {temperature:g}, top-k {top_k}:\n{text_out}\n")

# %% [markdown]
# A low temperature sharpens the distribution toward the most likely characters (safe,
# repetitive text); a high one flattens it (more variety, more misspellings). Top-k removes the
# long tail of unlikely characters whatever the temperature. After only a few hundred steps
# the text is Shakespeare-shaped rather than Shakespeare.
#
# ## What ln V means: a loss on random targets
#
# A classic dummy-data demo trains a model on random tokens with a vocabulary of V = 10,000,
# and its loss climbs from 9.24 to 9.37. What do those numbers say? The cross-entropy of a
# prediction that gives every token probability 1/V is exactly ln V, whatever the target. When
# the targets are drawn uniformly at random, no model can do better on average: the expected
# loss of any prediction q is ln V plus the KL divergence from uniform to q, which is never
# negative. So on random targets **ln V is the floor, and every bit of loss above it is
# confidence in noise.** The two losses of the demo, against that floor:

# %%
V = 10_000
print(f"ln V = ln {V} = {math.log(V):.4f}")
for loss in (9.24, 9.37):
    excess = loss - math.log(V)
    print(f"loss {loss}: {excess:.3f} nats above ln V; the target gets probability exp(-{loss}) = {math.exp(-loss):.3g} "
          f"on (geometric) average, {math.exp(-loss) * V:.2f} x the uniform 1/V = {1 / V:g}")

# %% [markdown]
# Where does a start above ln V come from? A freshly initialised model's logits are not all
# equal but spread around their mean. For logits with standard deviation σ, independent of
# the random target, the expected cross-entropy is about ln V + σ²/2. Measured by drawing such
# logits, and solved for the σ that gives each of the demo's losses:

# %%
rng = np.random.default_rng(0)
z = rng.standard_normal((16, V))  # 16 draws of V standard-normal logits


def expected_loss(sigma: float) -> float:
    """Cross-entropy of logits sigma * z, averaged over the draws and over a uniformly random target.

    The target is uniform over the V tokens, so its expected logit is the mean logit, exactly.
    """
    s = sigma * z
    lse = s.max(axis=1) + np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1))
    return float(np.mean(lse - s.mean(axis=1)))


sigmas = np.linspace(0.0, 1.0, 101)
losses = np.array([expected_loss(sg) for sg in sigmas])
for loss in (9.24, 9.37):
    sigma = float(np.interp(loss, losses, sigmas))
    print(f"loss {loss}: logits with standard deviation {sigma:.2f} "
          f"(ln V + sigma^2/2 = {math.log(V) + sigma**2 / 2:.3f})")

# %% [markdown]
# Read through this model of the logits, the demo starts with logits spread by about the first
# σ above, a little worse than guessing uniformly, and training makes it *worse*: it spreads
# them to about the second σ. Each
# batch of random targets pulls the predictions toward that batch's tokens; the next batch has
# other tokens, so the model pays for its confidence. A loss that rises above ln V on random
# data is the optimizer fitting noise with steps too large to average it away. It is not a
# bug in the loss, and there is nothing to learn.
#
# The same thing with charclip's trainer, on random tokens from a vocabulary of 1,000: with a
# small learning rate the loss stays at ln V (batch to batch it scatters a little either side,
# since each batch is a finite sample), with a large one it climbs above it.

# %%
V_small = 1_000
noise = np.random.default_rng(1).integers(0, V_small, size=100_000)
noise_cfg = ModelConfig(vocab_size=V_small, cell="lstm", hidden_size=64, num_layers=1, embedding_dim=16)
noise_streams = Streams(noise, 16, 32)
noise_curves = {}
for lr in (3e-3, 1e-1):
    noise_train = TrainConfig(steps=150, batch_size=16, seq_len=32, lr=lr)
    trainer = Trainer(noise_cfg, noise_train, init_params(noise_cfg, 0))
    pos, loss = Position(), []
    for _ in range(noise_train.steps):
        loss.append(trainer.step(*noise_streams.batch(0, pos)).loss)
        pos = noise_streams.next(pos)
    noise_curves[lr] = np.array(loss)
    print(f"lr {lr:g}: first loss {loss[0]:.3f}, mean of the last 20 {np.mean(loss[-20:]):.3f}, "
          f"highest {max(loss):.3f}; ln V = {math.log(V_small):.3f}")

fig, ax = plt.subplots(figsize=(7, 3.5))
for lr, loss in noise_curves.items():
    ax.plot(loss, lw=0.8, label=f"Adam lr {lr:g}")
ax.axhline(math.log(V_small), color="k", ls="--", lw=1, label=f"ln V = {math.log(V_small):.3f}")
ax.set_xlabel("step")
ax.set_ylabel("training loss on random tokens")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# On real data the same floor is a sanity check: ln V is what a model scores by knowing
# nothing, so a loss above it (here ln V is the dashed line of the first figure) means the
# model is worse than a uniform guess; look at the learning rate, the labels or the data.
#
# **Back to:** [1. Why clip, and where](01-why-clip.ipynb) ·
# [2. Exploding gradients in a char-RNN](02-exploding-gradients.ipynb).
