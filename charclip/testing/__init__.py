"""A conformance kit for gradient clipping: Hypothesis strategies, named promises, a report.

    from charclip.testing import check_clipper, gradient_trees

    report = check_clipper(my_clip, framework="torch")   # or "jax", "numpy"
    print(report.table())
    assert report.ok            # or report.ok_except({"tau_zero"})

A tool, not part of the framework-neutral core: it needs only Hypothesis and NumPy, and
imports torch or JAX only when a check or a strategy asks for that framework.

- `strategies`: `gradient_trees`, `thresholds` (documented there);
- `oracle`: exact sums of squares (rationals), the exact norm;
- `promises`: the named promises (`PROMISES`) and their checks;
- `adapters`: calling conventions (in place on parameters, functional, optax, Keras);
- `check`: `check_clipper`, `Report`, `Row`;
- `controls`: deliberately wrong clippers, each breaking named promises;
- `targets`, `command`: the libraries' table and `charclip conform`.
"""

import importlib

# Loaded on first use (PEP 562), so that `charclip conform`'s parser, registered by the CLI,
# costs no Hypothesis import: name -> the module defining it.
_WHERE = {
    "functional": "adapters",
    "inplace_torch": "adapters",
    "keras_option": "adapters",
    "optax_transformation": "adapters",
    "Report": "check",
    "Row": "check",
    "check_clipper": "check",
    "exact_norm": "oracle",
    "norm_at_most": "oracle",
    "sum_of_squares": "oracle",
    "PROMISES": "promises",
    "Output": "promises",
    "DTYPES": "strategies",
    "gradient_trees": "strategies",
    "thresholds": "strategies",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'charclip.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"charclip.testing.{_WHERE[name]}"), name)


def __dir__():
    return __all__
