"""The `charclip parity` and `charclip prove` subcommands."""

from __future__ import annotations

import json

from charclip import runfolder
from charclip.config import CELLS, DTYPES, PRECISIONS
from charclip.errors import CharclipError
from charclip.parity.ladder import run_parity
from charclip.parity.report import format_table, plot_drift


def add_parser(sub) -> None:
    from charclip.cli import (
        HelpFormatter,  # imported here: cli imports this module to register it
    )

    p = sub.add_parser(
        "parity", help="prove torch and JAX compute the same thing, quantity by quantity",
        description="Run the PyTorch and the JAX model from the same weights on the same batches and compare the "
        "forward pass, loss, every gradient, the global norm, clipped gradients, an Adam update, a training "
        "trajectory and sampled text. Prints a table; exits 1 when something disagrees.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--cell", choices=(*CELLS, "all"), default="lstm", help="recurrent cell compared (all: each in turn)")
    p.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    p.add_argument("--dtype", choices=DTYPES, default="float64",
                   help="float64 shows the algorithms agree; float32 shows the rounding they add")
    p.add_argument("--precision", choices=PRECISIONS, default="full",
                   help="bf16 / fp16: both backends train in mixed precision (needs --dtype float32); tolerances "
                   "derived from the unit roundoff")
    p.add_argument("--steps", type=int, default=50, help="length of the compared training trajectory")
    p.add_argument("--hidden", type=int, default=32, help="hidden units per layer")
    p.add_argument("--batch-size", type=int, default=8, help="parallel streams per batch")
    p.add_argument("--seq-len", type=int, default=32, help="truncated-BPTT length")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where both backends run")
    p.add_argument("--clip-impl", choices=("library", "reference"), default="reference",
                   help="clipping compared: charclip's reference implementations (one convention on both sides) "
                   "or the libraries' (torch adds 1e-6 to the norm, optax does not)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial weights and batches")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="train the compared trajectory with dropout P, both backends given the same masks")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PATH", help="write the per-step drift plot (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)
    _add_prove(sub)


def _add_prove(sub) -> None:
    from charclip.cli import HelpFormatter

    p = sub.add_parser(
        "prove", help="prove your JAX port of a torch model, naming the first layer where they part",
        description="Run SPEC.py, a file that defines `torch_model` (an nn.Module), `jax_forward` (a function "
        "(params, x) over the state_dict's names, a Flax NNX or an Equinox module), `batches` (a list of (x, y) "
        "NumPy pairs) and optionally `options` (a dict of charclip.parity.prove_port's keyword arguments); prove "
        "the port; print the table. Exits 1 when the two sides diverge (docs/porting.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC.py", help="the file defining torch_model, jax_forward, batches, options")
    p.add_argument("--dtype", choices=("float64", "float32", "bfloat16"),
                   help="override the spec's dtype (float64 proves the algorithm, the others add their rounding)")
    p.add_argument("--no-trajectory", action="store_true", help="stop after the first optimizer step")
    p.set_defaults(func=_prove)


def _prove(a) -> int:
    import runpy

    from charclip.parity.port import prove_port

    path = Path(a.spec)
    if not path.is_file():
        raise CharclipError(f"SPEC.py {a.spec!r} is not a file")
    spec = runpy.run_path(str(path))
    missing = [n for n in ("torch_model", "jax_forward", "batches") if n not in spec]
    if missing:
        raise CharclipError(f"SPEC.py {a.spec} defines no {missing[0]!r} (it needs torch_model, jax_forward, batches)")
    options = dict(spec.get("options") or {})
    if a.dtype:
        options["dtype"] = a.dtype
    if a.no_trajectory:
        options["trajectory"] = False
    report = prove_port(spec["torch_model"], spec["jax_forward"], spec["batches"], **options)
    print(report.table())
    return 0 if report.ok else 1


def _main(a) -> int:
    for name in ("layers", "hidden", "batch_size", "seq_len"):
        if getattr(a, name) < 1:
            raise CharclipError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    # Checked before the comparison runs: an output that cannot be written fails now, in one line.
    json_path = runfolder.writable_file(a.json, "--json") if a.json else None
    plot_path = runfolder.writable_file(a.plot, "--plot") if a.plot else None
    cells = CELLS if a.cell == "all" else (a.cell,)
    reports = []
    for cell in cells:
        rep = run_parity(cell, a.layers, a.dtype, a.steps, device=a.device, hidden_size=a.hidden,
                         embedding_dim=max(a.hidden // 2, 1), batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
                         clip_impl=a.clip_impl, progress=not a.no_progress, precision=a.precision, dropout=a.dropout)
        c = rep.config
        precision = "" if a.precision == "full" else f" ({a.precision} mixed precision)"
        print(f"\n{cell} {c['layers']}x{c['hidden']} (embedding {c['embedding']}, vocabulary {c['vocab']}), {a.dtype}{precision}, "
              f"batch {c['batch']}x{c['seq_len']}, {a.device}, clipping: {a.clip_impl}"
              + (f", dropout {a.dropout:g}" if a.dropout else ""))
        for note in rep.notes:
            print(note)
        print(format_table(rep.rows))
        reports.append(rep)
    bad = [f"{r.config['cell']}: {row.quantity}" for r in reports for row in r.rows if not row.ok]
    print("\nall quantities agree" if not bad else f"\n{len(bad)} quantities DIFFER: " + "; ".join(bad))
    try:
        if json_path:
            runfolder.write_file(json_path, json.dumps([r.to_dict() for r in reports], indent=1, default=float))
            print(f"json: {json_path}")
        if plot_path:
            print(f"plot: {plot_drift(reports, plot_path)}")
    except OSError as e:
        raise runfolder.os_error(e, "cannot write the report") from None
    return 0 if not bad else 1
