"""The `charclip explode` subcommand."""

from __future__ import annotations

import time

from charclip import runfolder
from charclip.backends import module as backend_module
from charclip.config import ExplodeOptions
from charclip.explode.experiments import DEFAULT, QUICK, run_all
from charclip.explode.report import summary, write_report


def add_parser(sub) -> None:
    # imported here: cli imports this module to register it
    from charclip.cli import HelpFormatter, add_options

    p = sub.add_parser(
        "explode",
        help="show exploding gradients and what clipping does about them, in both backends",
        description="Measure the gradient through time of a vanilla RNN for several spectral radii, train from an "
        "unstable start with no clipping, value clipping and norm clipping, and sweep the norm threshold. Writes "
        "report.md, results.json and figures to --out and prints a summary (docs/exploding-gradients.md).",
        formatter_class=HelpFormatter,
    )
    add_options(p, ExplodeOptions)
    p.set_defaults(func=_main)


def _main(a) -> int:
    from charclip.cli import fill

    o = fill(ExplodeOptions, a)
    backends = o.backends
    for b in backends:
        backend_module(b, "explode")  # a missing framework fails here, in one line
    # Checked before the experiments run: a destination that cannot be written fails now, in one line.
    default = f"runs/explode-{time.strftime('%Y%m%d-%H%M%S')}"
    out = runfolder.writable_folder(o.out or default, "--out")
    if o.paper:
        from charclip.explode.paper import FULL, SMALL, run_paper
        from charclip.explode.paper_report import paper_summary, write_paper_report

        results = run_paper(SMALL if o.quick else FULL, backends, progress=not o.no_progress)
        results["full"] = not o.quick
        try:
            write_paper_report(results, out)
        except OSError as e:
            raise runfolder.os_error(e, f"cannot write the report in {out}") from None
        print(paper_summary(results, out))
        return 0
    results = run_all(QUICK if o.quick else DEFAULT, backends, progress=not o.no_progress)
    results["quick"] = o.quick
    try:
        write_report(results, out)
    except OSError as e:
        raise runfolder.os_error(e, f"cannot write the report in {out}") from None
    print(summary(results, out))
    return 0
