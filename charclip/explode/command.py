"""The `charclip explode` subcommand."""

from __future__ import annotations

import time

from charclip import runfolder
from charclip.backends import module as backend_module
from charclip.contract import BACKENDS
from charclip.explode.experiments import DEFAULT, QUICK, run_all
from charclip.explode.report import summary, write_report

def add_parser(sub) -> None:
    from charclip.cli import HelpFormatter  # imported here: cli imports this module to register it

    p = sub.add_parser(
        "explode", help="show exploding gradients and what clipping does about them, in both backends",
        description="Measure the gradient through time of a vanilla RNN for several spectral radii, train from an "
        "unstable start with no clipping, value clipping and norm clipping, and sweep the norm threshold. Writes "
        "report.md, results.json and figures to --out and prints a summary (docs/exploding-gradients.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", metavar="DIR", help="folder for report.md, results.json and figures (default: runs/explode-<time>)")
    p.add_argument("--quick", action="store_true", help="fewer steps and thresholds: under a minute")
    p.add_argument("--backend", choices=("torch", "jax", "both"), default="both", help="framework(s) to run in")
    p.add_argument("--paper", action="store_true", help="rerun Pascanu, Mikolov & Bengio (2013) instead: the cliff, "
                   "the bifurcation view and the temporal-order task (docs/paper-rerun.md); with --quick, the small setting")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(a) -> int:
    backends = BACKENDS if a.backend == "both" else (a.backend,)
    for b in backends:
        backend_module(b, "explode")  # a missing framework fails here, in one line
    # Checked before the experiments run: a destination that cannot be written fails now, in one line.
    out = runfolder.writable_folder(a.out or f"runs/explode-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    if a.paper:
        from charclip.explode.paper import FULL, SMALL, run_paper
        from charclip.explode.paper_report import paper_summary, write_paper_report

        results = run_paper(SMALL if a.quick else FULL, backends, progress=not a.no_progress)
        results["full"] = not a.quick
        try:
            write_paper_report(results, out)
        except OSError as e:
            raise runfolder.os_error(e, f"cannot write the report in {out}") from None
        print(paper_summary(results, out))
        return 0
    results = run_all(QUICK if a.quick else DEFAULT, backends, progress=not a.no_progress)
    results["quick"] = a.quick
    try:
        write_report(results, out)
    except OSError as e:
        raise runfolder.os_error(e, f"cannot write the report in {out}") from None
    print(summary(results, out))
    return 0
