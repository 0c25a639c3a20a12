"""`charclip.jax.clipping` as a drop-in for optax's clipping: the API optax users rely on.

Each test uses ours where optax's code would use optax's, and compares with optax run
the same way: stateless transforms, `inject_hyperparams` with a schedule, a traced
threshold under `jit` (one compilation for every value), `vmap` over thresholds,
`optax.chain`, `optax.MultiSteps`, bit equality wherever optax is right, and the
`strict=True` bound checked against an exact rational oracle.
"""

import inspect
import logging
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from charclip.config import ClipConfig, ModelConfig, TrainConfig
from charclip.jax import clipping
from charclip.jax import model as M
from charclip.jax import train as T
from charclip.testing.oracle import sum_of_squares
from charclip.weights import init_params
from parity_tests.strategies import finfo, gradient_trees, leaves, np_dtype, thresholds

HIGH = ("float32", "float64")
PARAMS = {"w": jnp.zeros((4, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}


def _grads(scale: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.standard_normal(v.shape) * scale, v.dtype) for k, v in PARAMS.items()
    }


def _assert_trees_equal(got, want, what: str) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want), (
        f"{what}: {jax.tree.structure(got)} != {jax.tree.structure(want)}"
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=what)


class _Compilations(logging.Handler):
    """Counts XLA compilations of jitted functions named `name` while `jax.log_compiles()` is on."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.count = name, 0

    def emit(self, record):
        if record.getMessage().startswith(f"Compiling jit({self.name})"):
            self.count += 1

    def __enter__(self):
        logging.getLogger("jax").addHandler(self)
        self._log = jax.log_compiles()
        self._log.__enter__()
        return self

    def __exit__(self, *exc):
        self._log.__exit__(*exc)
        logging.getLogger("jax").removeHandler(self)


# ---- the transformations' shape ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "library", "arg"),
    [
        (clipping.clip_by_global_norm, optax.clip_by_global_norm, "max_norm"),
        (clipping.clip, optax.clip, "max_delta"),
    ],
)
def test_same_signature_and_stateless(ours, library, arg):
    """optax's positional argument, by name; init gives optax's empty state; update(g, None) works."""
    assert list(inspect.signature(library).parameters) == [arg]
    params = inspect.signature(ours).parameters
    assert next(iter(params)) == arg and params[arg].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[1:]), (
        "extras must be keyword-only"
    )
    tx, lib = ours(**{arg: 1.0}), library(**{arg: 1.0})
    assert tx.init(PARAMS) == lib.init(PARAMS) == optax.EmptyState()
    grads = _grads(10.0)
    updates, state = tx.update(grads, None)
    assert state is None, f"update(g, None) returned state {state!r}"
    _assert_trees_equal(updates, lib.update(grads, None)[0], f"{ours.__name__} != optax's")


def test_extras_are_keyword_only_and_checked():
    with pytest.raises(TypeError):
        clipping.clip_by_global_norm(
            1.0, 2
        )  # norm_type only by name, as torch's extras are not positional here
    with pytest.raises(ValueError, match="convention must be one of"):
        clipping.clip_by_global_norm(1.0, convention="tf")
    with pytest.raises(ValueError, match="max_norm must be a scalar"):
        clipping.clip_by_global_norm(np.ones(2))


# ---- traced thresholds ------------------------------------------------------------------


def test_inject_hyperparams_with_a_schedule_under_jit():
    schedule = optax.linear_schedule(10.0, 0.5, transition_steps=4)
    ours = optax.inject_hyperparams(clipping.clip_by_global_norm)(max_norm=schedule)
    library = optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=schedule)
    state, library_state = ours.init(PARAMS), library.init(PARAMS)
    _assert_trees_equal(state, library_state, "initial state")
    with _Compilations("update_fn") as compiled:
        step = jax.jit(ours.update)
        for i in range(6):
            grads = _grads(3.0, seed=i)  # norm about 10: clipped from the second step on
            updates, state = step(grads, state)
            expected, library_state = jax.jit(library.update)(grads, library_state)
            _assert_trees_equal(updates, expected, f"step {i}: updates")
            _assert_trees_equal(state, library_state, f"step {i}: state")
    assert float(state.hyperparams["max_norm"]) == 0.5
    # One compilation each for ours and optax's update (both are named update_fn).
    assert compiled.count == 2, f"compiled {compiled.count} times"


def test_traced_max_norm_compiles_once_and_is_optax():
    @jax.jit
    def ours(grads, tau):
        return clipping.clip_by_global_norm(tau).update(grads, None)[0]

    library = jax.jit(lambda grads, tau: optax.clip_by_global_norm(tau).update(grads, None)[0])
    grads = _grads(1.0)
    with _Compilations("ours") as compiled:
        for tau in (0.01, 0.5, 1.0, 3.0, 1e6):
            _assert_trees_equal(
                ours(grads, jnp.float32(tau)), library(grads, jnp.float32(tau)), f"tau={tau}"
            )
    assert compiled.count == 1, f"compiled {compiled.count} times for one shape"


def test_vmap_over_thresholds():
    grads = _grads(1.0)
    taus = jnp.asarray([0.0, 0.1, 1.0, 2.5, 100.0], jnp.float32)
    ours = jax.vmap(lambda tau: clipping.clip_by_global_norm(tau).update(grads, None)[0])(taus)
    library = jax.vmap(lambda tau: optax.clip_by_global_norm(tau).update(grads, None)[0])(taus)
    for i, tau in enumerate(taus.tolist()):
        row, want = (
            jax.tree.map(lambda x, i=i: x[i], ours),
            jax.tree.map(lambda x, i=i: x[i], library),
        )
        if tau == 0:  # optax gives 0 / 0 = NaN here only for a zero gradient; this one is not zero
            assert not np.isnan(np.asarray(row["w"])).any()
        _assert_trees_equal(row, want, f"vmapped row tau={tau}")


@pytest.mark.parametrize("tau", [-1.0, math.nan])
def test_invalid_threshold_raises_when_concrete_and_poisons_when_traced(tau):
    for factory in (clipping.clip_by_global_norm, clipping.clip):
        with pytest.raises(ValueError, match="must be >= 0"):
            factory(tau)
    grads = _grads(10.0)
    for factory in (clipping.clip_by_global_norm, clipping.clip):
        got = jax.jit(lambda g, t, factory=factory: factory(t).update(g, None)[0])(
            grads, jnp.float32(tau)
        )
        assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(got)), (
            f"{factory.__name__}: {got}"
        )
    # optax flips the sign instead (tau < 0), or gives NaN (tau = NaN).
    flipped = jax.jit(lambda g, t: optax.clip_by_global_norm(t).update(g, None)[0])(
        grads, jnp.float32(tau)
    )
    if tau < 0:
        assert np.all(np.sign(np.asarray(flipped["w"])) == -np.sign(np.asarray(grads["w"]))), (
            "optax no longer flips signs"
        )


def test_bfloat16_updates_with_a_float32_threshold():
    """A float32 schedule value with bfloat16 gradients: optax's lax.select refuses the mix."""
    grads = {"w": jnp.asarray([3.0, 4.0], jnp.bfloat16)}
    # optax under JAX's standard promotion, as users run it (the suite runs strict, which refuses even earlier)
    with (
        jax.numpy_dtype_promotion("standard"),
        pytest.raises(TypeError, match="lax.select requires arguments to have the same dtypes"),
    ):
        optax.clip_by_global_norm(jnp.float32(1.0)).update(grads, None)
    clipped, _ = clipping.clip_by_global_norm(jnp.float32(1.0)).update(grads, None)
    assert clipped["w"].dtype == jnp.bfloat16
    assert _exact_square_norm(jax.tree.leaves(clipped)) <= 1, f"clipped {clipped} above tau"


def test_norm_type_below_one_is_refused_by_optax_and_follows_torch_here():
    """optax.tree.norm knows 1, 2 and inf; ours takes the orders charclip.torch takes (one check,
    charclip.clipspec.check_norm_type): 0 < p < 1 clips, p = 0 counts non-zero entries."""
    grads = _grads(1.0)
    for bad in (0, 0.5):
        with pytest.raises(ValueError, match="Unsupported ord"):
            optax.tree.norm(grads, ord=bad)
    entries = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(grads)]).astype(np.float64)
    expected = float(np.sum(np.sqrt(np.abs(entries))) ** 2)
    # n float32 roots (2 u each) summed ((n - 1) u), then squared, which doubles that and adds 2 u
    np.testing.assert_allclose(
        float(clipping.global_norm(grads, 0.5)),
        expected,
        rtol=(2 * entries.size + 4) * 2.0**-24,
        err_msg="0.5-quasi-norm",
    )
    assert float(clipping.global_norm(grads, 0)) == np.count_nonzero(entries)
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        clipping.clip_by_global_norm(1.0, norm_type=0)


# ---- composition ------------------------------------------------------------------------


def test_chain_with_adam_is_optax():
    """The clipped gradient is optax's bit for bit; Adam's moments after it agree to an ulp.

    Compiled as one program with Adam, the conditional holding our second pass changes how
    XLA fuses and rounds Adam's own arithmetic (measured: one float32 ulp in one moment
    entry after two steps; the clip's output alone is bit-equal, checked first)."""
    ours = optax.chain(clipping.clip_by_global_norm(1.0), optax.adam(1e-2))
    library = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params, library_params = PARAMS, PARAMS
    state, library_state = ours.init(params), library.init(params)
    _assert_trees_equal(state, library_state, "initial chain state")
    for i in range(4):
        grads = _grads(10.0 ** (i - 1), seed=i)
        clip_alone = jax.jit(lambda g: clipping.clip_by_global_norm(1.0).update(g, None)[0])(grads)
        _assert_trees_equal(
            clip_alone,
            jax.jit(lambda g: optax.clip_by_global_norm(1.0).update(g, None)[0])(grads),
            f"clip {i}",
        )
        with jax.numpy_dtype_promotion(
            "standard"
        ):  # optax's Adam computes b1 ** count (float ** int32)
            updates, state = jax.jit(ours.update)(grads, state, params)
            expected, library_state = jax.jit(library.update)(grads, library_state, library_params)
        for got, want in zip(
            jax.tree.leaves((updates, state)), jax.tree.leaves((expected, library_state))
        ):
            # 4 float32 ulps: one rounding apart per step, carried through Adam's moments.
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(want), rtol=4 * 2.0**-23, atol=0, err_msg=f"step {i}"
            )
        params, library_params = (
            optax.apply_updates(params, updates),
            optax.apply_updates(library_params, expected),
        )


def test_multisteps_clips_the_accumulated_gradient_as_optax_does():
    k = 3
    ours = optax.MultiSteps(
        optax.chain(clipping.clip_by_global_norm(1.0), optax.sgd(0.1)), every_k_schedule=k
    )
    library = optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)), every_k_schedule=k
    )
    state, library_state = ours.init(PARAMS), library.init(PARAMS)
    _assert_trees_equal(state, library_state, "initial MultiSteps state")
    moved = []
    for i in range(2 * k):
        grads = _grads(5.0, seed=i)
        with jax.numpy_dtype_promotion("standard"):  # MultiSteps divides by its int32 step counter
            updates, state = jax.jit(ours.update)(grads, state, PARAMS)
            expected, library_state = jax.jit(library.update)(grads, library_state, PARAMS)
        _assert_trees_equal(updates, expected, f"micro-step {i}")
        moved.append(float(optax.tree.norm(updates)))
    # Zero on the accumulating micro-steps; on the k-th, the step of the clipped mean: lr * tau.
    np.testing.assert_allclose(
        moved, [0, 0, 0.1, 0, 0, 0.1], rtol=1e-6, err_msg="step lengths"
    )  # float32 divide, multiply, sgd


def test_clip_with_a_given_norm_is_the_second_half():
    grads = _grads(4.0)
    clipped, norm = clipping.clip_tree_by_global_norm(grads, 1.0)
    _assert_trees_equal(
        clipping.clip_tree_with_norm(grads, 1.0, norm), clipped, "clip_tree_with_norm(g, tau, norm)"
    )
    assert norm == clipping.global_norm(grads)


# ---- bit for bit where optax is right ------------------------------------------------------


def _update(factory, grads, tau):
    return factory(tau).update(grads, None)[0]


# One jitted runner for the module: compiled once per tree shape and factory, with tau traced.
_jitted_update = jax.jit(_update, static_argnums=0)


@given(tree=gradient_trees(HIGH), tau=thresholds())
@example(tree={"w": np.array([6.0, 8.0], np.float32)}, tau=1.0)
@example(tree={"w": np.array([0.6, 0.8], np.float32)}, tau=1.0)
def test_transform_is_optax_bit_for_bit(tree, tau):
    jtree = jax.tree.map(jnp.asarray, tree)
    _assert_trees_equal(
        _update(clipping.clip_by_global_norm, jtree, tau),
        _update(optax.clip_by_global_norm, jtree, tau),
        "clip_by_global_norm",
    )
    _assert_trees_equal(_update(clipping.clip, jtree, tau), _update(optax.clip, jtree, tau), "clip")
    assert float(clipping.global_norm(jtree)) == float(optax.tree.norm(jtree))


# Fixed shapes under jit: one compilation per dtype, values and tau drawn freely (tau traced).
@given(tree=gradient_trees(HIGH, min_leaves=3, max_leaves=3, shapes=((4, 4),)), tau=thresholds())
def test_jitted_transform_is_optax_bit_for_bit(tree, tau):
    jtree = [jnp.asarray(a) for a in leaves(tree)]
    for ours, library in (
        (clipping.clip_by_global_norm, optax.clip_by_global_norm),
        (clipping.clip, optax.clip),
    ):
        _assert_trees_equal(
            _jitted_update(ours, jtree, tau),
            _jitted_update(library, jtree, tau),
            f"jitted {ours.__name__}",
        )


def test_second_measurement_is_a_cond_on_the_cpu_and_never_elsewhere():
    """On the CPU the second measurement sits in one conditional that ordinary steps do not
    enter; on a GPU a conditional would read its predicate on the host, so there is none."""
    hlo = (
        jax.jit(lambda g: clipping.clip_tree_by_global_norm(g, 1.0)[0])
        .lower(_grads(1.0))
        .compile()
        .as_text()
    )
    expected = 1 if jax.default_backend() == "cpu" else 0
    assert hlo.count(" conditional(") == expected, (
        f"{hlo.count(' conditional(')} conditionals, expected {expected}"
    )


@pytest.mark.parametrize(
    "tree",
    [
        {"w": np.full(4, 1e20, np.float32)},
        {"w": np.full(4, 1e-30, np.float32)},
        {"w": np.array([3.0, np.inf], np.float32)},
        {"w": np.full(4, 1e300)},
        _grads(2.0),
    ],
    ids=["overflow", "underflow", "inf", "float64-overflow", "ordinary"],
)
def test_off_cpu_where_path_gives_the_cpu_cond_path_bits(tree, monkeypatch):
    """The jnp.where variant (GPUs and TPUs) computes the same second measurement as the cond."""
    on_cpu = jax.jit(lambda g: clipping.clip_tree_by_global_norm(g, 1.0))(tree)
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default, **_: default(*args))
    step = jax.jit(lambda g: clipping.clip_tree_by_global_norm(g, 1.0))
    assert " conditional(" not in step.lower(tree).compile().as_text(), (
        "the where variant still holds a conditional"
    )
    elsewhere = step(tree)
    _assert_trees_equal(elsewhere, on_cpu, "where path != cond path")


# ---- strict=True: the clipped norm, measured exactly, is <= tau ------------------------------


def _exact_square_norm(arrays) -> Fraction:
    return sum_of_squares(arrays)  # the conformance kit's exact oracle


def _times_sqrt_of_ratio(x: np.ndarray, a: Fraction, b: Fraction) -> np.ndarray:
    """x * sqrt(a / b) in float64, within 2 u of exact wherever the result is normal.

    sqrt(a / b) itself can be below float64's smallest normal (tau = 0.01 over a norm of
    3.8e306: 2.6e-309, a subnormal keeping 44 of 53 bits), so it is kept as s * 2**-k with s
    in [1/2, 2): x * (s / 2) rounds once (and cannot overflow), the power of two is exact.
    """
    r = a / b
    k = (r.denominator.bit_length() - r.numerator.bit_length()) // 2  # r * 4**k is near 1
    s = math.sqrt(float(r * Fraction(4) ** k))
    return np.ldexp(np.asarray(x, np.float64) * (s / 2), 1 - k)


strict_jit = jax.jit(
    lambda tree, tau, convention: clipping.clip_tree_by_global_norm(
        tree, tau, strict=True, convention=convention
    ),
    static_argnums=2,
)


@given(
    tree=gradient_trees(magnitudes="extreme"),
    tau=thresholds(),
    convention=st.sampled_from(("optax", "torch")),
    jitted=st.booleans(),
)
@example(tree={"w": np.array([6.0, 8.0], np.float32)}, tau=1.0, convention="optax", jitted=True)
@example(
    tree={"w": np.full(1000, 0.5, np_dtype("bfloat16"))}, tau=1.0, convention="optax", jitted=False
)
@example(tree={"w": np.full(4, 1e20, np.float32)}, tau=1e-3, convention="optax", jitted=True)
@example(tree=[np.full(4, 1e300), np.zeros(0)], tau=1.0, convention="optax", jitted=True)
@example(  # a bfloat16 subnormal, far below tau: widened through float32 it was read as zero
    tree={
        "w0": np.array(0.0263672, np_dtype("bfloat16")),
        "w1": np.array(-9.18355e-39, np_dtype("bfloat16")),
        "w2": np.array(-0.75, np_dtype("bfloat16")),
    },
    tau=1.0,
    convention="optax",
    jitted=False,
)
@example(  # the clipped direction's factor, 2.6e-309, is subnormal: the oracle's a * c lost bits
    tree={"w": np.array([3.79e306, 37.5])}, tau=0.01, convention="optax", jitted=False
)
@example(  # the thorough profile's draw, reduced: scaled by 2**-1023 first, -0.33 was flushed
    tree={
        "w": np.array([-0.333, 2.793e307, 2.534e307, 2.321e307, 6.805e306, -6.769e306, -4.303e306])
    },
    tau=10.0,
    convention="optax",
    jitted=False,
)
def test_strict_bound_holds_exactly(tree, tau, convention, jitted):
    arrays = leaves(tree)
    jtree = jax.tree.map(jnp.asarray, tree)
    clipped, _ = (
        strict_jit(jtree, tau, convention)
        if jitted
        else clipping.clip_tree_by_global_norm(jtree, tau, strict=True, convention=convention)
    )
    out = [np.asarray(c) for c in jax.tree.leaves(clipped)]
    after, limit = _exact_square_norm(out), Fraction(tau) ** 2
    assert after <= limit, (
        f"clipped norm exceeds tau by {float(after / limit) ** 0.5 - 1:.3e} (relative)"
    )
    before = _exact_square_norm(arrays)
    if before <= limit * Fraction(999, 1000):  # well below tau: nothing changes
        for a, c in zip(arrays, out):
            np.testing.assert_array_equal(c, a, err_msg="strict changed a gradient below tau")
        return
    # Direction: clipped = c * g, each entry rounded once (float16/bfloat16: toward zero, then
    # possibly once more by the exact check's rescale): 2 eps relative; entries XLA flushes to
    # zero (below the smallest normal of the dtype it computes in) are the absolute part.
    for a, x in zip(arrays, out):
        name = "bfloat16" if a.dtype == np_dtype("bfloat16") else str(a.dtype)
        np.testing.assert_allclose(
            np.asarray(x, np.float64),
            _times_sqrt_of_ratio(a, after, before),
            rtol=2 * float(finfo(name).eps),
            atol=2 * float(finfo("float64" if name == "float64" else "float32").smallest_normal)
            + (float(finfo(name).smallest_normal) if name == "float16" else 0.0),
            err_msg="strict changed the direction",
        )


def test_default_can_exceed_tau_by_an_ulp_and_strict_cannot():
    g = {"w": jnp.asarray([6.0, 8.0], jnp.float32)}
    default, _ = clipping.clip_tree_by_global_norm(g, 1.0)
    strict, _ = clipping.clip_tree_by_global_norm(g, 1.0, strict=True)
    assert _exact_square_norm(jax.tree.leaves(default)) > 1, (
        "optax's rounding no longer exceeds tau here"
    )
    assert _exact_square_norm(jax.tree.leaves(strict)) <= 1


# ---- the Trainer logs the norm its clipper measured -----------------------------------------


def test_trainer_reports_the_chosen_clippers_norm():
    huge = {"w": jnp.full(4, 1e20, jnp.float32)}  # finite; every square overflows float32
    reference = TrainConfig(clip=ClipConfig(max_norm=1.0, impl="reference"))
    library = TrainConfig(clip=ClipConfig(max_norm=1.0, impl="library"))
    assert float(T.gradient_norm(reference)(huge)) == float(np.float32(2e20))
    assert float(T.gradient_norm(library)(huge)) == math.inf
    model = ModelConfig(vocab_size=7, cell="rnn", hidden_size=4, num_layers=1, embedding_dim=3)
    cfg = TrainConfig(
        batch_size=2, seq_len=3, dtype="float32", clip=ClipConfig(max_norm=0.1, impl="reference")
    )
    params = init_params(model, 0, "float32")
    x = np.array([[1, 2, 3], [4, 5, 6]])
    trainer = T.Trainer(model, cfg, params)
    grads = jax.grad(lambda p: M.loss(p, x, x, M.zero_state(model, 2, jnp.float32), cfg=model)[0])(
        trainer.params
    )
    logged = trainer.step(x, x).grad_norm
    np.testing.assert_allclose(
        logged,
        float(clipping.global_norm(grads)),
        rtol=1e-6,  # float32 sums in another order
        err_msg="logged norm is not the clipper's",
    )


@pytest.mark.parametrize("strict", [False, True])
def test_jitted_low_precision_clip_keeps_a_subnormal_below_tau(strict):
    """Under jit, XLA fused the keep-select with the arithmetic around it and returned a
    bfloat16 subnormal far below tau as zero (the thorough profile's draw, and the CI
    profile's [1.06e-38, 7.5e-39, 4.6e-34]); a lax.cond now hands the leaf through."""
    bf16 = np_dtype("bfloat16")
    tree = {
        "w1": jnp.asarray(np.array([0.0742188, 0.347656, 0.0], bf16)),
        "w2": jnp.asarray(np.array([8.90804e-39, 0.0, 6.24481e-39], bf16)),
        "w3": jnp.asarray(np.array(0.0166016, bf16)),
        "w4": jnp.asarray(np.array([1.05611e-38, 7.53051e-39, 4.57408e-34], bf16)),
    }
    eager, _ = clipping.clip_tree_by_global_norm(tree, 1.0, strict=strict)
    np.testing.assert_array_equal(np.asarray(eager["w2"]), np.asarray(tree["w2"]))
    jitted, _ = jax.jit(lambda t: clipping.clip_tree_by_global_norm(t, 1.0, strict=strict))(tree)
    for name in tree:
        np.testing.assert_array_equal(np.asarray(jitted[name]), np.asarray(tree[name]), name)
