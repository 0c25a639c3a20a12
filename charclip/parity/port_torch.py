"""The torch side of `prove_port`: forward hooks on every submodule, the loss, gradients,
clipping, a torch.optim step and the trajectory, all from one set of weights.

Imported by `charclip.parity.port` only when a proof runs (it imports torch).
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from torch import nn

from charclip.errors import CharclipError

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def check_no_active_dropout(model: nn.Module) -> None:
    """A model in training mode with dropout active draws random masks: refuse it in one line."""
    if not model.training:
        return
    for name, m in model.named_modules():
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", 0.0)
        if m.training and isinstance(p, float) and p > 0:
            raise CharclipError(
                f"the torch model is in training mode with dropout active ({name or 'the model'}, "
                f"p={p:g}); call model.eval() or set its dropout to 0 before proving a port"
            )


@contextlib.contextmanager
def pinned_precision():
    """No TF32 anywhere (matmuls, cuDNN): full float32 matmul precision; yields what was pinned."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield (
            "torch: TF32 off (backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False), "
            "float32 matmul precision 'highest'"
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def reduction_length(m: nn.Module, inputs: tuple, output) -> int:
    """How many terms the longest sum in this module's output adds (its rounding count per element)."""
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels // m.groups * math.prod(m.kernel_size)
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return 2 * math.prod(m.normalized_shape)  # a mean, then a variance
    if isinstance(m, nn.GroupNorm):
        return (
            2 * (first.shape[1] // m.num_groups) * math.prod(first.shape[2:])
            if first is not None
            else 1
        )
    if isinstance(m, nn.MultiheadAttention):
        seq = (
            first.shape[0 if not m.batch_first else 1]
            if first is not None and first.dim() == 3
            else 1
        )
        return (
            3 * m.embed_dim + seq
        )  # projections, scores over head dims, the softmax-weighted sum over keys
    if isinstance(m, nn.RNNBase):
        seq = (
            first.shape[1 if m.batch_first else 0] if first is not None and first.dim() == 3 else 1
        )
        return (
            m.num_layers * seq * (m.input_size + m.hidden_size)
        )  # rounding fed back through the recurrence
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training and first is not None:
            return (
                2 * first.numel() // first.shape[1]
            )  # batch statistics: a mean and a variance per channel
        return 4  # eval: (x - mean) / sqrt(var + eps) * weight + bias, elementwise
    if isinstance(m, nn.modules.pooling._MaxPoolNd):
        return 0  # a maximum rounds nothing
    if isinstance(m, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)):
        return (
            max(int(first[0].numel() // max(output[0].numel(), 1)), 1) if first is not None else 1
        )
    if any(True for _ in m.children()):
        return 0  # a container: its children's hooks count its work
    if isinstance(m, nn.Embedding) or not any(True for _ in m.parameters(recurse=False)):
        return 1  # a lookup or an elementwise function (activation, flatten): one rounding
    return (
        1 if first is None else int(first.shape[-1])
    )  # another leaf with weights: its input's last axis


def _leaves(out) -> list[np.ndarray]:
    """The floating tensors of a module's output (a tensor, or a tuple such as an RNN's (output, h_n))."""
    if isinstance(out, torch.Tensor):
        return [
            out.detach().float().numpy().copy()
            if out.dtype == torch.bfloat16
            else out.detach().numpy().copy()
        ]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _leaves(o)]
    return []


def build_optimizer(params: list[torch.Tensor], opt, lr: float) -> torch.optim.Optimizer:
    if opt.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
        )
    cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def loss_of(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return nn.functional.mse_loss(out, y)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def run(
    module: nn.Module,
    params: dict[str, np.ndarray],
    trainable: list[str],
    batches,
    *,
    dtype: str,
    loss: str,
    opt,
    lr: float,
    max_norm: float | None,
    clip_value: float | None,
    ladder: bool = True,
) -> dict:
    """The torch side of the proof from `params` (a state_dict as NumPy).

    `ladder`: on the first batch, also the hooked submodule outputs (in execution order, each with
    its reduction length), the output, loss, gradients, norm, clipped gradients and the first
    update. Always: the loss and the trainable parameters after each step, one step per batch.
    """
    tdtype = TORCH_DTYPES[dtype]
    model = copy.deepcopy(module).to(dtype=tdtype).cpu()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    named = dict(model.named_parameters())
    group = [named[n] for n in trainable]
    optimizer = build_optimizer(group, opt, lr)
    owner = {id(p): n for n, p in named.items()}
    record: list = []
    used: list[str] = []
    handles = []

    def hook(name):
        def fn(m, inputs, output):
            record.append((name, _leaves(output), reduction_length(m, inputs, output)))
            for p in m.parameters(recurse=False):
                if owner.get(id(p)) in trainable and owner[id(p)] not in used:
                    used.append(owner[id(p)])

        return fn

    if ladder:
        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]

    def tensor(a) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))
        return t.to(tdtype) if t.is_floating_point() else t

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        out = model(tensor(x))
        value = loss_of(loss, out, tensor(y))
        value.backward()
        for h in handles:
            h.remove()
        handles.clear()
        grads = {n: named[n].grad.detach().clone() for n in trainable}
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
        )
        if max_norm is not None:
            nn.utils.clip_grad_norm_(group, max_norm)
        if clip_value is not None:
            nn.utils.clip_grad_value_(group, clip_value)
        return out, value, grads, norm

    def numpy(t: torch.Tensor) -> np.ndarray:
        t = t.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()

    def snapshot() -> dict[str, np.ndarray]:
        return {n: numpy(named[n]) for n in trainable}

    result: dict = {}
    start = snapshot()
    losses, per_step = [], []
    for i, (x, y) in enumerate(batches):
        out, value, grads, norm = step(x, y)
        if i == 0 and ladder:
            result = {
                "taps": record,
                "use_order": used + [n for n in trainable if n not in used],
                "output": numpy(out),
                "loss": value.item(),
                "grad": {n: numpy(g) for n, g in grads.items()},
                "grad_norm": norm.item(),
                "clipped": {n: numpy(named[n].grad) for n in trainable},
                "out_rows": int(np.prod(out.shape[:-1])) if out.dim() > 1 else 1,
            }
        optimizer.step()
        losses.append(value.item())
        per_step.append(snapshot())
    if ladder:
        result["update"] = {n: per_step[0][n] - start[n] for n in trainable}
        result["start"] = start
    return {**result, "losses": losses, "params": per_step}
