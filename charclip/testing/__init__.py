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

from charclip.testing.adapters import functional, inplace_torch, keras_option, optax_transformation
from charclip.testing.check import Report, Row, check_clipper
from charclip.testing.oracle import exact_norm, norm_at_most, sum_of_squares
from charclip.testing.promises import PROMISES, Output
from charclip.testing.strategies import DTYPES, gradient_trees, thresholds

__all__ = [
    "DTYPES", "PROMISES", "Output", "Report", "Row", "check_clipper", "exact_norm", "functional", "gradient_trees",
    "inplace_torch", "keras_option", "norm_at_most", "optax_transformation", "sum_of_squares", "thresholds",
]
