"""Every JAX mesh layout, on 2 and 4 devices, equals one device on the same global batch.

The multi-device runs happen in one subprocess per test module, started with four
virtual CPU devices (`jax_num_cpu_devices` must be set before JAX's backend starts,
and this pytest process has one device); 2-device meshes use the first two. The
single-device runs are computed here with `charclip.jax.train.Trainer`.

Compared directly, step by step: the global norm the step logs, and the clipped
gradient. For the compiler-sharded layouts the clipped gradient is the clipping
function (optax's, or the reference `charclip.jax.clipping`) applied to the sharded
gradient under `jit` with the layout's shardings: the question is whether they give
the global answer on sharded arrays. For `shard_map` it is the module's own
`make_clipped_gradient`, the explicit psum. After the last step: the parameters,
Adam's moments and the carried hidden state.

Negative controls (shard_map): a norm without the psum (each device its own slices),
and a psum that also sums the replicated tensors (each counted once per device).
Both must fail the same check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if (
    __name__ == "__main__"
):  # the subprocess: four virtual devices, before anything starts JAX's backend
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import optax

from charclip import dropout
from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.jax import clipping
from charclip.jax import model as M
from charclip.jax.train import Trainer
from charclip.weights import init_params

WORLDS = (2, 4)
STEPS = 3
# A plain RNN compiles fastest (each case compiles its own step); the CLI test below
# trains an LSTM, whose (h, c) state is sharded the same way.
# Vocabulary 13 and width 5 divide by neither 2 nor 4: the embedding and the head's bias
# stay whole on every layout, while the recurrent weights (8 rows) are split.
MODEL = ModelConfig(vocab_size=13, cell="rnn", hidden_size=8, num_layers=2, embedding_dim=5)
BATCH, SEQ = 8, 5
TAU_ACTIVE, TAU_IDLE = 0.05, 1e3  # the gradient norm here is about 0.1 to 0.3
LAYOUTS = ("data", "model", "fsdp", "2d", "shard_map")
JIT_LAYOUTS = LAYOUTS[:-1]
# (world, layout, dtype, max_norm, clip impl, variant); variant "" is the plain run.
# Every layout on both world sizes in float64 with clipping active; the rest on 4 devices.
CASES = [(w, lay, "float64", TAU_ACTIVE, "library", "") for w in WORLDS for lay in LAYOUTS]
CASES += [(4, lay, "float32", TAU_ACTIVE, "library", "") for lay in LAYOUTS]
CASES += [(4, lay, "float64", TAU_IDLE, "library", "") for lay in ("fsdp", "shard_map")]
CASES += [(4, lay, "float64", TAU_ACTIVE, "reference", "") for lay in JIT_LAYOUTS]
CASES += [(4, lay, "float64", TAU_ACTIVE, "library", "resume") for lay in ("fsdp", "shard_map")]
# Dropout: masks of the global batch, sharded like x by the compiler (data) and by hand (shard_map)
CASES += [(4, lay, "float64", TAU_ACTIVE, "library", "dropout") for lay in ("data", "shard_map")]
CONTROLS = [
    (w, "shard_map", "float64", TAU_ACTIVE, "library", v)
    for w in WORLDS
    for v in ("per_shard", "counted_per_device")
]
# Relative to the largest magnitude compared. The devices sum the batch in another
# order, so results differ by rounding only: float64 a few ulp (2**-53 = 1.1e-16),
# float32 a few tens of ulp (2**-24 = 6e-8) over STEPS steps of grad, clip and Adam.
TOL = {"float64": 1e-12, "float32": 2e-6}


def _config(dtype: str, tau: float, impl: str, variant: str = "") -> TrainConfig:
    return TrainConfig(
        steps=STEPS,
        batch_size=BATCH,
        seq_len=SEQ,
        lr=1e-2,
        dtype=dtype,
        clip=ClipConfig(max_norm=tau, impl=impl),
        dropout=0.3 if variant == "dropout" else 0.0,
    )


def _batches():
    rng = np.random.default_rng(7)
    return [
        (
            rng.integers(0, MODEL.vocab_size, (BATCH, SEQ)),
            rng.integers(0, MODEL.vocab_size, (BATCH, SEQ)),
        )
        for _ in range(STEPS)
    ]


def _clip(impl: str, tau: float):
    """(gradient tree) -> (clipped tree, norm) with optax's or the reference implementation."""
    if impl == "library":
        return lambda g: (
            optax.clip_by_global_norm(tau).update(g, optax.EmptyState())[0],
            optax.tree.norm(g),
        )
    return lambda g: clipping.clip_tree_by_global_norm(g, tau)


def _clipped_gradient_fn(impl: str, tau: float):
    def fn(params, state, x, y, masks):
        grads = jax.grad(lambda p: M.loss(p, x, y, state, cfg=MODEL, masks=masks)[0])(params)
        return _clip(impl, tau)(grads)

    return fn


def _record(trainer, batches, clipped_gradient, record=None) -> dict:
    """Norms and clipped gradients per step, then the final state, as NumPy."""
    record = record or {"norm": [], "clip_norm": [], "grads": []}
    for (
        x,
        y,
    ) in (
        batches
    ):  # the dropout masks of the global batch (None without dropout), as charclip.run draws them
        masks = dropout.masks(MODEL, trainer.cfg, len(record["norm"]), *x.shape)
        grads, norm = clipped_gradient(trainer.params, trainer._hidden_for(len(x)), x, y, masks)
        record["grads"].append({k: np.asarray(v) for k, v in grads.items()})
        record["clip_norm"].append(float(norm))
        record["norm"].append(trainer.step(x, y, masks=masks).grad_norm)
    record.update(
        params=trainer.params_numpy(), adam=trainer.adam_state(), hidden=trainer.hidden_state()
    )
    return record


# ---- the subprocess ----------------------------------------------------------------------


def _wrong_norms():
    from jax import lax

    def per_shard(grads, split, axis):  # no psum: this device's slices (and the whole tensors) only
        return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads.values()))

    def counted_per_device(
        grads, split, axis
    ):  # whole tensors inside the psum: counted once per device
        return jnp.sqrt(lax.psum(sum(jnp.sum(jnp.square(g)) for g in grads.values()), axis))

    return {"per_shard": per_shard, "counted_per_device": counted_per_device}


def _run_case(case) -> dict:
    from jax.sharding import PartitionSpec as P

    from charclip.jax import distributed as D

    world, layout, dtype, tau, impl, variant = case
    cfg = _config(dtype, tau, impl, variant)
    devices = D.use_devices(world)
    original = D.sharded_global_norm
    if variant in _wrong_norms():
        D.sharded_global_norm = _wrong_norms()[
            variant
        ]  # read when the step is traced, on its first call
    try:

        def make(params, **kw):
            return D.MeshTrainer(MODEL, cfg, params, layout=layout, devices=devices, **kw)

        trainer = make(init_params(MODEL, 0, dtype))
        if layout == "shard_map":
            body = D.make_clipped_gradient(MODEL, cfg, trainer.specs)
            batch, hidden, mask = P("data", None), P(None, "data", None), P("data", None, None)
            clipped = jax.jit(
                jax.shard_map(
                    lambda *a: body(*a)[:2],
                    mesh=trainer.mesh,
                    in_specs=(trainer.specs, hidden, batch, batch, mask),
                    out_specs=(trainer.specs, P()),
                    check_vma=False,
                )
            )
        else:
            b = trainer.batch_sharding
            clipped = jax.jit(
                _clipped_gradient_fn(impl, tau),
                in_shardings=(
                    trainer.shardings,
                    trainer.state_sharding,
                    b,
                    b,
                    trainer.mask_sharding,
                ),
                out_shardings=(trainer.shardings, trainer._on(P())),
            )
        batches = _batches()
        split = {k: any(spec) for k, spec in trainer.specs.items()}
        if variant != "resume":
            return _record(trainer, batches, clipped) | {"split": split}
        first = _record(
            trainer, batches[:2], clipped
        )  # then a fresh trainer from the gathered state, as a resume builds
        resumed = make(first["params"], adam=first["adam"], hidden=first["hidden"])
        rest = {k: first[k] for k in ("norm", "clip_norm", "grads")}
        return _record(resumed, batches[2:], clipped, rest) | {"split": split}
    finally:
        D.sharded_global_norm = original


def _save(records: dict, path) -> None:
    """Nested dicts/lists of arrays and numbers, keyed by case tuples, as one .npz (no pickle):
    each leaf is stored under the JSON of its path."""
    flat = {}

    def walk(node, where):
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else None
        )
        if node is None:
            flat[json.dumps(where + [["none", 0]])] = np.zeros(0)
            return
        if items is None:
            flat[json.dumps(where)] = np.asarray(node)
            return
        for k, v in items:
            walk(v, where + [["list" if isinstance(node, list) else "dict", k]])

    for case, record in records.items():
        walk(record, [["case", list(case)]])
    with open(path, "wb") as f:
        np.savez(f, **flat)


def _load(path) -> dict:
    def build(entries):  # entries: [(remaining path, array)]
        if not entries[0][0]:
            value = entries[0][1]
            return value.item() if value.ndim == 0 and value.dtype.kind in "bfi" else value
        groups: dict = {}
        for where, value in entries:
            groups.setdefault(json.dumps(where[0]), []).append((where[1:], value))
        keyed = [(json.loads(g), e) for g, e in groups.items()]
        kind = keyed[0][0][0]
        if kind == "none":
            return None
        if kind == "list":
            by_index = {key: build(e) for (_, key), e in keyed}
            return [by_index[i] for i in range(len(by_index))]
        if kind == "case":
            return {tuple(key): build(e) for (_, key), e in keyed}
        return {key: build(e) for (_, key), e in keyed}

    with np.load(path, allow_pickle=False) as z:
        return build([(json.loads(k), z[k]) for k in z.files])


def _device_main(out: str) -> None:
    assert len(jax.devices("cpu")) == 4, jax.devices()
    _save({case: _run_case(case) for case in CASES + CONTROLS}, out)


if __name__ == "__main__":
    _device_main(sys.argv[1])


# ---- the tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{case: record} from the 4-device subprocess; the one-device runs are computed here meanwhile."""
    out = tmp_path_factory.mktemp("mesh") / "runs.pkl"
    p = subprocess.Popen(
        [sys.executable, __file__, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for case in CASES:
        _single(case)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    return _load(out)


_single_cache: dict = {}


def _single(case) -> dict:
    """One device, the whole batch: what every layout must equal."""
    _, _, dtype, tau, impl, variant = case
    key = (dtype, tau, impl, variant == "dropout")
    if key not in _single_cache:
        trainer = Trainer(MODEL, _config(dtype, tau, impl, variant), init_params(MODEL, 0, dtype))
        _single_cache[key] = _record(trainer, _batches(), jax.jit(_clipped_gradient_fn(impl, tau)))
    return _single_cache[key]


def _close(what: str, got, want, tol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.max(np.abs(want)), 1e-300)
    err = np.max(np.abs(got - want)) / scale
    assert err <= tol, f"{what}: max |difference| / max |value| = {err:.3g} > {tol:g}"


def _check(record: dict, want: dict, tol: float) -> None:
    assert len(record["grads"]) == len(want["grads"]) == STEPS
    _close("global norm logged by the step", record["norm"], want["norm"], tol)
    _close("global norm of the clipping function", record["clip_norm"], want["clip_norm"], tol)
    for step, (g, w) in enumerate(zip(record["grads"], want["grads"], strict=True)):
        for name in w:
            _close(f"clipped gradient {name} at step {step + 1}", g[name], w[name], tol)
    for part in ("params", "adam", "hidden"):
        assert record[part].keys() == want[part].keys(), f"{part}: names differ"
        for name in want[part]:
            _close(f"{part} {name} after {STEPS} steps", record[part][name], want[part][name], tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c if v != ""))
def test_equals_one_device(runs, case):
    want = _single(case)
    tau = case[3]
    if tau == TAU_ACTIVE:
        assert min(want["norm"]) > tau, (
            f"clipping was meant to act on every step: norms {want['norm']}"
        )
    else:
        assert max(want["norm"]) < tau, f"clipping was meant to stay idle: norms {want['norm']}"
    split = runs[case]["split"]
    if (
        case[1] != "data"
    ):  # parameters sharded: some split, some whole, the mix the norm must get right
        assert any(split.values()) and not all(split.values()), split
    _check(runs[case], want, TOL[case[2]])


@pytest.mark.parametrize("world", WORLDS)
def test_norm_without_psum_is_caught(runs, world):
    case = (world, "shard_map", "float64", TAU_ACTIVE, "library", "per_shard")
    with pytest.raises(AssertionError, match="global norm"):
        _check(runs[case], _single(case), TOL["float64"])


@pytest.mark.parametrize("world", WORLDS)
def test_replicated_tensor_counted_per_device_is_caught(runs, world):
    case = (world, "shard_map", "float64", TAU_ACTIVE, "library", "counted_per_device")
    record, want = runs[case], _single(case)
    assert all(n > w for n, w in zip(record["norm"], want["norm"])), (record["norm"], want["norm"])
    with pytest.raises(AssertionError, match="global norm"):
        _check(record, want, TOL["float64"])


def test_cli_mesh_run_writes_the_usual_checkpoint(tmp_path):
    """`charclip train --backend jax --devices 2`: virtual devices set up by the CLI, a checkpoint that loads."""
    from charclip import checkpoint, run
    from parity_tests.helpers import small_corpus

    corpus = small_corpus(tmp_path)
    args = [
        "train",
        "--backend",
        "jax",
        "--devices",
        "2",
        "--mesh",
        "fsdp",
        "--data",
        str(corpus),
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--hidden",
        "12",
        "--embed",
        "6",
        "--layers",
        "1",
        "--lr",
        "0.01",
        "--clip-norm",
        "0.5",
        "--steps",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--checkpoint-every",
        "2",
        "--dtype",
        "float64",
        "--sample-chars",
        "0",
        "--no-progress",
    ]
    p = subprocess.run(
        [sys.executable, "-m", "charclip", *args, "--out", str(tmp_path / "mesh")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        seq_len=16,
        lr=0.01,
        dtype="float64",
        eval_every=4,
        eval_batches=2,
        checkpoint_every=2,
        clip=ClipConfig(max_norm=0.5),
    )
    one = run.train(
        ModelConfig(vocab_size=1, hidden_size=12, num_layers=1, embedding_dim=6),
        cfg,
        backend="jax",
        out_dir=tmp_path / "one",
        data_path=str(corpus),
        progress=False,
        sample_chars=0,
        log=lambda *a: None,
    )
    got, want = checkpoint.load(tmp_path / "mesh"), checkpoint.load(one["checkpoint"])
    assert got.step == want.step == 4
    for part in ("params", "adam", "hidden"):
        for name in getattr(want, part):
            _close(
                f"checkpoint {part} {name}",
                getattr(got, part)[name],
                getattr(want, part)[name],
                TOL["float64"],
            )


def test_too_few_devices_is_one_line(capsys, tmp_path):
    """In this process JAX has started with one CPU device; asking for more is a clear error, not a crash."""
    from charclip import cli

    jnp.zeros(1)  # make sure the backend is up, as it is in any process that already used JAX
    code = cli.main(
        [
            "train",
            "--backend",
            "jax",
            "--devices",
            "3",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--devices 3" in err, err
