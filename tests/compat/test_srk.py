"""The stochastic Runge–Kutta solvers give Diffrax's answers.

Each case runs the same `diffeqsolve` call through Diffrax and diffeqx, driven by the
deterministic stand-in for Brownian motion of `_sde_paths.py` (closed-form `W`, `H`,
`K`, the same in both libraries), and compares every step's state, the step times
and the step counts. The additive-noise methods get a diffusion that varies in time
(exercising their correction term), the others one that depends on the state through
non-commuting vector fields.

The values agree to rounding (the stage sums are accumulated in a different order;
measured differences are a few ULP), and the step counts and accept/reject decisions
of the adaptive solves exactly.

Intentional difference: solving backwards in time (`t1 < t0`), where Diffrax
0.7.2's SRK solvers are wrong in two ways (Diffrax issue #598, fixed after 0.7.2
by pull request #746), and diffeqx handles both correctly:

- they step the drift with the unsigned step size `t1 - t0` of the internal,
  time-reversed variable instead of the drift term's own control (which is
  negative), so the drift is integrated in the wrong direction;
- they negate the space-time Lévy area `H` along with `W` and `K`. Traversed from
  `t` to `s`, a Brownian path has increment `-W` and space-time-time Lévy area
  `-K` but the same `H` (the reversed path's bridge is the original bridge read
  backwards, and `H` is its mean); diffeqx asks the path for the reversed interval,
  which returns exactly that.

`test_backwards_in_time_drift_direction` and `test_backwards_in_time_is_exact` pin
each down: diffeqx is right where the answer is known, Diffrax 0.7.2 is not.
"""

import jax.numpy as jnp
import numpy as np
import pytest

diffrax = pytest.importorskip("diffrax")

import diffeqx  # noqa: E402

from ._sde_paths import polynomial_path  # noqa: E402

ADDITIVE = ("SEA", "SRA1", "ShARK")
GENERAL = ("GeneralShARK", "SlowRK", "SPaRK")
_SIGMA = np.array([[0.6, 0.2], [-0.3, 0.5]])
_A = np.array([[0.3, -0.2], [0.1, 0.25]])
_B = np.array([[0.0, 0.4], [-0.35, 0.1]])


def _drift(t, y, args):
    return -jnp.sin(y) + jnp.cos(t) * jnp.asarray([0.3, -0.1], y.dtype)


def _additive_diffusion(t, y, args):
    return jnp.asarray(_SIGMA, y.dtype) * (1.0 + 0.5 * jnp.sin(t)).astype(y.dtype)


def _general_diffusion(t, y, args):
    a, b = jnp.asarray(_A, y.dtype), jnp.asarray(_B, y.dtype)
    return jnp.stack([a @ jnp.sin(y), b @ y], axis=-1)


def _solve(
    lib,
    name,
    *,
    controller="const",
    t0=0.0,
    t1=1.0,
    dt0=0.1,
    dtype="float64",
):
    dtype = jnp.dtype(dtype)
    path = polynomial_path(lib, (2,), lib.SpaceTimeLevyArea, dtype=dtype)
    diffusion = _additive_diffusion if name in ADDITIVE else _general_diffusion
    terms = lib.MultiTerm(lib.ODETerm(_drift), lib.ControlTerm(diffusion, path))
    if controller == "const":
        stepsize_controller = lib.ConstantStepSize()
    else:
        stepsize_controller = lib.PIDController(rtol=1e-3, atol=1e-4)
    t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (t0, t1, dt0))
    sol = lib.diffeqsolve(
        terms,
        getattr(lib, name)(),
        t0,
        t1,
        dt0,
        jnp.asarray([0.5, -0.2], dtype),
        saveat=lib.SaveAt(steps=True),
        stepsize_controller=stepsize_controller,
        max_steps=64,
    )
    stats = {
        key: int(sol.stats[key])
        for key in ("num_steps", "num_accepted_steps", "num_rejected_steps")
    }
    return np.asarray(sol.ts), np.asarray(sol.ys), stats


def _compare(name, rtol=1e-12, **kwargs):
    """Diffrax's and diffeqx's solves agree: step counts exactly, step times and
    states to `rtol` (states relative to their largest magnitude)."""
    ts_x, ys_x, stats_x = _solve(diffrax, name, **kwargs)
    ts_d, ys_d, stats_d = _solve(diffeqx, name, **kwargs)
    assert stats_d == stats_x
    # Unused output slots are `inf` in both.
    np.testing.assert_array_equal(np.isfinite(ts_d), np.isfinite(ts_x))
    finite = np.isfinite(ts_x)
    scale = np.max(np.abs(ys_x[finite]))
    np.testing.assert_allclose(ts_d[finite], ts_x[finite], rtol=rtol, atol=0)
    np.testing.assert_allclose(ys_d[finite], ys_x[finite], rtol=0, atol=rtol * scale)
    return stats_d


# Each case is a few seconds, mostly compilation in both libraries: one additive and
# one general-noise method in the default run, the others marked `slow`.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name, marks=() if name in ("ShARK", "SlowRK") else pytest.mark.slow
        )
        for name in ADDITIVE + GENERAL
    ],
)
def test_fixed_steps(name):
    stats = _compare(name)
    assert stats["num_steps"] == 10


def test_spark_adaptive():
    stats = _compare("SPaRK", controller="pid")
    # The solve really adapts: it rejects steps on this path.
    assert stats["num_rejected_steps"] > 0


@pytest.mark.slow
def test_shark_adaptive():
    # ShARK has an error estimate (of the drift) too, and runs with PIDController
    # in both libraries.
    _compare("ShARK", controller="pid")


@pytest.mark.slow
def test_backwards_in_time_drift_direction():
    # With zero diffusion an SRK solve backwards in time is an ODE solve backwards
    # in time: diffeqx's SPaRK agrees with Tsit5 to SPaRK's (second-order) error;
    # Diffrax 0.7.2's integrates the drift forwards instead.
    def zero(t, y, args):
        return jnp.zeros((2, 2), y.dtype)

    results = {}
    for lib in (diffrax, diffeqx):
        path = polynomial_path(lib, (2,), lib.SpaceTimeLevyArea)
        terms = lib.MultiTerm(lib.ODETerm(_drift), lib.ControlTerm(zero, path))
        y0 = jnp.asarray([0.5, -0.2])
        srk = lib.diffeqsolve(terms, lib.SPaRK(), 1.0, 0.0, -0.1, y0).ys[-1]
        ode = lib.diffeqsolve(lib.ODETerm(_drift), lib.Tsit5(), 1.0, 0.0, -0.1, y0)
        results[lib.__name__] = (np.asarray(srk), np.asarray(ode.ys[-1]))
    ours, ode = results["diffeqx"]
    np.testing.assert_allclose(ours, ode, rtol=0, atol=1e-3)
    theirs, _ = results["diffrax"]
    assert np.max(np.abs(theirs - ode)) > 0.1


def test_backwards_in_time_is_exact():
    # dy = (alpha + beta t) dW, one step from h back to 0: y(0) = y(h) - I with
    # I = ∫_0^h (alpha + beta t) dW = (alpha + beta h) W - beta h (W/2 + H), in terms
    # of the forward interval's W and H (the drift is zero, so only the handling of
    # H is tested). ShARK's step is exact for a diffusion linear in t given the
    # right H; Diffrax 0.7.2's, stepping with -H, is not.
    alpha, beta, h = jnp.asarray([0.5, -0.3]), jnp.asarray([1.5, 0.8]), 0.5
    results = {}
    for lib in (diffrax, diffeqx):
        path = polynomial_path(lib, (2,), lib.SpaceTimeLevyArea)
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: jnp.zeros_like(y)),
            lib.ControlTerm(lambda t, y, args: jnp.diag(alpha + beta * t), path),
        )
        y_h = jnp.asarray([1.0, 2.0])
        sol = lib.diffeqsolve(terms, lib.ShARK(), h, 0.0, -h, y_h)
        levy = path.evaluate(0.0, h, use_levy=True)
        integral = (alpha + beta * h) * levy.W - beta * h * (levy.W / 2 + levy.H)
        results[lib.__name__] = (np.asarray(sol.ys[-1]), np.asarray(y_h - integral))
    ours, exact = results["diffeqx"]
    np.testing.assert_allclose(ours, exact, rtol=1e-14, atol=1e-14)
    theirs, _ = results["diffrax"]
    assert np.max(np.abs(theirs - exact)) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", ("ShARK", "SlowRK"))
def test_float32(name):
    _compare(name, rtol=2e-6, dtype="float32")
