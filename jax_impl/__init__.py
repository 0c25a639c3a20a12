"""The char-RNN and its clipping in functional JAX (jitted `lax.scan`, optax).

Importing this package switches on JAX's 64-bit mode so that `--dtype float64`
means float64. Every array here is created with an explicit dtype, so float32
runs stay float32.
"""

import jax

jax.config.update("jax_enable_x64", True)
