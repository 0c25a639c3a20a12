"""`charclip explode`: exploding gradients and their cure, measured in both backends.

A tool, not part of the framework-neutral core: the experiments run the backends
(through `charclip.backends`); importing this package imports neither.

- `experiments`: gradient through time against rho^k and the Jacobian bounds, training
  from an unstable start with no, value and norm clipping, the threshold sweep;
- `figures`: the four figures;
- `report`: report.md, results.json and the console summary;
- `command`: the `charclip explode` subcommand;
- `paper`, `paper_report`: `charclip explode --paper`, Pascanu, Mikolov & Bengio (2013) rerun
  (docs/paper-rerun.md).
"""

from charclip.explode.command import add_parser
from charclip.explode.experiments import (
    DEFAULT,
    MODES,
    QUICK,
    RHOS,
    Settings,
    gradient_through_time,
    growth_per_step,
    jacobian_bounds,
    run_all,
    train_config,
    train_run,
    verdict,
)
from charclip.explode.figures import (
    plot_bounds,
    plot_gradient_through_time,
    plot_sweep,
    plot_training,
)
from charclip.explode.report import summary, write_report

__all__ = [
    "DEFAULT",
    "MODES",
    "QUICK",
    "RHOS",
    "Settings",
    "add_parser",
    "gradient_through_time",
    "growth_per_step",
    "jacobian_bounds",
    "plot_bounds",
    "plot_gradient_through_time",
    "plot_sweep",
    "plot_training",
    "run_all",
    "summary",
    "train_config",
    "train_run",
    "verdict",
    "write_report",
]
