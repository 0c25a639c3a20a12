"""The cell is described once (`charclip.config`'s cell table), an unknown cell is an error in
every backend, and importing `charclip.jax` changes no JAX setting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from charclip.config import CELLS, ModelConfig
from charclip.errors import CharclipError
from charclip.jax import fastrnn
from charclip.jax import model as M
from charclip.torch import model as TM


@pytest.mark.parametrize("cell", CELLS)
def test_both_backends_carry_the_state_the_cell_table_names(cell):
    cfg = ModelConfig(vocab_size=3, cell=cell, hidden_size=2, num_layers=2, embedding_dim=2)
    params = M.init(cfg, 0, "float32")
    model = TM.build(cfg, {k: np.asarray(v) for k, v in params.items()})
    _, final = model(
        torch.zeros((1, 2), dtype=torch.int64)
    )  # tokens (B=1, T=2), zero initial state
    torch_parts = TM.hidden_to_numpy(final)
    jax_parts = M.hidden_to_numpy(M.zero_state(cfg, 1, jnp.float32))
    assert tuple(torch_parts) == tuple(jax_parts) == cfg.state_parts, (
        tuple(torch_parts),
        tuple(jax_parts),
    )
    assert all(p.shape == (2, 1, 2) for p in (*torch_parts.values(), *jax_parts.values()))


def test_an_unknown_cell_is_an_error_in_every_backend():
    with pytest.raises(CharclipError, match="unknown cell 'elman'"):
        ModelConfig(vocab_size=3, cell="elman")
    cfg = ModelConfig(vocab_size=3, cell="gru", hidden_size=2, num_layers=1, embedding_dim=2)
    object.__setattr__(
        cfg, "cell", "elman"
    )  # past the check, as a new cell added to one place only would be
    with pytest.raises(ValueError, match="elman"):
        TM.CharRNN(cfg)
    xw, h = jnp.zeros((1, 6), jnp.float32), jnp.zeros((1, 2), jnp.float32)
    w_hh, b_hh = jnp.zeros((6, 2), jnp.float32), jnp.zeros((6,), jnp.float32)
    with pytest.raises(
        ValueError, match="elman"
    ):  # the scan reference's step: no fall-through to the GRU
        M._cell("elman", xw, (h,), w_hh, b_hh)
    with pytest.raises(ValueError, match="elman"):
        fastrnn.layer("elman", xw[None], (h,), w_hh, b_hh, 1)
    assert dataclasses.fields(cfg)  # still a ModelConfig: only the cell was changed


def test_importing_jax_impl_changes_no_jax_setting():
    """In a fresh process (the suite itself switches 64-bit mode on), importing every charclip.jax
    module leaves jax_enable_x64 as it was; an entry point asked for float64 then switches it on."""
    code = """
import jax
before = jax.config.jax_enable_x64
import charclip.jax, charclip.jax.clipping, charclip.jax.distributed, charclip.jax.explode, charclip.jax.fastrnn
import charclip.jax.model, charclip.jax.probe, charclip.jax.sample, charclip.jax.train
after_import = jax.config.jax_enable_x64
# The paper's one-unit network promises float64 too (it once ran in float32 here: only the
# char-RNN entry points switched 64-bit mode on).
E, _, _ = charclip.jax.explode.one_unit_loss_grad(6.0, -2.5, x0=0.5, steps=5, target=0.7)
paper = E.dtype
jax.config.update("jax_enable_x64", False)
from charclip.config import ModelConfig
cfg = ModelConfig(vocab_size=3, cell="rnn", hidden_size=2, num_layers=1, embedding_dim=2)
params = charclip.jax.model.init(cfg, 0, "float64")
print(before, after_import, paper, jax.config.jax_enable_x64, params["head.weight"].dtype)
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "float64", "True", "float64"], out.stdout
