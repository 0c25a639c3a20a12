"""The char-RNN as an ordinary PyTorch module: embedding -> nn.RNN/LSTM/GRU -> linear head."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from charclip.config import ModelConfig

_RNN = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# The kernels those modules' forward() calls (through torch._VF), here for one layer at a time
_ONE_LAYER = {"rnn": torch.rnn_tanh, "lstm": torch.lstm, "gru": torch.gru}


def _module_for(cell: str):
    """The torch module of `cell`; a cell without one is an error, not a fallback."""
    if cell not in _RNN:
        raise ValueError(
            f"charclip.torch has no module for cell {cell!r}; it has {', '.join(_RNN)}"
        )
    return _RNN[cell]


class CharRNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.rnn = _module_for(cfg.cell)(
            cfg.embedding_dim, cfg.hidden_size, cfg.num_layers, batch_first=True
        )
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        # None: compute in the parameters' dtype. bfloat16 / float16: mixed precision (see `forward`).
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, h=None, masks=None):
        """Logits at every step and the final hidden state (a tensor, or (h, c) for an LSTM).

        `masks`: one dropout mask (B, T, H) per layer (`charclip.dropout`), multiplying that
        layer's output; None: no dropout, and the layers run as one nn.RNN/LSTM/GRU call.

        With a `compute_dtype`, the recurrent layers' weights and the head's weight are cast to
        it for this pass (the casts are part of the graph, so the gradients land in the master
        weights' own dtype), embedding rows are gathered in the master dtype and then rounded,
        the carried state and the masks enter in it, and the head's output returns to the
        master dtype before its bias is added, so the two large gradient sums (embedding rows,
        head bias) accumulate in float32: the policy of charclip.jax.model.loss's `compute_dtype`
        too. torch.autocast is not used: on a CPU it leaves nn.LSTM and nn.GRU in float32
        (docs/precision.md).
        """
        cd = self.compute_dtype
        if cd is None:
            e = self.embedding(x)  # (B, T, E)
            if masks is None:
                out, h = self.rnn(e, h)  # (B, T, H); h: (L, B, H)
            else:
                out, h = self._layers_with_dropout(e, h, masks, dict(self.rnn.named_parameters()))
            return self.head(out), h  # (B, T, V)
        master = self.head.weight.dtype
        e = F.embedding(x, self.embedding.weight).to(
            cd
        )  # rows gathered, then rounded: their gradient sums in float32
        weights = {name: p.to(cd) for name, p in self.rnn.named_parameters()}
        if masks is None:
            out, h = torch.func.functional_call(self.rnn, weights, (e, _cast(h, cd)))
        else:
            out, h = self._layers_with_dropout(
                e, _cast(h, cd), tuple(m.to(cd) for m in masks), weights
            )
        logits = (
            F.linear(out, self.head.weight.to(cd)).to(master) + self.head.bias
        )  # the bias added in float32
        return logits, _cast(h, master)

    def _layers_with_dropout(self, seq: torch.Tensor, h, masks, weights: dict[str, torch.Tensor]):
        """The recurrent layers one by one, with layer k's own weights, each output times masks[k].

        nn.LSTM's `dropout=` cannot be used: it draws from torch's generator (JAX cannot draw
        the same units) and never drops the last layer's output, which char-rnn drops before
        the head. Layer k runs the kernel nn.LSTM itself runs, with num_layers 1, so the
        parameters (and the state_dict names) stay those of `self.rnn`; `weights` holds them
        by name, cast to the compute dtype under mixed precision.
        """
        cfg = self.cfg
        if h is None:
            zeros = seq.new_zeros(cfg.num_layers, seq.shape[0], cfg.hidden_size)
            h = tuple(zeros for _ in cfg.state_parts)
        parts = h if isinstance(h, tuple) else (h,)  # nn.LSTM's state is a tuple, others' a tensor
        finals = []
        for k, mask in enumerate(masks):
            layer = [
                weights[f"{name}_l{k}"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            hx = tuple(part[k : k + 1] for part in parts)  # (1, B, H) each
            # (input, hx, weights, bias, num_layers, dropout, train, bidirectional, batch_first), as nn.RNNBase passes them
            out, *state = _ONE_LAYER[cfg.cell](
                seq, hx if len(hx) > 1 else hx[0], layer, True, 1, 0.0, self.training, False, True
            )
            seq = out * mask  # (B, T, H): into the next layer, or the head
            finals.append(state)
        final = tuple(torch.cat(layers, dim=0) for layers in zip(*finals))  # (L, B, H) each
        return seq, final if len(final) > 1 else final[0]


def _cast(h, dtype):
    if h is None:
        return None
    return tuple(t.to(dtype) for t in h) if isinstance(h, tuple) else h.to(dtype)


def build(
    cfg: ModelConfig,
    params: dict[str, np.ndarray],
    device: torch.device | str = "cpu",
    compute_dtype: str | None = None,
) -> CharRNN:
    """A CharRNN holding `params` (PyTorch state_dict names), in their dtype, on `device`.

    `compute_dtype` ("bfloat16", "float16"): run forward and backward in it (`CharRNN.forward`).
    """
    dtype = torch.float64 if next(iter(params.values())).dtype == np.float64 else torch.float32
    model = CharRNN(cfg).to(dtype=dtype)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    if compute_dtype is not None and getattr(torch, compute_dtype) != dtype:
        model.compute_dtype = getattr(torch, compute_dtype)
    return model.to(device)


def loss(model: nn.Module, x: np.ndarray, y: np.ndarray, hidden, masks=None):
    """Mean cross-entropy over every position (nats per character), and the final hidden state.

    `model` is the CharRNN or a wrapper running it (DDP, FSDP); x, y are (B, T) int64;
    `masks`: None, or the dropout masks, one NumPy (B, T, H) per layer.
    """
    device = next(model.parameters()).device
    if masks is not None:
        masks = tuple(torch.from_numpy(m).to(device) for m in masks)
    logits, final = model(torch.from_numpy(x).to(device), hidden, masks)  # (B, T, V)
    target = torch.from_numpy(y).to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)), final


def to_numpy(model: CharRNN) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def hidden_to_numpy(h) -> dict[str, np.ndarray] | None:
    if h is None:
        return None
    if isinstance(h, tuple):
        return {"h": h[0].detach().cpu().numpy().copy(), "c": h[1].detach().cpu().numpy().copy()}
    return {"h": h.detach().cpu().numpy().copy()}


def hidden_from_numpy(h: dict[str, np.ndarray] | None, device: torch.device | str = "cpu"):
    if h is None:
        return None
    if "c" in h:
        return (
            torch.from_numpy(np.array(h["h"])).to(device),
            torch.from_numpy(np.array(h["c"])).to(device),
        )
    return torch.from_numpy(np.array(h["h"])).to(device)
