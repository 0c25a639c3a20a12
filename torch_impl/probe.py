"""What the parity tools need from the PyTorch backend beyond its trainer, in public.

Mirrors `jax_impl.probe`: the forward logits of given weights, full float32
precision on a GPU, and the thread setting for running beside JAX.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from charclip.config import ModelConfig
from torch_impl import device as D
from torch_impl import model as M


def logits(model_cfg: ModelConfig, params: dict[str, np.ndarray], x: np.ndarray, hidden, device: str = "cpu",
           compute_dtype: str | None = None) -> np.ndarray:
    """The forward pass's logits (B, T, V) of `params` on tokens x (B, T) from `hidden` (or zeros).

    `compute_dtype` ("bfloat16", "float16"): computed as mixed precision training computes them.
    """
    dev = D.resolve(device)
    with torch.no_grad():
        model = M.build(model_cfg, params, dev, compute_dtype)
        out, _ = model(torch.from_numpy(x).to(dev), M.hidden_from_numpy(hidden, dev))
    return out.cpu().numpy()


@contextlib.contextmanager
def full_precision(device: str):
    """On a GPU, no TF32 in cuDNN or matmuls; yields a note saying so (None on the CPU)."""
    if device != "gpu":
        yield None
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield "torch: full float32 precision pinned (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread while the backends alternate step by step.

    XLA's worker threads keep spinning for a moment after each JAX call; a second
    torch thread then fights them for the cores (measured on 2 cores: one tiny
    torch step took 0.5 s right after a JAX step, 2 ms with one thread).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def port_quantities(module: torch.nn.Module, params: dict[str, np.ndarray], trainable: list[str], batches, *,
                    loss: str, lr: float, max_norm: float) -> dict:
    """A user's `nn.Module` through the port ladder (`charclip.parity.port`), from `params`.

    On the first batch: output, loss, gradients by name, global norm, the gradients after
    `clip_grad_norm_(max_norm)`, parameters after one SGD step. Then one clipped SGD step
    per further batch: the loss and the parameters after each.
    """
    import copy

    dtype = torch.float64 if next(iter(params.values())).dtype == np.float64 else torch.float32
    model = copy.deepcopy(module).to(dtype=dtype).cpu()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD([named[n] for n in trainable], lr=lr)

    def as_tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))
        return t.to(dtype) if t.is_floating_point() else t

    def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if loss == "mse":
            return torch.nn.functional.mse_loss(out, y)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def clipped_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        out = model(as_tensor(x))
        value = loss_of(out, as_tensor(y))
        value.backward()
        grads = {n: named[n].grad.detach().clone() for n in trainable}
        norm = torch.nn.utils.clip_grad_norm_([named[n] for n in trainable], max_norm)
        return out, value, grads, norm

    def snapshot() -> dict[str, np.ndarray]:
        return {n: named[n].detach().numpy().copy() for n in trainable}

    out, value, grads, norm = clipped_step(*batches[0])
    first = {
        "output": out.detach().numpy().copy(), "loss": value.item(),
        "grad": {n: g.numpy().copy() for n, g in grads.items()}, "grad_norm": norm.item(),
        "clipped": {n: named[n].grad.detach().numpy().copy() for n in trainable},
    }
    optimizer.step()
    first["after_step"] = snapshot()
    losses, params_per_step = [value.item()], [first["after_step"]]
    for x, y in batches[1:]:
        _, value, _, _ = clipped_step(x, y)
        optimizer.step()
        losses.append(value.item())
        params_per_step.append(snapshot())
    return {**first, "losses": losses, "params": params_per_step}
