"""Prove a port of your own model: a torch `nn.Module` against a JAX function over its `state_dict`.

The same ladder `charclip parity` climbs for charclip's char-RNN, for any model:

    from charclip.parity import prove_port

    report = prove_port(torch_module, jax_apply, batches, loss="mse", lr=0.1, max_norm=1.0)
    print(report.table())         # quantity, max abs err, max rel err, tolerance, reason, verdict
    assert report.ok

- `torch_module`: any `nn.Module`; its `state_dict()` is the one set of weights both sides use
  (cast to `dtype`).
- `jax_apply(params, x)`: your JAX forward pass, where `params` is a dict with the state_dict's
  names and shapes (so a weight is `params["fc1.weight"]`, (out, in), as in torch).
- `batches`: a list of (x, y) NumPy pairs; the first is the one-step ladder, all of them the
  trajectory. `loss`: "mse" (y the same shape as the output) or "cross_entropy" (output
  (..., C) logits, y integer classes).

Rungs, each against the one tolerance table (`charclip.parity.TOLERANCES`, every bound with its
reason): forward output, loss, each parameter's gradient by name, the global gradient norm, the
gradients after norm clipping (torch `clip_grad_norm_` against `optax.clip_by_global_norm`,
whose known 1e-6/tau difference widens that bound and says so), the parameters after one
clipped SGD step, and the loss and parameters over the whole trajectory. A wrong port fails
a rung; the first failing rung says where to look.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charclip import backends
from charclip.errors import CharclipError
from charclip.parity.report import format_table
from charclip.parity.tolerances import TOLERANCES, Row, compare, compare_group, errors, library_gap, widen

LOSSES = ("mse", "cross_entropy")


@dataclass
class PortReport:
    rows: list[Row]
    dtype: str

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    def table(self) -> str:
        return format_table(self.rows)


def prove_port(torch_module, jax_apply, batches, *, loss: str = "mse", lr: float = 0.1, max_norm: float = 1.0,
               dtype: str = "float64") -> PortReport:
    """Compare a torch module and a JAX function over its state_dict, rung by rung (module docstring)."""
    if loss not in LOSSES:
        raise CharclipError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if dtype not in TOLERANCES:
        raise CharclipError(f"unknown dtype {dtype!r}; use one of {', '.join(TOLERANCES)}")
    batches = list(batches)
    if not batches:
        raise CharclipError("prove_port needs at least one (x, y) batch")
    if not (max_norm > 0 and lr > 0):
        raise CharclipError(f"max_norm and lr must be positive (got {max_norm}, {lr})")
    params = {k: v.detach().cpu().numpy().astype(dtype) for k, v in torch_module.state_dict().items()}
    trainable = [n for n, p in torch_module.named_parameters() if p.requires_grad]
    kw = dict(loss=loss, lr=lr, max_norm=max_norm)
    t = backends.module("torch", "probe").port_quantities(torch_module, params, trainable, batches, **kw)
    j = backends.module("jax", "probe").port_quantities(jax_apply, params, trainable, batches, **kw)
    return PortReport(_rows(t, j, dtype, max_norm), dtype)


def _rows(t: dict, j: dict, dtype: str, max_norm: float) -> list[Row]:
    tol = TOLERANCES[dtype]
    gap = library_gap("library", max_norm)  # torch divides by norm + 1e-6, optax by norm
    rows = [compare("forward output", t["output"], j["output"], tol["forward"]),
            compare("loss", t["loss"], j["loss"], tol["loss"])]
    rows += [compare(f"grad {name}", t["grad"][name], j["grad"].get(name, np.full(1, np.nan)), tol["grad"])
             for name in t["grad"]]
    rows.append(compare("global grad norm", t["grad_norm"], j["grad_norm"], tol["norm"]))
    rows.append(compare_group(f"norm-clipped grads (tau={max_norm:g})", t["clipped"], j["clipped"],
                              widen(tol["clipped"], gap)))
    rows.append(compare_group("parameters after one clipped SGD step", t["after_step"], j["after_step"],
                              widen(tol["sgd_step"], gap)))
    steps = len(t["losses"])
    traj = widen(tol["sgd_trajectory"], steps * gap, " x steps")
    worst = [max(errors(a[k], b[k])[1] for k in a) for a, b in zip(t["params"], j["params"])]
    at = int(np.argmax(worst))
    rows.append(Row(f"parameters over {steps} steps (worst: step {at + 1})", float("nan"), worst[at], traj.rel,
                    traj.reason, bool(worst[at] <= traj.rel)))
    loss_rel = errors(t["losses"], j["losses"])[1]
    rows.append(Row(f"loss over {steps} steps", float("nan"), loss_rel, traj.rel, traj.reason, bool(loss_rel <= traj.rel)))
    return rows
