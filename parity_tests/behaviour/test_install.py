"""A clean install (issue 21, item 6): the wheel adds `charclip` to site-packages and nothing else.

The repository keeps `torch_impl/`, `jax_impl/` and `benchmarks/` at its top level; pyproject's
package-dir installs them as `charclip.torch`, `charclip.jax` and `charclip.benchmarks`, and
`charclip/__init__.py` maps the same names in a source checkout. Built from a copy of the
tracked files, so a stale `build/` folder in the checkout cannot hide a missing package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from charclip import SOURCE_FOLDERS

ROOT = Path(__file__).resolve().parents[2]


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the wheel is built from the tracked files")
    return out.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in _tracked():
        if (
            name.startswith(("charclip/", "torch_impl/", "jax_impl/", "benchmarks/"))
            and (name.endswith(".py"))
            or name in ("pyproject.toml", "README.md")
        ):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (found,) = dist.glob("charclip-*.whl")
    return found


def test_the_wheel_adds_only_charclip_to_site_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"charclip", f"{wheel.name.split('-py')[0]}.dist-info"}, sorted(tops)


def test_every_source_module_is_in_the_wheel_under_its_import_path(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = {v: k.replace(".", "/") for k, v in SOURCE_FOLDERS.items()} | {"charclip": "charclip"}
    wanted = {
        folders[name.split("/")[0]] + name[len(name.split("/")[0]) :]
        for name in _tracked()
        if name.endswith(".py") and name.split("/")[0] in folders
    }
    assert wanted, "no source modules found"
    assert not wanted - names, f"missing from the wheel: {sorted(wanted - names)}"


def test_the_installed_wheel_imports_the_backends_by_their_charclip_names(wheel, tmp_path):
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
        + [str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    code = (
        "import charclip, charclip.torch.clipping as t, charclip.jax.clipping as j, "
        "charclip.benchmarks.harness as b\n"
        "print('\\n'.join(m.__file__ for m in (charclip, t, j, b)))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    files = run.stdout.split()
    assert len(files) == 4 and all(Path(f).is_relative_to(site) for f in files), files


def test_a_source_checkout_reaches_the_same_names():
    code = "import charclip.torch.clipping as t, charclip.jax as j; print(t.__file__, j.__file__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    t, j = map(Path, run.stdout.split())
    assert t == ROOT / "torch_impl" / "clipping.py" and j == ROOT / "jax_impl" / "__init__.py"
