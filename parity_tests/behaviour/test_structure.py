"""The structure the code promises: a framework-free core, no import circle, mirrored backends.

These are checks on the source itself, so that the promises in charclip/__init__.py,
charclip/contract.py and STYLE.md cannot quietly stop being true.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from charclip import contract
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.weights import init_params

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "jax", "jaxlib", "optax", "flax")
TOOLS = (
    "parity",
    "explode",
    "testing",
)  # charclip's subpackages that run the backends (but import none at import time)


def _core_modules() -> list[str]:
    return sorted(
        f"charclip.{p.stem}" for p in (ROOT / "charclip").glob("*.py") if p.stem != "__main__"
    )


def _imports(path: Path) -> set[str]:
    """Every module named in an import statement anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


BACKEND_PACKAGES = {
    "torch_impl": "charclip.torch",
    "jax_impl": "charclip.jax",
}  # folder -> import path


def _names_a_backend(module: str) -> bool:
    return any(
        module == b or module.startswith(b + ".")
        for b in (*BACKEND_PACKAGES.values(), "charclip.benchmarks")
    )


def test_the_core_imports_no_framework():
    """Importing every core module (and the tool packages) leaves torch, jax and optax unimported."""
    modules = _core_modules() + [f"charclip.{t}" for t in TOOLS]
    code = (
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], (
        f"the core imported a framework: {out.stdout}"
    )


@pytest.mark.parametrize("module", _core_modules())
def test_no_core_module_names_a_framework_or_a_backend(module):
    """Not even lazily: the core reaches a backend only through charclip.backends (by name, at run time)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    bad = sorted(m for m in _imports(path) if m.split(".")[0] in FRAMEWORKS or _names_a_backend(m))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("backend", sorted(BACKEND_PACKAGES))
def test_backends_do_not_import_the_loop_the_cli_the_tools_or_each_other(backend):
    """No circle: the loop calls the backends, never the reverse; neither backend imports the other."""
    other = next(v for k, v in BACKEND_PACKAGES.items() if k != backend)
    banned = ("charclip.run", "charclip.cli", "charclip.parity", "charclip.explode", other)
    for path in sorted((ROOT / backend).glob("*.py")):
        bad = sorted(
            m for m in _imports(path) if any(m == b or m.startswith(b + ".") for b in banned)
        )
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _public_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, constants), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


# Where the frameworks' idioms force a difference, (file, name) -> why. Everything else must match.
ALLOWED = {
    # clipping: each speaks its library's own API, so code written for the library runs unchanged.
    **{
        ("clipping", n): "torch.nn.utils' names"
        for n in (
            "Tensors",
            "clip_grad_norm_",
            "clip_grad_value_",
            "get_total_norm",
            "clip_grads_with_norm_",
        )
    },
    (
        "clipping",
        "NonFiniteGradientError",
    ): "torch raises RuntimeError; ours is also a FloatingPointError",
    (
        "clipping",
        "global_norm",
    ): "JAX's measurement, optax.tree.norm's role (torch: get_total_norm)",
    # clip_safeguards: the helpers of each public module; torch scales .grad tensors in place,
    # grouped by device and dtype as torch groups them; JAX returns new leaves, branch-free.
    **{
        ("clip_safeguards", n): "torch: in place, by (device, dtype) group"
        for n in (
            "Grouped",
            "as_list",
            "clip_",
            "count_nonzero",
            "enforce_bound_",
            "measured",
            "raise_if_nonfinite",
            "use_foreach",
            "zero_if_nonfinite_",
        )
    },
    **{
        ("clip_safeguards", n): "JAX: pure, on leaves, traced thresholds"
        for n in (
            "accumulation_dtype",
            "apply_nonfinite",
            "clip_leaves",
            "concrete_bool",
            "is_low_precision",
            "norm_dtype",
            "poison_invalid",
        )
    },
    **{
        ("clipping", n): "optax's names"
        for n in (
            "clip_by_global_norm",
            "clip",
            "clip_tree_with_norm",
            "clip_tree_by_global_norm",
            "clip_tree_by_value",
            "count_nonfinite",
            "CountNonfiniteState",
            "raise_if_nonfinite",
        )
    },
    # clip_family: torch's in-place names for .grad (with `_`), optax's transformation names.
    **{
        ("clip_family", n): "torch.nn.utils' idiom: in place on .grad"
        for n in ("adaptive_grad_clip_", "clip_grad_block_rms_", "Tensors")
    },
    **{
        ("clip_family", n): "optax's names: GradientTransformations"
        for n in ("adaptive_grad_clip", "clip_by_block_rms")
    },
    # model: an nn.Module (built from weights) against pure functions over a pytree with an explicit state.
    ("model", "CharRNN"): "nn.Module idiom",
    ("model", "build"): "nn.Module idiom",
    ("model", "to_numpy"): "a module's state_dict to NumPy; JAX parameters are arrays already",
    ("model", "init"): "functional idiom: the parameters are a pytree",
    ("model", "apply"): "functional idiom",
    ("model", "zero_state"): "lax.scan needs an explicit initial state; torch's RNNs take None",
    (
        "model",
        "LAYERS",
    ): "JAX picks its recurrent layer (fast or the scan reference); torch has nn.RNN/LSTM/GRU",
    # train: optax composes the optimizer and jit needs a pure step; torch's optimizer is an object.
    ("train", "optimizer"): "optax chain",
    ("train", "make_train_step"): "the pure, jitted step",
    (
        "train",
        "gradient_norm",
    ): "the norm the chosen optax clipper measures, inside the jitted step",
    ("train", "adopt"): "branch-free skip inside jit",
    (
        "train",
        "loss_and_grads",
    ): "the pure gradient of a batch and its micro-batches; torch accumulates in .grad",
    ("train", "optax_update"): "optax's update under standard dtype promotion (tests run strict)",
    (
        "train",
        "with_learning_rate",
    ): "optax keeps the scheduled rate in its state; torch in param_groups",
    (
        "model",
        "cast_for",
    ): "mixed precision's cast of the parameter pytree; torch casts inside CharRNN.forward",
    (
        "device",
        "enable_x64",
    ): "JAX's 64-bit mode, switched on by the entry points; torch has float64 always",
    (
        "device",
        "use_compilation_cache",
    ): "JAX's persistent compilation cache for CLI runs; torch compiles nothing",
    **{
        (
            "train",
            n,
        ): "fp16's loss scale written for the jitted step; torch uses torch.amp.GradScaler"
        for n in (
            "LossScaleState",
            "loss_scale_holder",
            "loss_scale_of",
            "with_loss_scale",
            "next_loss_scale",
            "unscale",
        )
    },
    # distributed: several processes with a process group (torch) against one process with a mesh (JAX).
    **{
        ("distributed", n): "torch: processes and a process group"
        for n in (
            "COLLECTIVE_TIMEOUT",
            "DistributedTrainer",
            "GRACE_SECONDS",
            "HOST",
            "PARALLEL",
            "PR_SET_PDEATHSIG",
            "RankDied",
            "WATCHDOG_SECONDS",
            "launch",
            "launch_training",
            "leader_factory",
        )
    },
    **{
        ("distributed", n): "JAX: one process, a mesh"
        for n in (
            "BATCH_AXIS",
            "LAYOUTS",
            "MeshTrainer",
            "PARAM_AXIS",
            "make_clipped_gradient",
            "make_mesh",
            "make_shard_map_step",
            "mesh_factory",
            "param_spec",
            "sharded_global_norm",
            "use_devices",
        )
    },
}


# Files one backend has and the other does not need, with why.
ONE_SIDED_FILES = {
    "fastrnn": "JAX only: the recurrent layers with a hand-written backward; torch's nn.RNN/LSTM/GRU already are that",
}


def _mirrored_files() -> list[str]:
    both = {p.stem for p in (ROOT / "torch_impl").glob("*.py")} | {
        p.stem for p in (ROOT / "jax_impl").glob("*.py")
    }
    return sorted(both - set(ONE_SIDED_FILES))


def test_one_sided_files_exist_on_one_side_only():
    for name in ONE_SIDED_FILES:
        present = [(ROOT / b / f"{name}.py").exists() for b in ("torch_impl", "jax_impl")]
        assert present.count(True) == 1, f"{name}.py: {present} (torch, jax)"


@pytest.mark.parametrize("name", _mirrored_files())
def test_both_backends_have_the_same_files_and_public_names(name):
    paths = [ROOT / b / f"{name}.py" for b in ("torch_impl", "jax_impl")]
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    assert not missing, f"{name}.py exists in one backend only (missing: {missing})"
    torch_names, jax_names = (_public_names(p) for p in paths)
    unexplained = sorted(n for n in torch_names ^ jax_names if (name, n) not in ALLOWED)
    assert not unexplained, (
        f"{name}.py: torch only {sorted(n for n in unexplained if n in torch_names)}, "
        f"jax only {sorted(n for n in unexplained if n in jax_names)}; mirror them or explain "
        "the difference in ALLOWED"
    )


def test_the_allow_list_has_no_stale_entries():
    """An allowed difference that no longer exists would hide a future one."""
    stale = []
    for name, n in ALLOWED:
        present = [n in _public_names(ROOT / b / f"{name}.py") for b in ("torch_impl", "jax_impl")]
        if present.count(True) != 1:
            stale.append((name, n))
    assert not stale, f"ALLOWED entries that are not a one-sided name: {stale}"


def _tiny():
    model = ModelConfig(vocab_size=7, cell="lstm", hidden_size=4, num_layers=1, embedding_dim=3)
    cfg = TrainConfig(
        steps=1, batch_size=2, seq_len=3, dtype="float64", clip=ClipConfig(max_norm=0.1)
    )
    return model, cfg, init_params(model, 0, "float64")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_each_trainer_satisfies_the_contract(backend):
    from charclip import backends

    model, cfg, params = _tiny()
    trainer = backends.trainer_factory(backend)(model, cfg, params)
    assert isinstance(trainer, contract.Trainer)
    x = np.zeros((2, 3), np.int64)
    result = trainer.step(x, x)
    assert isinstance(result, contract.StepResult) and result.clipped == (result.grad_norm > 0.1)
    assert trainer.hidden_state()["h"].shape == (1, 2, 4) and trainer.hidden_state().keys() == {
        "h",
        "c",
    }
    trainer.reset_hidden()
    assert trainer.hidden_state() is None


def test_the_two_trainers_have_the_same_method_signatures():
    """The same signatures, except JAX's extra keyword `layer` (which recurrent layer: fast or scan)."""
    from charclip.jax.train import Trainer as JaxTrainer
    from charclip.torch.train import Trainer as TorchTrainer

    for name in [n for n in dir(contract.Trainer) if not n.startswith("_")] + ["__init__"]:
        a, b = (
            inspect.signature(getattr(TorchTrainer, name)),
            inspect.signature(getattr(JaxTrainer, name)),
        )
        if name == "__init__":
            b = b.replace(parameters=[p for p in b.parameters.values() if p.name != "layer"])
        assert a == b, f"Trainer.{name}: torch {a} vs jax {b}"


@pytest.mark.parametrize(
    "policy, finite, applies",
    [
        ("skip", False, False),
        ("skip", True, True),
        ("propagate", False, True),
        ("error", True, True),
    ],
)
def test_the_verdict_is_written_once(policy, finite, applies):
    clip = ClipConfig(max_norm=1.0)
    norm = 2.0 if finite else float("nan")
    assert contract.update_applies(policy, finite) is applies
    if policy == "error" and not finite:
        with pytest.raises(contract.NonFiniteStep):
            contract.verdict(1.0, norm, clip, policy)
        return
    r = contract.verdict(1.0, norm, clip, policy)
    assert r.skipped is (not applies) and r.clipped is finite


def test_a_nonfinite_step_under_error_raises():
    with pytest.raises(contract.NonFiniteStep):
        contract.verdict(float("inf"), 1.0, ClipConfig(), "error")
