"""charclip: one character-level RNN and one gradient-clipping algorithm, written twice.

This package is the framework-neutral part: corpus, vocabulary, batching,
configuration, initial weights, checkpoint format, sampling draws and the CLI.
It imports neither PyTorch nor JAX; `charclip.torch` and `charclip.jax` import it.

Import paths: `charclip.torch` (the PyTorch backend, folder `torch_impl/` in the
repository), `charclip.jax` (the JAX backend, folder `jax_impl/`) and
`charclip.benchmarks` (folder `benchmarks/`). An installed wheel holds them inside
`charclip/` (pyproject's package-dir), so nothing but `charclip` lands in
site-packages; a source checkout (`PYTHONPATH=.`) reaches the same names through
`_CheckoutFinder` below.
"""

import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

# import path -> the repository folder that holds it (the same map as pyproject's package-dir)
SOURCE_FOLDERS = {
    "charclip.torch": "torch_impl",
    "charclip.jax": "jax_impl",
    "charclip.benchmarks": "benchmarks",
}


class _CheckoutFinder:
    """Finds charclip.torch / .jax / .benchmarks in a source checkout, beside this folder.

    It answers only for those three names, and only when the folder sits beside the
    `charclip` package actually imported, so the backends always come from the same
    checkout as the core (first in `sys.meta_path`: an editable install of another
    checkout, whose finder maps the same names, must not win). An installed wheel has no
    such folder beside it, and its `charclip/torch/` is found the usual way."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        folder = SOURCE_FOLDERS.get(fullname)
        if folder is None:
            return None
        init = _Path(__file__).resolve().parent.parent / folder / "__init__.py"
        if not init.is_file():
            return None
        from importlib.util import spec_from_file_location

        return spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


if not any(getattr(f, "__name__", "") == "_CheckoutFinder" for f in _sys.meta_path):
    _sys.meta_path.insert(0, _CheckoutFinder)
