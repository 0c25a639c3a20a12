"""charclip: one character-level RNN and one gradient-clipping algorithm, written twice.

This package is the framework-neutral part: corpus, vocabulary, batching,
configuration, initial weights, checkpoint format, sampling draws and the CLI.
It imports neither PyTorch nor JAX; `torch_impl` and `jax_impl` import it.
"""

__version__ = "0.1.0"
