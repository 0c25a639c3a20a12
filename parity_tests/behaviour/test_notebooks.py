"""The teaching notebooks in notebooks/: each committed .ipynb holds exactly the cells of its
jupytext source (.py), carries the outputs of one top-to-bottom run, and runs again from the
top in a real Jupyter kernel without an error."""

import difflib
import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

SOURCES = build.sources()
NAMES = [p.stem for p in SOURCES]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def _ipynb(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_source_has_its_notebook_and_back():
    assert SOURCES, f"no notebook sources in {NOTEBOOKS}"
    notebooks = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
    assert notebooks == NAMES, f".ipynb without .py or the reverse: ipynb {notebooks}, py {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_holds_the_cells_of_its_source(name):
    source = _cells(jupytext.read(NOTEBOOKS / f"{name}.py"))
    committed = _cells(_ipynb(name))
    for i, (a, b) in enumerate(zip(source, committed)):
        if a != b:
            diff = "\n".join(
                difflib.unified_diff(
                    b[1].splitlines(), a[1].splitlines(), f"{name}.ipynb", f"{name}.py", lineterm=""
                )
            )
            pytest.fail(
                f"cell {i} differs ({b[0]} in .ipynb, {a[0]} in .py); rebuild with python notebooks/build.py:\n{diff}"
            )
    assert len(source) == len(committed), (
        f"{name}: {len(source)} cells in .py, {len(committed)} in .ipynb"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_with_the_outputs_of_one_clean_run(name):
    code = [c for c in _ipynb(name).cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{name}: execution counts {counts}, not one run from the top"
    )
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, (
        f"{name}: committed with errors: {[e.ename + ': ' + e.evalue for e in errors]}"
    )
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        f"{name}: no figure in the outputs"
    )


def _install_cell(name: str) -> str:
    return next(
        c for c in jupytext.read(NOTEBOOKS / f"{name}.py").cells if c.cell_type == "code"
    ).source


def test_every_notebook_starts_with_the_same_install_cell():
    cells = {name: _install_cell(name) for name in NAMES}
    assert len(set(cells.values())) == 1, f"the install cells differ: {cells}"


class _Shell:
    """Stands in for IPython's get_ipython(): records the line magics it is asked to run."""

    def __init__(self):
        self.magics = []

    def run_line_magic(self, name, line):
        self.magics.append((name, line))


def _run_install_cell_without_charclip(monkeypatch, cwd: Path) -> list:
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "charclip" else found(name, *a),
    )
    monkeypatch.chdir(cwd)
    shell = _Shell()
    exec(_install_cell(NAMES[0]), {"get_ipython": lambda: shell})
    return shell.magics


def test_install_cell_installs_the_clone_it_sits_in(monkeypatch):
    monkeypatch.delenv("CHARCLIP_SOURCE", raising=False)
    assert _run_install_cell_without_charclip(monkeypatch, NOTEBOOKS) == [
        ("pip", f"install --quiet {NOTEBOOKS.parent}")
    ]


def test_install_cell_installs_charclip_source_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARCLIP_SOURCE", "git+https://example.invalid/charclip")
    assert _run_install_cell_without_charclip(monkeypatch, tmp_path) == [
        ("pip", "install --quiet git+https://example.invalid/charclip")
    ]


def test_install_cell_installs_a_wheel_uploaded_beside_the_notebook(monkeypatch, tmp_path):
    """Colab: no clone and no CHARCLIP_SOURCE, but a wheel built with `pip wheel --no-deps .`."""
    monkeypatch.delenv("CHARCLIP_SOURCE", raising=False)
    wheel = tmp_path / "charclip-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert _run_install_cell_without_charclip(monkeypatch, tmp_path) == [
        ("pip", f"install --quiet {wheel}")
    ]


def test_install_cell_says_what_to_do_when_it_cannot_find_charclip(monkeypatch, tmp_path):
    monkeypatch.delenv("CHARCLIP_SOURCE", raising=False)
    with pytest.raises(RuntimeError, match="set CHARCLIP_SOURCE"):
        _run_install_cell_without_charclip(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def kernel_specs():
    with build.kernel_specs() as specs:
        yield specs


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_a_jupyter_kernel(name, kernel_specs, monkeypatch):
    # The kernel inherits this environment. One torch thread, as the rest of the suite uses
    # (conftest.py): on a busy 2-core machine a second intra-op thread makes small ops slow.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = _ipynb(name)
    build.execute(
        nb, kernel_specs
    )  # raises nbclient's CellExecutionError, with the traceback, on any error
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'find_spec("charclip") is None' in first.source, (
        f"{name}: the first code cell is not the install guard"
    )
    assert first.outputs == [], (
        f"{name}: the install cell did something with charclip importable: {first.outputs}"
    )
