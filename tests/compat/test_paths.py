"""Paths built from data, through Diffrax and diffeqx: `LinearInterpolation`,
`CubicInterpolation` of `backward_hermite_coefficients`, `linear_interpolation` and
`rectilinear_interpolation`, evaluated (values, increments, derivatives, from the left
and the right, at the knots, between them and outside) the same way in both.

Where the two differ on purpose (docs/migration.md), a test below pins the difference
down: missing values inside a channel and at its ends for the cubic, the meaning of
`replace_nans_at_start`, and repeated times.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx

diffrax = pytest.importorskip("diffrax")

LIBS = (diffrax, diffeqx)


def _data(dtype, missing, seed=0):
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.uniform(0.0, 3.0, 7))
    ts[0] = 0.0
    ys = rng.standard_normal((7, 3))
    if missing:
        # Inside a channel, at the start of one and at the end of another.
        ys[2, 0] = ys[3, 0] = np.nan
        ys[0, 1] = np.nan
        ys[5, 2] = ys[6, 2] = np.nan
    queries = np.concatenate([ts, rng.uniform(-0.5, 3.5, 8)])
    return jnp.asarray(ts, dtype), jnp.asarray(ys, dtype), jnp.asarray(queries, dtype)


@eqx.filter_jit  # one compilation per path, not one per operation
def _observe(path, queries):
    out = {}
    for left in (True, False):
        out[f"value_left={left}"] = jax.vmap(
            lambda t, left=left: path.evaluate(t, left=left)
        )(queries)
        out[f"increment_left={left}"] = jax.vmap(
            lambda s, t, left=left: path.evaluate(s, t, left=left)
        )(queries[:-1], queries[1:])
        out[f"derivative_left={left}"] = jax.vmap(
            lambda t, left=left: path.derivative(t, left=left)
        )(queries)
    return out


def _assert_same(ours, theirs, dtype):
    tol = 1e-12 if dtype == jnp.float64 else 2e-5
    for key in theirs:
        np.testing.assert_allclose(
            np.asarray(ours[key]),
            np.asarray(theirs[key]),
            rtol=tol,
            atol=tol,
            equal_nan=True,
            err_msg=key,
        )
        assert ours[key].dtype == theirs[key].dtype, key


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "build",
    [
        "linear",
        "linear_missing",
        "linear_missing_filled",
        "cubic",
        "cubic_deriv0",
        "cubic_missing_only_at_start",
    ],
)
def test_paths_evaluate_as_in_diffrax(build, dtype):
    def run(lib):
        missing = build in ("linear_missing", "linear_missing_filled")
        ts, ys, queries = _data(dtype, missing=missing)
        if build == "linear":
            path = lib.LinearInterpolation(ts, ys)
        elif build == "linear_missing":
            path = lib.LinearInterpolation(ts, lib.linear_interpolation(ts, ys))
        elif build == "linear_missing_filled":
            filled = lib.linear_interpolation(
                ts, ys, fill_forward_nans_at_end=True, replace_nans_at_start=0.5
            )
            path = lib.LinearInterpolation(ts, filled)
        elif build == "cubic":
            path = lib.CubicInterpolation(ts, lib.backward_hermite_coefficients(ts, ys))
        elif build == "cubic_deriv0":
            coeffs = lib.backward_hermite_coefficients(ts, ys, deriv0=0.3)
            path = lib.CubicInterpolation(ts, coeffs)
        else:
            # Missing values only before a channel's first observation: the same
            # cubic in both (the differences are inside and at the end).
            ys = ys.at[0, 1].set(jnp.nan)
            coeffs = lib.backward_hermite_coefficients(ts, ys)
            path = lib.CubicInterpolation(ts, coeffs)
        return _observe(path, queries)

    _assert_same(run(diffeqx), run(diffrax), dtype)


def test_rectilinear_data_as_in_diffrax():
    ts, ys, _ = _data(jnp.float64, missing=True)
    for kwargs in ({}, dict(replace_nans_at_start=0.5)):
        ours = diffeqx.rectilinear_interpolation(ts, ys, **kwargs)
        theirs = diffrax.rectilinear_interpolation(ts, ys, **kwargs)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # As both libraries' docs use it: over an increasing parameter.
    new_ts, new_ys = diffeqx.rectilinear_interpolation(
        ts, ys, replace_nans_at_start=0.0
    )
    data = jnp.concatenate([new_ts[:, None], new_ys], axis=1)
    parameter = jnp.arange(data.shape[0], dtype=data.dtype)
    queries = jnp.linspace(-0.5, data.shape[0] - 0.5, 29)
    _assert_same(
        _observe(diffeqx.LinearInterpolation(parameter, data), queries),
        _observe(diffrax.LinearInterpolation(parameter, data), queries),
        jnp.float64,
    )


# ---- listed differences ----------------------------------------------------------


def _cubic(lib, ts, ys, **kwargs):
    return lib.CubicInterpolation(
        ts, lib.backward_hermite_coefficients(ts, ys, **kwargs)
    )


def test_missing_value_inside_a_channel():
    # Observations at 0, 0.3, 1.0, 1.6, 2.0 and one missing at 0.7. diffeqx's path
    # is built from the observations alone: one cubic over [0.3, 1.0], ending with
    # the backward difference (4 - 2) / 0.7, so continuously differentiable at 1.0.
    # Diffrax's piece after 0.7 ends with the difference from the value it filled
    # in at 0.7, and the next piece starts with (4 - 2) / 0.7: a kink at 1.0.
    ts = jnp.asarray([0.0, 0.3, 0.7, 1.0, 1.6, 2.0])
    ys = jnp.asarray([[1.0], [2.0], [jnp.nan], [4.0], [3.0], [5.0]])
    ours, theirs = _cubic(diffeqx, ts, ys), _cubic(diffrax, ts, ys)
    slope = (4.0 - 2.0) / 0.7
    for path in (ours, theirs):  # the same values at the observations
        np.testing.assert_allclose(
            jax.vmap(path.evaluate)(ts[jnp.asarray([0, 1, 3, 4, 5])])[:, 0],
            [1.0, 2.0, 4.0, 3.0, 5.0],
            rtol=1e-14,
        )
        np.testing.assert_allclose(path.derivative(1.0, left=False), slope)
    np.testing.assert_allclose(ours.derivative(1.0, left=True), slope, rtol=1e-12)
    assert abs(float(theirs.derivative(1.0, left=True)[0]) - slope) > 0.1
    # diffeqx's pieces on [0.3, 0.7] and [0.7, 1.0] are one cubic: its value at
    # 0.85 is the first piece's polynomial continued.
    # (Coefficients `(a, b, c, d)` of `a s³ + b s² + c s + d`.)
    a, b, c, d = (x[1, 0] for x in diffeqx.backward_hermite_coefficients(ts, ys))
    s = 0.85 - 0.3
    np.testing.assert_allclose(
        ours.evaluate(0.85)[0], a * s**3 + b * s**2 + c * s + d, rtol=1e-12
    )


def test_replace_nans_at_start_replaces_only_missing_values():
    # Observed at ts[0]: diffeqx keeps the observation (what both libraries'
    # docstrings say); Diffrax 0.7.2 replaces it anyway.
    ts = jnp.asarray([0.0, 0.5, 1.0, 1.5])
    ys = jnp.asarray([[1.0, jnp.nan], [2.0, 1.0], [0.5, 3.0], [1.5, 2.0]])
    ours = _cubic(diffeqx, ts, ys, replace_nans_at_start=0.25)
    theirs = _cubic(diffrax, ts, ys, replace_nans_at_start=0.25)
    np.testing.assert_allclose(ours.evaluate(0.0), [1.0, 0.25])
    np.testing.assert_allclose(theirs.evaluate(0.0), [0.25, 0.25])


def test_fill_forward_nans_at_end_fills_before_fitting():
    # The last observation of the channel (at 1.0) is carried to the missing times
    # as observations: diffeqx's path is then constant after the first of them
    # (a cubic from 1.0 to 1.5 ending with slope 0, then flat). Diffrax's path
    # rises to 3.5 at 1.5 and returns to 3 at 2.
    ts = jnp.asarray([0.0, 0.5, 1.0, 1.5, 2.0])
    ys = jnp.asarray([[0.0], [1.0], [3.0], [jnp.nan], [jnp.nan]])
    ours = _cubic(diffeqx, ts, ys, fill_forward_nans_at_end=True)
    theirs = _cubic(diffrax, ts, ys, fill_forward_nans_at_end=True)
    later = jnp.asarray([1.5, 1.7, 2.0])
    np.testing.assert_allclose(jax.vmap(ours.evaluate)(later)[:, 0], 3.0, rtol=1e-14)
    np.testing.assert_allclose(ours.derivative(1.8)[0], 0.0, atol=1e-14)
    np.testing.assert_allclose(
        jax.vmap(theirs.evaluate)(later)[:, 0], [3.5, 3.3, 3.0], rtol=1e-12
    )


def test_repeated_times_are_refused():
    # Diffrax accepts a repeated time (a jump that the path's derivative, and so a
    # CDE solve, does not see); diffeqx raises at construction.
    ts = jnp.asarray([0.0, 1.0, 1.0, 2.0])
    ys = jnp.asarray([0.0, 1.0, 5.0, 6.0])
    diffrax.LinearInterpolation(ts, ys)
    with pytest.raises(ValueError, match="strictly increasing"):
        diffeqx.LinearInterpolation(ts, ys)


def test_local_interpolations_built_by_hand_from_python_numbers():
    # Diffrax accepts Python numbers for the end values; diffeqx read `.dtype` from
    # them and failed.
    values = {}
    for lib in (diffeqx, diffrax):
        linear = lib.LocalLinearInterpolation(t0=2.0, t1=3.3, y0=2.1, y1=2.2)
        cubic = lib.ThirdOrderHermitePolynomialInterpolation(
            t0=2.0, t1=3.9, y0=2.1, y1=2.2, k0=0.1, k1=0.3
        )
        values[lib.__name__] = [
            float(x)
            for x in (
                linear.evaluate(2.8),
                linear.evaluate(2.8, 2.9),
                linear.derivative(2.8),
                cubic.evaluate(2.6),
                cubic.derivative(2.6),
            )
        ]
    np.testing.assert_allclose(values["diffeqx"], values["diffrax"], rtol=1e-14)


def test_local_interpolations_on_a_step_of_zero_length_as_in_diffrax():
    # A step with t0 == t1 (e.g. a solve from t0 to t0): Diffrax's interpolant is y0
    # at every time, with derivative zero, and zero gradients with respect to the
    # times. diffeqx divided by a step length of 1 there, giving a derivative of
    # y1 - y0 (until 2026-12-06).
    def outputs(lib, t0, t1, t):
        linear = lib.LocalLinearInterpolation(
            t0=t0, t1=t1, y0=jnp.array([2.1, 3.1]), y1=jnp.array([2.2, 2.9])
        )
        cubic = lib.ThirdOrderHermitePolynomialInterpolation(
            t0=t0, t1=t1, y0=2.1, y1=2.2, k0=0.1, k1=0.3
        )
        return (
            linear.evaluate(t),
            linear.evaluate(t, t + 0.5),
            linear.derivative(t),
            jax.jvp(linear.evaluate, (t,), (jnp.ones_like(t),))[1],
            cubic.evaluate(t),
            cubic.derivative(t),
        )

    t0 = jnp.asarray(2.0)
    for t in (t0, t0 + 0.3):
        expected = outputs(diffrax, t0, t0, t)
        actual = outputs(diffeqx, t0, t0, t)
        # The increment over [t, t + 0.5]: Diffrax divides 0.5 by the step's length
        # (infinite values); diffeqx gives the change of its constant value, zero
        # (docs/migration.md).
        assert np.all(np.isinf(np.asarray(expected[1])))
        np.testing.assert_array_equal(np.asarray(actual[1]), 0.0)
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            if i != 1:
                np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(actual[2]), 0.0)
    for lib in LIBS:
        grads = jax.grad(
            lambda t0, t1, lib=lib: jnp.sum(outputs(lib, t0, t1, t0)[2]),
            argnums=(0, 1),
        )(t0, t0)
        np.testing.assert_array_equal(np.asarray(grads), 0.0)


@pytest.mark.parametrize("kind", ["linear", "cubic"])
def test_eager_queries_at_python_number_times_as_in_diffrax(kind):
    # Outside `jax.jit`, one query at a time at Python-number times: compiled once
    # and cached here (times traced), compiled per time value in Diffrax.
    def run(lib):
        ts, ys, _ = _data(jnp.float64, missing=False)
        if kind == "linear":
            path = lib.LinearInterpolation(ts, ys)
        else:
            path = lib.CubicInterpolation(ts, lib.backward_hermite_coefficients(ts, ys))
        times = [float(ts[0]), 0.37, 1.2, float(ts[-1])]
        return {
            "value": jnp.stack([path.evaluate(t) for t in times]),
            "value_right": jnp.stack([path.evaluate(t, left=False) for t in times]),
            "increment": path.evaluate(0.37, 1.2),
            "derivative": jnp.stack([path.derivative(t) for t in times]),
        }

    _assert_same(run(diffeqx), run(diffrax), jnp.float64)
