"""The char-RNN and its clipping in functional JAX (jitted `lax.scan`, optax).

Importing this package changes no JAX setting. The entry points that compute (the
trainers, `train.make_train_step`, `model.init`, `sample.sample`, `probe`, `explode`) switch
on JAX's 64-bit mode when called (`device.enable_x64`): float64 runs need it, and every
run's clipping measures norms in float64 (`charclip.jax.clipping`). Every array here is created
with an explicit dtype, so float32 runs stay float32. Calling the lower-level functions
directly needs 64-bit mode first (`model.apply` and `fastrnn` on float64 arrays, `clipping`
on any, since it measures in float64): `charclip.jax.device.enable_x64()`, or JAX_ENABLE_X64=1
in the environment.
"""
