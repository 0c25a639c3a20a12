"""The `charclip parity` and `charclip prove` subcommands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from charclip import runfolder
from charclip.config import CELLS, ParityOptions, option
from charclip.errors import CharclipError
from charclip.parity.ladder import run_parity
from charclip.parity.port import UNIT_ROUNDOFF
from charclip.parity.report import format_table, plot_drift


def add_parser(sub) -> None:
    # imported here: cli imports this module to register it
    from charclip.cli import HelpFormatter, add_options

    p = sub.add_parser(
        "parity",
        help="prove torch and JAX compute the same thing, quantity by quantity",
        description="Run the PyTorch and the JAX model from the same weights on the same batches and compare the "
        "forward pass, loss, every gradient, the global norm, clipped gradients, an Adam update, a training "
        "trajectory and sampled text. Prints a table; exits 1 when something disagrees.",
        formatter_class=HelpFormatter,
    )
    add_options(p, ParityOptions)
    p.set_defaults(func=_main)
    _add_prove(sub)


@dataclass(frozen=True)
class ProveOptions:
    """`charclip prove SPEC.py`: what overrides the spec's own `options`."""

    dtype: str | None = option(
        None,
        flag="--dtype",
        choices=tuple(UNIT_ROUNDOFF),
        type=str,
        resume="used",
        shown="the spec's",
        help="override the spec's dtype (float64 proves the algorithm, the others add their rounding)",
    )
    no_trajectory: bool = option(
        False,
        flag="--no-trajectory",
        action="store_true",
        resume="used",
        help="stop after the first optimizer step",
    )


def _add_prove(sub) -> None:
    from charclip.cli import HelpFormatter, add_options

    p = sub.add_parser(
        "prove",
        help="prove your JAX port of a torch model, naming the first layer where they part",
        description="Run SPEC.py, a file that defines `torch_model` (an nn.Module), `jax_forward` (a function "
        "(params, x) over the state_dict's names, a Flax NNX or an Equinox module), `batches` (a list of (x, y) "
        "NumPy pairs) and optionally `options` (a dict of charclip.parity.prove_port's keyword arguments); prove "
        "the port; print the table. Exits 1 when the two sides diverge (docs/porting.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "spec",
        metavar="SPEC.py",
        help="the file defining torch_model, jax_forward, batches, options",
    )
    add_options(p, ProveOptions)
    p.set_defaults(func=_prove)


def _prove(a) -> int:
    import runpy

    from charclip.cli import fill
    from charclip.parity.port import prove_port

    path = Path(a.spec)
    if not path.is_file():
        raise CharclipError(f"SPEC.py {a.spec!r} is not a file")
    spec = runpy.run_path(str(path))
    missing = [n for n in ("torch_model", "jax_forward", "batches") if n not in spec]
    if missing:
        raise CharclipError(
            f"SPEC.py {a.spec} defines no {missing[0]!r} (it needs torch_model, jax_forward, batches)"
        )
    o = fill(ProveOptions, a)
    options = dict(spec.get("options") or {})
    if o.dtype:
        options["dtype"] = o.dtype
    if o.no_trajectory:
        options["trajectory"] = False
    report = prove_port(spec["torch_model"], spec["jax_forward"], spec["batches"], **options)
    print(report.table())
    return 0 if report.ok else 1


def _main(a) -> int:
    from charclip.cli import fill

    o = fill(ParityOptions, a)
    # Checked before the comparison runs: an output that cannot be written fails now, in one line.
    json_path = runfolder.writable_file(o.json, "--json") if o.json else None
    plot_path = runfolder.writable_file(o.plot, "--plot") if o.plot else None
    cells = CELLS if o.cell == "all" else (o.cell,)
    reports = []
    for cell in cells:
        rep = run_parity(
            cell,
            o.layers,
            o.dtype,
            o.steps,
            device=o.device,
            hidden_size=o.hidden,
            embedding_dim=max(o.hidden // 2, 1),
            batch_size=o.batch_size,
            seq_len=o.seq_len,
            seed=o.seed,
            clip_impl=o.ladder_clip_impl,
            progress=not o.no_progress,
            precision=o.precision,
            dropout=o.dropout,
        )
        c = rep.config
        precision = "" if o.precision == "full" else f" ({o.precision} mixed precision)"
        print(
            f"\n{cell} {c['layers']}x{c['hidden']} (embedding {c['embedding']}, "
            f"vocabulary {c['vocab']}), {o.dtype}{precision}, batch {c['batch']}x{c['seq_len']}, "
            f"{o.device}, clipping: {o.clip_impl}"
            + (f", dropout {o.dropout:g}" if o.dropout else "")
        )
        for note in rep.notes:
            print(note)
        print(format_table(rep.rows))
        reports.append(rep)
    bad = [f"{r.config['cell']}: {row.quantity}" for r in reports for row in r.rows if not row.ok]
    print(
        "\nall quantities agree"
        if not bad
        else f"\n{len(bad)} quantities DIFFER: " + "; ".join(bad)
    )
    try:
        if json_path:
            runfolder.write_file(
                json_path, json.dumps([r.to_dict() for r in reports], indent=1, default=float)
            )
            print(f"json: {json_path}")
        if plot_path:
            print(f"plot: {plot_drift(reports, plot_path)}")
    except OSError as e:
        raise runfolder.os_error(e, "cannot write the report") from None
    return 0 if not bad else 1
