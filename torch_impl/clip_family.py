"""The rest of optax's clipping family for torch: AGC, block RMS, per-example clipping.

torch has none of these (adaptive gradient clipping was asked for in pytorch#57503).
They follow torch's conventions, as `torch.nn.utils.clip_grad_value_` does:

    adaptive_grad_clip_(parameters, clipping, eps=1e-3) -> None
        clips each parameter's `.grad` in place, unit by unit, against the parameter;
    clip_grad_block_rms_(parameters, threshold) -> None
        scales each `.grad` in place so that its root mean square is <= threshold;
    per_example_global_norm_clip(grads, l2_norm_clip) -> (list[Tensor], Tensor)
        on tensors with the batch first (as `torch.func.vmap(grad(...))` returns them):
        the sum over the batch of the clipped per-example gradients, and how many
        examples were scaled down (an int64 tensor). Not in place: the sum has another
        shape.

The math is written once in docs/clipping-family.md; it is optax's, and the JAX drop-ins
(`jax_impl/clip_family.py`) compute the same expressions, so both backends agree to the
rounding of a sum (parity_tests/parity/test_clip_family.py). A unit in torch's layout is
a slice along dim 0, the output (Linear weights are (out, in), convolution weights
(out, in, *kernel)); optax's kernels put the output last. A tensor with at most one
dimension larger than 1 (a bias, a scalar, a (1, n) or (n, 1) weight) is one unit, as
in optax. No coefficient is branched on (`torch.where`), so nothing waits for the device.
A negative or NaN threshold raises ValueError.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from charclip.clipspec import check_threshold

AGC_DIV_EPS = 1e-6  # optax's floor on the gradient's unit norm before dividing

Tensors = torch.Tensor | Iterable[torch.Tensor]


def _with_grads(parameters: Tensors) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Each output unit's 2-norm (torch's layout: the unit is a slice along dim 0),
    broadcast to `x`'s shape; the whole tensor for scalars, vectors and (1, n) / (n, 1)."""
    squares = x * x
    if sum(d != 1 for d in x.shape) <= 1:
        squared = squares.sum()
    else:
        squared = squares.sum(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.sqrt(squared).expand(x.shape)


@torch.no_grad()
def adaptive_grad_clip_(parameters: Tensors, clipping: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021), in place on each `.grad`:

        m_u = clipping * max(||w_u||, eps)   for each output unit u
        g_u <- g_u  if ||g_u|| < m_u,  else  g_u * m_u / max(||g_u||, 1e-6)

    Args:
      parameters: a tensor or an iterable of tensors whose `.grad` is clipped; the
        parameter's own values are the reference (`p.detach()`).
      clipping: the largest allowed ratio of a unit's gradient norm to its weight norm.
      eps: the floor on the weight norm (so zero-initialised units can still move).

    Returns:
      None.
    """
    clipping = check_threshold("clipping", clipping)
    eps = check_threshold("eps", eps)
    for p in _with_grads(parameters):
        g = p.grad
        g_norm = unitwise_norm(g)
        max_norm = clipping * torch.clamp(unitwise_norm(p.detach()), min=eps)
        clipped = g * (max_norm / torch.clamp(g_norm, min=AGC_DIV_EPS))
        g.copy_(torch.where(g_norm < max_norm, g, clipped))


@torch.no_grad()
def clip_grad_block_rms_(parameters: Tensors, threshold: float) -> None:
    """Scale each `.grad` in place so that its root mean square is at most `threshold`:

        g <- g / max(1, rms(g) / threshold)      (a zero gradient stays zero at threshold 0)

    Args:
      parameters: a tensor or an iterable of tensors whose `.grad` is clipped.
      threshold: the largest root mean square of each gradient tensor.

    Returns:
      None.
    """
    threshold = check_threshold("threshold", threshold)
    for p in _with_grads(parameters):
        g = p.grad
        ratio = torch.sqrt(torch.mean(g * g)) / threshold
        # max(1, ratio) as a select: 0 / 0 = NaN is not > 1, so a zero gradient stays zero.
        g.div_(torch.where(ratio > 1, ratio, torch.ones_like(ratio)))


@torch.no_grad()
def per_example_global_norm_clip(
    grads: Iterable[torch.Tensor], l2_norm_clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip each example's gradient to global norm `l2_norm_clip`, then sum over the batch
    (the clipping step of DP-SGD, Abadi et al. 2016; optax's `per_example_global_norm_clip`):

        c_b = min(1, C / ||g_b||)  (1 where that is NaN);   returns (sum_b c_b g_b, #{c_b < 1})

    Args:
      grads: tensors of per-example gradients, each with the batch on dim 0.
      l2_norm_clip: C, the largest global norm of one example's gradient.

    Returns:
      `(clipped_sum, num_clipped)`: a list with one tensor per input (the batch summed
      away) and an int64 tensor counting the examples scaled down.
    """
    l2_norm_clip = check_threshold("l2_norm_clip", l2_norm_clip)
    grads = list(grads)
    if not grads or any(g.ndim == 0 for g in grads):
        raise ValueError("per_example_global_norm_clip needs tensors with a batch dim first")
    if len({g.shape[0] for g in grads}) != 1:
        raise ValueError(
            "per_example_global_norm_clip: every tensor needs the same batch size on dim 0 "
            f"(got {[g.shape[0] for g in grads]})"
        )
    squared = sum((g * g).reshape(g.shape[0], -1).sum(dim=1) for g in grads)  # (B,)
    ratio = torch.clamp(l2_norm_clip / torch.sqrt(squared), max=1.0)
    multipliers = torch.nan_to_num(ratio, nan=1.0)
    num_clipped = (multipliers < 1.0).sum()
    return [torch.tensordot(multipliers.to(g.dtype), g, dims=1) for g in grads], num_clipped
