"""Build the teaching notebooks: each NN-name.py (jupytext percent format, the source to edit
and review) becomes NN-name.ipynb, executed top to bottom in a Jupyter kernel, with outputs.

    python notebooks/build.py        # every notebook
    python notebooks/build.py 02     # those whose file name starts with 02

`parity_tests/behaviour/test_notebooks.py` runs the same `execute` on the committed .ipynb files and
checks that they hold the same cells as their .py sources.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import jupytext
import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "charclip-notebooks"
CELL_TIMEOUT_S = 600


def sources() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]-*.py"))


@contextmanager
def kernel_specs():
    """A kernel spec that runs this very interpreter, in a folder of its own.

    The stock "python3" spec may be missing, or may be a user's spec for another
    environment; this one is always the interpreter that runs the build or the tests.
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_kernel_spec(Path(tmp) / KERNEL)
        yield KernelSpecManager(kernel_dirs=[tmp])


def execute(nb: nbformat.NotebookNode, specs: KernelSpecManager) -> nbformat.NotebookNode:
    """Run every cell of `nb` in place (working directory: notebooks/); raises on a cell's error."""
    kernelspec = nb.metadata.get("kernelspec")
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.execute()
    if kernelspec is not None:  # keep the portable "python3" spec, not the temporary one
        nb.metadata["kernelspec"] = kernelspec
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", nargs="*", help="build only the notebooks whose name starts with one of these")
    args = parser.parse_args(argv)
    chosen = [p for p in sources() if not args.prefix or any(p.name.startswith(x) for x in args.prefix)]
    if not chosen:
        print(f"build.py: error: no notebook source matches {' '.join(args.prefix)}", file=sys.stderr)
        return 2
    with kernel_specs() as specs:
        for py in chosen:
            nb = jupytext.read(py)
            t0 = time.perf_counter()
            execute(nb, specs)
            jupytext.write(nb, py.with_suffix(".ipynb"))
            print(f"{py.with_suffix('.ipynb').name}: executed in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
