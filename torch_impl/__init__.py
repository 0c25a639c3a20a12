"""The char-RNN and its clipping in PyTorch (nn.Module, clip_grad_norm_)."""
