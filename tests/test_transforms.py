"""diffeqsolve under JAX transformations: jit, vmap, grad, jvp/jacfwd; PyTree, mixed-dtype
and float32 states.

Truth is a closed form, a Python loop of single solves (for vmap), or central finite
differences of the solve in float64 (for every derivative).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import diffeqx as dfx

T0, T1 = 0.0, 1.0
TS = jnp.array([0.1, 0.35, 0.6, 1.0])
FIXED_DT0 = 0.01  # 100 steps: enough for checkpoints=3 to recompute many times.
MAX_STEPS = 256  # small bound keeps DirectAdjoint's compile cheap.

ADJOINTS = [
    pytest.param(dfx.RecursiveCheckpointAdjoint(), id="recursive"),
    pytest.param(
        dfx.RecursiveCheckpointAdjoint(checkpoints=3),
        id="recursive-3-ckpts",
        marks=pytest.mark.slow,  # checkpoints are the memory tests' subject
    ),
    pytest.param(dfx.DirectAdjoint(), id="direct"),
]


def _decay(t, y, rate):
    return -rate * y


def _nonlinear(t, y, rate):
    # Nonlinear and time-dependent, so a gradient that ignores the state-dependence
    # of the field (or t) would be caught by the finite-difference check.
    return -rate * y + 0.3 * t * jnp.sin(y)


def _solve_fixed(vf, y0, args, adjoint=dfx.RecursiveCheckpointAdjoint(), **kwargs):
    return dfx.diffeqsolve(
        dfx.ODETerm(vf),
        dfx.Tsit5(),
        T0,
        T1,
        FIXED_DT0,
        y0,
        args,
        saveat=dfx.SaveAt(ts=TS),
        adjoint=adjoint,
        max_steps=MAX_STEPS,
        **kwargs,
    )


def _fd_grad(fn, x, h=1e-5):
    """Central finite differences of scalar `fn` at the PyTree `x` (float64)."""
    flat, unravel = ravel_pytree(x)
    flat = np.asarray(flat, dtype=np.float64)
    grad = np.zeros_like(flat)
    for i in range(flat.size):
        step = np.zeros_like(flat)
        step[i] = h
        plus = float(fn(unravel(jnp.asarray(flat + step))))
        minus = float(fn(unravel(jnp.asarray(flat - step))))
        grad[i] = (plus - minus) / (2 * h)
    return grad


def _rel_err(actual, expected):
    actual = np.asarray(actual, dtype=np.float64).ravel()
    expected = np.asarray(expected, dtype=np.float64).ravel()
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


# ---------------------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------------------


def test_jit_solve_matches_closed_form():
    @jax.jit
    def solve(y0, rate):
        return _solve_fixed(_decay, y0, rate).ys

    y0 = jnp.array([1.0, -2.0, 0.5])
    for rate in (0.7, 1.9):  # second call reuses the compiled function
        ys = solve(y0, rate)
        expected = y0[None, :] * jnp.exp(-rate * TS)[:, None]
        assert ys.shape == (TS.size, 3)
        np.testing.assert_allclose(ys, expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------
# vmap
# ---------------------------------------------------------------------------------------


def _pid_solve_t1(y0, rate, t1):
    return dfx.diffeqsolve(
        dfx.ODETerm(_decay),
        dfx.Tsit5(),
        T0,
        t1,
        0.05,
        y0,
        rate,
        saveat=dfx.SaveAt(t1=True),
        stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-11),
    )


# vmap over y0, args and t1 against single solves and closed forms: test_batching.py
# (the batching tests) in the default run.
@pytest.mark.slow
def test_vmap_over_y0_matches_loop_and_closed_form():
    y0s = jnp.array([[1.0, 0.0], [2.0, -1.0], [-0.5, 3.0]])
    rate = 1.3
    batched = jax.vmap(lambda y0: _solve_fixed(_decay, y0, rate).ys)(y0s)
    looped = jnp.stack([_solve_fixed(_decay, y0, rate).ys for y0 in y0s])
    expected = y0s[:, None, :] * jnp.exp(-rate * TS)[None, :, None]
    assert batched.shape == (3, TS.size, 2)
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(batched, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_vmap_over_args_matches_loop_and_closed_form():
    y0 = jnp.array([1.0, -2.0])
    rates = jnp.array([0.2, 1.0, 3.5, 7.0])
    batched = jax.vmap(lambda rate: _solve_fixed(_decay, y0, rate).ys)(rates)
    looped = jnp.stack([_solve_fixed(_decay, y0, rate).ys for rate in rates])
    expected = y0[None, None, :] * jnp.exp(-rates[:, None] * TS[None, :])[..., None]
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(batched, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_vmap_over_t1_each_member_stops_at_its_own_t1():
    y0 = jnp.array([1.0, 2.0])
    rate = 0.8
    t1s = jnp.array([0.3, 1.0, 2.7, 5.0])
    sol = jax.vmap(lambda t1: _pid_solve_t1(y0, rate, t1))(t1s)
    assert sol.ts.shape == (4, 1)
    np.testing.assert_allclose(sol.ts[:, 0], t1s, rtol=0, atol=1e-14)
    expected = y0[None, :] * jnp.exp(-rate * t1s)[:, None]
    np.testing.assert_allclose(sol.ys[:, 0], expected, rtol=1e-7, atol=0)
    looped = jnp.stack([_pid_solve_t1(y0, rate, t1).ys[0] for t1 in t1s])
    np.testing.assert_allclose(sol.ys[:, 0], looped, rtol=1e-12, atol=1e-14)
    # Members really took different numbers of steps (they were not padded to one grid).
    num_steps = np.asarray(sol.stats["num_steps"])
    assert num_steps[0] < num_steps[-1]


# ---------------------------------------------------------------------------------------
# grad, fixed steps: every adjoint against central finite differences
# ---------------------------------------------------------------------------------------


def _assert_grad_matches_fd(loss, x, rtol=1e-6):
    """jax.grad of `loss` at the PyTree `x` against central finite differences."""
    # One compilation serves both: the finite differences read the value half. Round-trip
    # `x` through ravel_pytree first, so that the perturbed points have the same dtypes
    # (weak types included) and the function is not compiled twice.
    flat, unravel = ravel_pytree(x)
    x = unravel(flat)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    grad = value_and_grad(x)[1]
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(x)
    fd = _fd_grad(lambda z: value_and_grad(z)[0], x)
    assert _rel_err(ravel_pytree(grad)[0], fd) <= rtol


def _weighted_square_sum(ys):
    weights = jnp.arange(1.0, ys.size + 1.0).reshape(ys.shape)
    return jnp.sum(weights * ys**2)


# Gradients with respect to y0 and args against finite differences by default, with
# the default adjoint, DirectAdjoint (constant steps) and BacksolveAdjoint:
# test_adjoints.py (section 1).
@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_grad_wrt_y0_and_float_args_matches_finite_differences(adjoint):
    def loss(y0_and_rate):
        y0, rate = y0_and_rate
        return _weighted_square_sum(_solve_fixed(_nonlinear, y0, rate, adjoint).ys)

    _assert_grad_matches_fd(loss, (jnp.array([0.8, -0.4, 1.5]), jnp.asarray(0.9)))


def _forced(t, y, args):
    return -args["rate"] * y + args["forcing"] * jnp.cos(args["omega"] * t)


# Gradients with respect to a dict of args against finite differences in the default
# run: test_adjoints.py (section 1).
@pytest.mark.slow
@pytest.mark.parametrize(
    "adjoint",
    [
        pytest.param(dfx.RecursiveCheckpointAdjoint(), id="recursive"),
        pytest.param(dfx.DirectAdjoint(), id="direct"),
    ],
)
def test_grad_wrt_dict_args_matches_finite_differences(adjoint):
    y0 = jnp.array([1.0, 0.0, -1.0])

    def loss(args):
        return jnp.sum(_solve_fixed(_forced, y0, args, adjoint).ys ** 3)

    args = {
        "rate": jnp.asarray(0.6),
        "forcing": jnp.array([0.5, -1.0, 2.0]),
        "omega": jnp.asarray(3.0),
    }
    _assert_grad_matches_fd(loss, args)


def _mlp_field(t, y, model):
    return model(y)


@pytest.mark.slow
def test_grad_wrt_mlp_parameters_matches_finite_differences():
    y0 = jnp.array([0.5, -0.3])

    def loss(model):
        return jnp.sum(_solve_fixed(_mlp_field, y0, model).ys ** 2)

    model = eqx.nn.MLP(2, 2, width_size=8, depth=2, activation=jnp.tanh, key=jr.key(0))
    # Perturb the parameters through eqx.partition / eqx.combine. Round-trip them through
    # ravel_pytree first so the perturbed models have the same dtypes (no recompile).
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat_params, unravel = ravel_pytree(params)
    model = eqx.combine(unravel(flat_params), static)

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    grad = value_and_grad(model)[1]
    assert isinstance(grad, eqx.nn.MLP)
    flat_grad = ravel_pytree(eqx.filter(grad, eqx.is_inexact_array))[0]

    def loss_at(flat):
        return float(value_and_grad(eqx.combine(unravel(flat), static))[0])

    # Directional finite differences along random directions: one FD per direction
    # rather than one per parameter keeps this fast.
    h = 1e-5
    for seed in range(3):
        direction = jr.normal(jr.key(seed + 1), flat_params.shape)
        fd = loss_at(flat_params + h * direction) - loss_at(flat_params - h * direction)
        fd /= 2 * h
        ad = float(jnp.dot(flat_grad, direction))
        assert abs(ad - fd) <= 1e-6 * abs(fd)


# ---------------------------------------------------------------------------------------
# grad, adaptive steps: against the closed-form derivative (honest tolerance)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adjoint",
    [
        pytest.param(dfx.RecursiveCheckpointAdjoint(), id="recursive"),
        # DirectAdjoint with adaptive steps against Diffrax by default:
        # tests/compat/test_gradients.py.
        pytest.param(dfx.DirectAdjoint(), id="direct", marks=pytest.mark.slow),
    ],
)
def test_grad_with_pid_controller_matches_closed_form_derivative(adjoint):
    t1 = 2.0

    def final_value(y0, rate):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            T0,
            t1,
            0.1,
            y0,
            rate,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-12),
            adjoint=adjoint,
            max_steps=MAX_STEPS,
        )
        return sol.ys[0]

    y0, rate = 1.7, 0.8
    d_y0, d_rate = jax.jit(jax.grad(final_value, argnums=(0, 1)))(y0, rate)
    exact_d_y0 = np.exp(-rate * t1)
    exact_d_rate = -t1 * y0 * np.exp(-rate * t1)
    # The adaptive solve has error ~1e-10. Its derivative is not error-controlled, so the
    # tolerance is looser than for the fixed-step finite-difference checks.
    np.testing.assert_allclose(d_y0, exact_d_y0, rtol=1e-6)
    np.testing.assert_allclose(d_rate, exact_d_rate, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# PyTree, mixed-dtype and float32 states
# ---------------------------------------------------------------------------------------

_PYTREE_RATES = {"x": 0.5, "v": (1.5, 2.5)}


def _pytree_field(t, y, args):
    return {"x": -0.5 * y["x"], "v": (-1.5 * y["v"][0], -2.5 * y["v"][1])}


def _pytree_y0():
    return {
        "x": jnp.array([1.0, -2.0]),
        "v": (jnp.asarray(0.7), jnp.arange(6.0).reshape(3, 2) - 2.0),
    }


def test_pytree_state_matches_closed_form_leafwise():
    y0 = _pytree_y0()
    sol = _solve_fixed(_pytree_field, y0, None)
    assert jax.tree_util.tree_structure(sol.ys) == jax.tree_util.tree_structure(y0)
    for y_leaf, y0_leaf, rate in zip(
        jax.tree_util.tree_leaves(sol.ys),
        jax.tree_util.tree_leaves(y0),
        jax.tree_util.tree_leaves(_PYTREE_RATES),
        strict=True,
    ):
        assert y_leaf.shape == (TS.size, *y0_leaf.shape)
        decay = jnp.exp(-rate * TS).reshape((TS.size,) + (1,) * y0_leaf.ndim)
        np.testing.assert_allclose(y_leaf, decay * y0_leaf[None], rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # ~11 s; the other finite-difference gradient tests cover y0
def test_grad_wrt_pytree_y0_matches_finite_differences():
    def loss(y0):
        ys = _solve_fixed(_pytree_field, y0, None).ys
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(ys))

    _assert_grad_matches_fd(loss, _pytree_y0())


# Each state leaf is promoted to the dtype of the times (as Diffrax 0.7.2, checked by
# running the same calls through it): with Python-float times under x64 (and no float32
# `ts`) the times are float64, so a float32 leaf comes back float64; with float32 times a
# float32 leaf stays float32 and a float64 leaf stays float64. (On that mixed state with
# float32 times Diffrax itself fails, under standard or strict promotion: an extension.)
_TIMES = {
    "float32-times": (jnp.float32(0.0), jnp.float32(1.0), jnp.float32(0.05)),
    "python-float-times": (0.0, 1.0, 0.05),
}
_STATE_DTYPE = {"float32-times": jnp.float32, "python-float-times": jnp.float64}


def _dtype_case(times):
    """(t0, t1, dt0, saveat, save times) for one of `_TIMES`."""
    t0, t1, dt0 = _TIMES[times]
    if times == "float32-times":
        ts = TS.astype(jnp.float32)
        return t0, t1, dt0, dfx.SaveAt(ts=ts), np.asarray(ts, np.float64)
    # Any float64 array (such as SaveAt(ts=...)) would make the times float64 strongly.
    return t0, t1, dt0, dfx.SaveAt(t0=True, t1=True), np.array([t0, t1])


@pytest.mark.parametrize("times", sorted(_TIMES))
def test_mixed_dtype_state_leaves_follow_the_times(times):
    t0, t1, dt0, saveat, save_ts = _dtype_case(times)
    y0 = {
        "single": jnp.array([1.0, -0.5], dtype=jnp.float32),
        "double": jnp.array([2.0, 0.25], dtype=jnp.float64),
    }
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: jax.tree_util.tree_map(lambda v: -v, y)),
        dfx.Tsit5(),
        t0,
        t1,
        dt0,
        y0,
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
    )
    assert sol.ys["single"].dtype == _STATE_DTYPE[times]
    assert sol.ys["double"].dtype == jnp.float64
    decay = np.exp(-save_ts)[:, None]
    for name, rtol in (("single", 1e-5), ("double", 1e-6)):
        expected = decay * np.asarray(y0[name], np.float64)
        np.testing.assert_allclose(np.asarray(sol.ys[name]), expected, rtol=rtol)


def _decay_cast(t, y, rate):
    # Under strict promotion the field casts its float32 rate to the state's dtype.
    return -rate.astype(y.dtype) * y


@pytest.mark.parametrize("times", sorted(_TIMES))
def test_float32_state_dtype_follows_the_times_and_is_accurate(times):
    t0, t1, dt0, saveat, save_ts = _dtype_case(times)
    y0 = jnp.array([1.0, -3.0, 0.5], dtype=jnp.float32)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_decay_cast),
        dfx.Tsit5(),
        t0,
        t1,
        dt0,
        y0,
        jnp.float32(1.2),
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-7),
    )
    assert sol.ys.dtype == _STATE_DTYPE[times]
    decay = np.exp(-1.2 * save_ts)[:, None]
    expected = decay * np.asarray(y0, np.float64)
    np.testing.assert_allclose(np.asarray(sol.ys), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Forward mode
# ---------------------------------------------------------------------------------------


@jax.jit
def _forward_solve(y0, rate):
    return _solve_fixed(_nonlinear, y0, rate, adjoint=dfx.ForwardMode()).ys


Y0_FWD = jnp.array([0.8, -0.4, 1.5])
RATE_FWD = 0.9


def test_forward_mode_jvp_matches_finite_differences():
    tangent_y0 = jnp.array([0.3, -1.0, 0.5])
    tangent_rate = 0.7
    primal, tangent = jax.jit(jax.jvp, static_argnums=0)(
        _forward_solve, (Y0_FWD, RATE_FWD), (tangent_y0, tangent_rate)
    )
    h = 1e-5
    plus = _forward_solve(Y0_FWD + h * tangent_y0, RATE_FWD + h * tangent_rate)
    minus = _forward_solve(Y0_FWD - h * tangent_y0, RATE_FWD - h * tangent_rate)
    fd = (plus - minus) / (2 * h)
    np.testing.assert_allclose(primal, _forward_solve(Y0_FWD, RATE_FWD), rtol=1e-13)
    assert _rel_err(tangent, fd) <= 1e-6


# jacfwd against finite differences by default:
# test_adjoints.py::test_higher_order_forward_mode_matches_finite_differences.
@pytest.mark.slow
def test_forward_mode_jacfwd_matches_finite_differences():
    jac_y0, jac_rate = jax.jit(jax.jacfwd(_forward_solve, argnums=(0, 1)))(
        Y0_FWD, RATE_FWD
    )
    assert jac_y0.shape == (TS.size, 3, 3)
    assert jac_rate.shape == (TS.size, 3)
    h = 1e-5
    for i in range(3):
        step = jnp.zeros(3).at[i].set(h)
        plus = _forward_solve(Y0_FWD + step, RATE_FWD)
        minus = _forward_solve(Y0_FWD - step, RATE_FWD)
        assert _rel_err(jac_y0[..., i], (plus - minus) / (2 * h)) <= 1e-6
    plus = _forward_solve(Y0_FWD, RATE_FWD + h)
    minus = _forward_solve(Y0_FWD, RATE_FWD - h)
    assert _rel_err(jac_rate, (plus - minus) / (2 * h)) <= 1e-6
