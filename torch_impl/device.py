"""Where the PyTorch backend runs: "cpu" or "gpu" (CUDA), as a `torch.device`."""

from __future__ import annotations

import torch

from charclip.errors import CharclipError


def resolve(device: str) -> torch.device:
    # Intra-op threads stay at torch's default (OMP_NUM_THREADS to change). Measured on 2 cores:
    # the default step takes 124 ms with 2 threads and 219 ms with 1 on an idle machine; only
    # when the cores are busy (other processes, or XLA's pool in the same process) does 1 win.
    if device == "cpu":
        return torch.device("cpu")
    if device != "gpu":
        raise CharclipError(f"unknown device {device!r}; use cpu or gpu")
    if not torch.cuda.is_available():
        raise CharclipError(
            "--device gpu: PyTorch sees no CUDA GPU on this machine; use --device cpu"
        )
    return torch.device("cuda")
