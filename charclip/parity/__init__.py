"""Cross-backend parity: the ladder, its tolerance table, the report and `charclip parity`.

A tool, not part of the framework-neutral core: running the ladder imports both
backends (through `charclip.backends`). Importing this package imports neither.

- `tolerances`: the one tolerance table (each bound with its reason) and the error metrics;
- `ladder`: one step seen from each backend (forward, loss, gradients by name, norm,
  clipped gradients, Adam update), a training trajectory, sampled text, `run_parity`;
- `report`: the report, its table and the drift plot;
- `port`: `prove_port` and `assert_port_equal`, a model of your own against its JAX rewrite
  (a function, a Flax NNX or an Equinox module), localised to the first diverging layer;
- `tap`: `tap(name, value)`, marking a value in a JAX port for that localisation;
- `command`: the `charclip parity` subcommand.
"""

from charclip.contract import BACKENDS
from charclip.parity.command import add_parser
from charclip.parity.ladder import (
    StepSetup,
    Trajectory,
    clipping_threshold,
    compare_quantities,
    compare_step,
    make_step_setup,
    run_parity,
    sample_row,
    step_quantities,
    trajectory,
    trajectory_rows,
)
from charclip.parity.port import Divergence, Optimizer, PortReport, assert_port_equal, prove_port
from charclip.parity.report import Report, format_table, plot_drift
from charclip.parity.tap import tap
from charclip.parity.tolerances import (
    TOLERANCES,
    Row,
    Tolerance,
    compare,
    compare_group,
    errors,
    library_gap,
    widen,
)

__all__ = [
    "BACKENDS",
    "TOLERANCES",
    "Report",
    "Row",
    "StepSetup",
    "Tolerance",
    "Trajectory",
    "add_parser",
    "clipping_threshold",
    "compare",
    "compare_group",
    "compare_quantities",
    "compare_step",
    "errors",
    "format_table",
    "library_gap",
    "make_step_setup",
    "Divergence",
    "Optimizer",
    "PortReport",
    "assert_port_equal",
    "plot_drift",
    "prove_port",
    "tap",
    "run_parity",
    "sample_row",
    "step_quantities",
    "trajectory",
    "trajectory_rows",
    "widen",
]
