"""Global interpolations and their helpers: `LinearInterpolation`, `CubicInterpolation`,
`backward_hermite_coefficients`, `natural_cubic_spline_coefficients`,
`linear_interpolation`, `rectilinear_interpolation`; and the local interpolants' shared
conventions.

Truth: closed forms (linear data, polynomials), convergence orders on smooth functions,
central finite differences in float64, the path built from the observed rows alone
(for missing data), and Python loops (for vmap).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

# Irregular knots on [0, 2], and data on a straight line in three channels.
TS = jnp.array([0.0, 0.15, 0.4, 0.55, 0.9, 1.3, 1.45, 2.0])
INTERCEPT = jnp.array([0.5, -1.0, 2.0])
SLOPE = jnp.array([1.5, 0.25, -3.0])
LINEAR_YS = INTERCEPT[None, :] + TS[:, None] * SLOPE[None, :]
# Inside, on and outside [t0, t1].
PROBE_TS = [-0.3, 0.0, 0.07, 0.4, 0.77, 1.0, 1.45, 1.99, 2.0, 2.6]


def _hermite(ts, ys):
    return dfx.CubicInterpolation(ts, dfx.backward_hermite_coefficients(ts, ys))


def _natural(ts, ys):
    return dfx.CubicInterpolation(ts, dfx.natural_cubic_spline_coefficients(ts, ys))


def _linear(ts, ys):
    return dfx.LinearInterpolation(ts, ys)


BUILDERS = [
    pytest.param(_linear, id="linear"),
    pytest.param(_hermite, id="backward-hermite"),
    pytest.param(_natural, id="natural-spline"),
]


def _fd_derivative(fn, t, h=1e-6):
    return (np.asarray(fn(t + h)) - np.asarray(fn(t - h))) / (2 * h)


# ---------------------------------------------------------------------------------------
# Exactness and convergence
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_linear_data_is_reproduced_exactly_everywhere(build):
    path = build(TS, LINEAR_YS)
    for t in PROBE_TS:  # including extrapolation on both sides
        np.testing.assert_allclose(
            path.evaluate(t), INTERCEPT + t * SLOPE, rtol=0, atol=1e-13
        )
        np.testing.assert_allclose(path.derivative(t), SLOPE, rtol=0, atol=1e-12)


@pytest.mark.parametrize("build", BUILDERS)
def test_evaluate_with_two_times_is_the_increment(build):
    ys = jnp.stack([jnp.sin(3 * TS), TS**2], axis=-1)
    path = build(TS, ys)
    for t0, t1 in [(0.1, 0.5), (0.4, 1.45), (1.7, 0.2)]:
        expected = path.evaluate(t1) - path.evaluate(t0)
        np.testing.assert_allclose(path.evaluate(t0, t1), expected, atol=1e-14)


@pytest.mark.parametrize("build", BUILDERS)
def test_path_passes_through_the_data_at_the_knots(build):
    ys = jnp.stack([jnp.sin(3 * TS), TS**2], axis=-1)
    path = build(TS, ys)
    for i, t in enumerate(TS):
        for left in (True, False):
            np.testing.assert_allclose(path.evaluate(t, left=left), ys[i], atol=1e-13)
    assert path.t0 == TS[0] and path.t1 == TS[-1]


def _max_error(build, num_knots, derivative=False):
    ts = jnp.linspace(0.0, 1.0, num_knots)
    f = lambda t: jnp.sin(jnp.pi * t)  # f'' = 0 at both ends: natural splines fit
    df = lambda t: jnp.pi * jnp.cos(jnp.pi * t)
    probes = jnp.linspace(0.0, 1.0, 997)[1:-1]

    @jax.jit
    def error(ts):
        path = build(ts, f(ts)[:, None])
        if derivative:
            values = jax.vmap(lambda t: path.derivative(t)[0])(probes)
            return jnp.max(jnp.abs(values - df(probes)))
        values = jax.vmap(lambda t: path.evaluate(t)[0])(probes)
        return jnp.max(jnp.abs(values - f(probes)))

    return float(error(ts))


def _exact_hermite(ts, ys):
    # Hermite cubics with the true slopes: the best a cubic Hermite path can do.
    slopes = jnp.pi * jnp.cos(jnp.pi * ts)[:, None]
    h = jnp.diff(ts)[:, None]
    secant = jnp.diff(ys, axis=0) / h
    m0, m1 = slopes[:-1], slopes[1:]
    b = (3 * secant - 2 * m0 - m1) / h
    a = (m0 + m1 - 2 * secant) / h**2
    return dfx.CubicInterpolation(ts, (a, b, m0, ys[:-1]))


@pytest.mark.parametrize(
    "build, order, derivative",
    [
        pytest.param(_linear, 2, False, id="linear"),
        pytest.param(_linear, 1, True, id="linear-derivative"),
        pytest.param(_hermite, 2, False, id="backward-hermite"),
        pytest.param(_hermite, 1, True, id="backward-hermite-derivative"),
        # The same cubic evaluation as the natural spline's (order 4): `slow`.
        pytest.param(
            _exact_hermite, 4, False, id="exact-slope-hermite", marks=pytest.mark.slow
        ),
        pytest.param(_natural, 4, False, id="natural-spline"),
        pytest.param(_natural, 3, True, id="natural-spline-derivative"),
    ],
)
def test_interpolation_converges_at_its_order(build, order, derivative):
    knots = [65, 129]
    errors = [_max_error(build, n, derivative) for n in knots]
    slopes = -np.diff(np.log(errors)) / np.diff(np.log([n - 1 for n in knots]))
    assert abs(slopes[-1] - order) < 0.2, (errors, slopes)


@pytest.mark.parametrize("build", BUILDERS)
def test_derivative_matches_finite_differences_and_autodiff(build):
    ys = jnp.stack([jnp.sin(3 * TS), jnp.exp(TS)], axis=-1)
    path = build(TS, ys)
    for t in [0.07, 0.5, 1.1, 1.8]:  # away from knots
        expected = _fd_derivative(path.evaluate, t)
        np.testing.assert_allclose(path.derivative(t), expected, rtol=1e-7, atol=1e-8)
        autodiff = jax.jacfwd(path.evaluate)(jnp.asarray(t))
        np.testing.assert_allclose(autodiff, path.derivative(t), rtol=1e-12)


def test_linear_derivative_at_a_knot_takes_the_left_or_right_limit():
    ys = jnp.array([[0.0], [1.0], [3.0], [3.0]])
    ts = jnp.array([0.0, 1.0, 2.0, 4.0])
    path = dfx.LinearInterpolation(ts, ys)
    np.testing.assert_array_equal(path.derivative(1.0), [1.0])
    np.testing.assert_array_equal(path.derivative(1.0, left=True), [1.0])
    np.testing.assert_array_equal(path.derivative(1.0, left=False), [2.0])
    np.testing.assert_array_equal(path.derivative(2.0, left=False), [0.0])
    # The ends: only one side exists, both limits use it.
    np.testing.assert_array_equal(path.derivative(0.0, left=True), [1.0])
    np.testing.assert_array_equal(path.derivative(4.0, left=False), [0.0])


@pytest.mark.parametrize("build", [_hermite, _natural], ids=["hermite", "natural"])
def test_cubic_paths_are_continuously_differentiable_at_knots(build):
    ys = jnp.stack([jnp.sin(3 * TS), jnp.exp(TS)], axis=-1)
    path = build(TS, ys)
    for t in TS[1:-1]:
        np.testing.assert_allclose(
            path.derivative(t, left=True), path.derivative(t, left=False), rtol=1e-12
        )


def test_backward_hermite_matches_its_definition():
    # On [t_i, t_i+1]: values y_i, y_i+1; slopes: the backward difference into t_i
    # (the forward difference at t_0) and the one into t_i+1.
    ts = jnp.array([0.0, 1.0, 3.0, 4.0])
    ys = jnp.array([1.0, 2.0, 0.0, 4.0])
    path = _hermite(ts, ys)
    secants = jnp.diff(ys) / jnp.diff(ts)  # [1, -1, 4]
    slopes_left = [secants[0], secants[0], secants[1]]
    for i in range(3):
        np.testing.assert_allclose(path.derivative(ts[i], left=False), slopes_left[i])
        np.testing.assert_allclose(path.derivative(ts[i + 1], left=True), secants[i])
    deriv0 = _hermite_with(ts, ys, deriv0=-2.0)
    np.testing.assert_allclose(deriv0.derivative(0.0), -2.0)


def _hermite_with(ts, ys, **kwargs):
    return dfx.CubicInterpolation(
        ts, dfx.backward_hermite_coefficients(ts, ys, **kwargs)
    )


def test_cubic_interpolation_coefficients_are_powers_of_the_offset_from_the_knot():
    ts = jnp.array([0.0, 2.0, 3.0])
    a, b, c, d = (jnp.array([[k], [k + 1.0]]) for k in (1.0, 2.0, 3.0, 4.0))
    path = dfx.CubicInterpolation(ts, (a, b, c, d))
    s = 0.5  # t = 2.5: second interval, offset 0.5
    expected = 2.0 * s**3 + 3.0 * s**2 + 4.0 * s + 5.0
    np.testing.assert_allclose(path.evaluate(2.5), [expected])
    np.testing.assert_allclose(path.derivative(2.5), [6.0 * s**2 + 6.0 * s + 4.0])


# ---------------------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------------------

NAN = jnp.nan


def test_linear_interpolation_fills_interior_gaps_on_the_line():
    ys = LINEAR_YS.at[1, 0].set(NAN).at[2, 0].set(NAN).at[5, 2].set(NAN)
    filled = dfx.linear_interpolation(TS, ys)
    np.testing.assert_allclose(filled, LINEAR_YS, atol=1e-14)


def test_linear_interpolation_leaves_or_fills_the_ends_as_asked():
    ts = jnp.arange(6.0)
    ys = jnp.array([NAN, NAN, 2.0, NAN, 4.0, NAN])
    np.testing.assert_array_equal(
        dfx.linear_interpolation(ts, ys), [NAN, NAN, 2.0, 3.0, 4.0, NAN]
    )
    np.testing.assert_array_equal(
        dfx.linear_interpolation(
            ts, ys, replace_nans_at_start=0.0, fill_forward_nans_at_end=True
        ),
        [0.0, 1.0, 2.0, 3.0, 4.0, 4.0],
    )


def test_rectilinear_interpolation_doubles_the_series_and_fills_forward():
    ts = jnp.array([0.0, 1.0, 1.5, 2.0])
    ys = jnp.array([[NAN, 1.0], [5.0, NAN], [NAN, 3.0], [6.0, NAN]])
    new_ts, new_ys = dfx.rectilinear_interpolation(ts, ys)
    np.testing.assert_array_equal(new_ts, [0.0, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0])
    expected = [
        [NAN, 1.0],
        [NAN, 1.0],
        [5.0, 1.0],
        [5.0, 1.0],
        [5.0, 3.0],
        [5.0, 3.0],
        [6.0, 3.0],
    ]
    np.testing.assert_array_equal(new_ys, expected)
    _, replaced = dfx.rectilinear_interpolation(ts, ys, replace_nans_at_start=-1.0)
    np.testing.assert_array_equal(replaced[:2, 0], [-1.0, -1.0])


def _reference_backward_hermite(ts, ys, t):
    """The backward Hermite path of the observations `(ts, ys)` at `t`, from its
    definition, in NumPy: on [ts[j], ts[j + 1]], the cubic with values ys[j], ys[j + 1]
    and slopes: the secant into ts[j] (the first secant at ts[0]) and the one into
    ts[j + 1]."""
    secants = np.diff(ys) / np.diff(ts)
    j = int(np.clip(np.searchsorted(ts, t) - 1, 0, len(ts) - 2))
    h, u = ts[j + 1] - ts[j], (t - ts[j]) / (ts[j + 1] - ts[j])
    m0, m1 = secants[max(j - 1, 0)], secants[j]
    h00, h10 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u
    h01, h11 = -2 * u**3 + 3 * u**2, u**3 - u**2
    return h00 * ys[j] + h10 * h * m0 + h01 * ys[j + 1] + h11 * h * m1


def test_backward_hermite_with_missing_values_is_the_path_of_the_observations():
    # Each channel has its own gaps; its path must be the one built from its own
    # observed rows alone.
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0.0, 5.0, 40))
    ys = np.stack([np.sin(ts), np.cos(2 * ts), ts**2], axis=-1)
    missing = rng.uniform(size=ys.shape) < 0.35
    missing[0] = False  # every channel observed at both ends
    missing[-1] = False
    ys_missing = np.where(missing, np.nan, ys)
    probes = np.linspace(ts[0], ts[-1], 301)

    @jax.jit
    def values(ts, ys):
        return jax.vmap(_hermite(ts, ys).evaluate)(probes)

    actual = values(jnp.asarray(ts), jnp.asarray(ys_missing))
    for channel in range(3):
        keep = ~missing[:, channel]
        expected = [
            _reference_backward_hermite(ts[keep], ys[keep, channel], t) for t in probes
        ]
        np.testing.assert_allclose(actual[:, channel], expected, rtol=1e-11, atol=1e-11)


def test_backward_hermite_nans_at_the_ends_stay_or_are_filled():
    ts = jnp.arange(5.0)
    ys = jnp.array([NAN, 1.0, 2.0, 4.0, NAN])
    a, _, _, d = dfx.backward_hermite_coefficients(ts, ys)
    assert bool(jnp.isnan(a[0])) and bool(jnp.isnan(a[-1]))
    assert not bool(jnp.any(jnp.isnan(a[1:-1])))
    path = _hermite_with(
        ts, ys, replace_nans_at_start=0.0, fill_forward_nans_at_end=True
    )
    values = jax.vmap(path.evaluate)(ts)
    np.testing.assert_allclose(values, [0.0, 1.0, 2.0, 4.0, 4.0], atol=1e-14)


def test_pytree_data_is_interpolated_leaf_by_leaf():
    ys = {"a": LINEAR_YS, "b": (jnp.cos(TS)[:, None, None] * jnp.ones((1, 2, 2)),)}
    ys_missing = {"a": ys["a"].at[2, 1].set(NAN), "b": ys["b"]}
    filled = dfx.linear_interpolation(TS, ys_missing)
    np.testing.assert_allclose(filled["a"], ys["a"], atol=1e-14)
    for build in (_linear, _hermite, _natural):
        path = build(TS, ys)
        value = path.evaluate(0.7)
        np.testing.assert_allclose(value["a"], build(TS, ys["a"]).evaluate(0.7))
        np.testing.assert_allclose(value["b"][0], build(TS, ys["b"][0]).evaluate(0.7))
        assert value["b"][0].shape == (2, 2)


def test_gradient_wrt_data_with_missing_values_is_finite_and_matches_fd():
    ts = jnp.arange(6.0)
    ys = jnp.array([0.5, NAN, 2.0, NAN, NAN, 1.0])

    @jax.jit
    def loss(observed):
        data = ys.at[jnp.array([0, 2, 5])].set(observed)
        path = _hermite(ts, data)
        return path.evaluate(3.3) ** 2 + path.derivative(1.4)

    observed = jnp.array([0.5, 2.0, 1.0])
    grad = jax.grad(loss)(observed)
    assert bool(jnp.all(jnp.isfinite(grad)))
    fd = [
        (loss(observed.at[i].add(1e-6)) - loss(observed.at[i].add(-1e-6))) / 2e-6
        for i in range(3)
    ]
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    full_grad = jax.grad(lambda y: _hermite(ts, y).evaluate(3.3))(ys)
    assert bool(jnp.all(jnp.isfinite(full_grad)))
    np.testing.assert_array_equal(full_grad[jnp.isnan(ys)], 0.0)


# ---------------------------------------------------------------------------------------
# Batching, jit, vmap, grad
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    # Paths under vmap by default: the backward Hermite path (a neural CDE's).
    "build",
    [
        pytest.param(_linear, id="linear", marks=pytest.mark.slow),
        pytest.param(_hermite, id="backward-hermite"),
        pytest.param(_natural, id="natural-spline", marks=pytest.mark.slow),
    ],
)
def test_batch_of_64_series_under_vmap_gives_per_series_derivatives(build):
    key_ts, key_ys = jax.random.split(jax.random.key(0))
    ts = jnp.sort(jax.random.uniform(key_ts, (400,)) * 10.0)
    ys = jax.random.normal(key_ys, (64, 400, 3))

    @jax.jit
    def batched(ts, ys):
        paths = jax.vmap(build, in_axes=(None, 0))(ts, ys)
        derivatives = jax.vmap(lambda path: path.derivative(4.2))(paths)
        values = jax.vmap(lambda path: path.evaluate(4.2))(paths)
        increments = jax.vmap(lambda path: path.evaluate(1.0, 4.2))(paths)
        return derivatives, values, increments

    derivatives, values, increments = batched(ts, ys)
    assert derivatives.shape == values.shape == increments.shape == (64, 3)
    single = jax.jit(
        lambda y: (build(ts, y).derivative(4.2), build(ts, y).evaluate(4.2))
    )
    for i in (0, 17, 63):
        derivative, value = single(ys[i])
        np.testing.assert_allclose(derivatives[i], derivative, rtol=1e-12)
        np.testing.assert_allclose(values[i], value, rtol=1e-12)
    # Many times for one series, also by vmap.
    many = jax.vmap(build(ts, ys[0]).derivative)(jnp.linspace(0.0, 10.0, 7))
    assert many.shape == (7, 3)


def test_paths_and_helpers_agree_under_jit():
    ys = jnp.stack([jnp.sin(3 * TS), TS**2], axis=-1).at[3, 1].set(NAN)

    def everything(ts, ys):
        filled = dfx.linear_interpolation(ts, ys)
        rect_ts, rect_ys = dfx.rectilinear_interpolation(ts, ys)
        coeffs = dfx.backward_hermite_coefficients(ts, ys)
        natural = dfx.natural_cubic_spline_coefficients(ts, filled)
        return (
            filled,
            rect_ts,
            rect_ys,
            coeffs,
            natural,
            dfx.LinearInterpolation(ts, filled).evaluate(0.3, 1.7),
            dfx.CubicInterpolation(ts, coeffs).derivative(0.6),
            dfx.CubicInterpolation(ts, natural).evaluate(1.9),
        )

    eager = everything(TS, ys)
    jitted = jax.jit(everything)(TS, ys)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda ts, ys: dfx.linear_interpolation(ts, ys), id="linear_fill"),
        pytest.param(
            lambda ts, ys: dfx.rectilinear_interpolation(ts, ys)[1], id="rect"
        ),
        pytest.param(dfx.backward_hermite_coefficients, id="hermite"),
        pytest.param(dfx.natural_cubic_spline_coefficients, id="natural"),
    ],
)
def test_helpers_under_vmap_match_a_loop(fn):
    ys = jax.random.normal(jax.random.key(1), (5, len(TS), 2))
    ys = (
        ys.at[1, 3, 0].set(NAN)
        if fn is not dfx.natural_cubic_spline_coefficients
        else ys
    )
    batched = jax.vmap(fn, in_axes=(None, 0))(TS, ys)
    for i in range(5):
        for a, b in zip(
            jax.tree.leaves(fn(TS, ys[i])),
            jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], batched)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-13)


def _fd_grad(fn, x, h=1e-6):
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (
            float(fn(jnp.asarray(x + step))) - float(fn(jnp.asarray(x - step)))
        ) / (2 * h)
    return grad


@pytest.mark.parametrize(
    # The backward Hermite path's gradients by default in
    # test_gradient_wrt_data_with_missing_values_is_finite_and_matches_fd.
    "build",
    [
        pytest.param(_linear, id="linear"),
        pytest.param(_hermite, id="backward-hermite", marks=pytest.mark.slow),
        pytest.param(_natural, id="natural-spline"),
    ],
)
def test_gradients_wrt_data_times_and_time_match_finite_differences(build):
    ys = jnp.stack([jnp.sin(3 * TS), jnp.exp(TS)], axis=-1)
    weights = jnp.array([1.0, -0.5])

    @jax.jit
    def loss(ts, ys, t):
        path = build(ts, ys)
        return weights @ path.evaluate(t) + weights @ path.derivative(0.8) ** 2

    t = jnp.asarray(1.1)
    grad_ts, grad_ys, grad_t = jax.grad(loss, argnums=(0, 1, 2))(TS, ys, t)
    np.testing.assert_allclose(
        grad_ys, _fd_grad(lambda y: loss(TS, y, t), ys), rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(
        grad_ts, _fd_grad(lambda s: loss(s, ys, t), TS), rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(
        grad_t, _fd_grad(lambda s: loss(TS, ys, s), t), rtol=1e-6
    )


def test_gradient_of_the_filling_helpers_matches_finite_differences():
    ys = jnp.array([[0.5, 0.2], [NAN, 1.0], [2.0, NAN], [NAN, -1.0], [1.0, NAN]])
    ts = jnp.array([0.0, 0.5, 1.5, 2.0, 3.0])
    observed = ~jnp.isnan(ys)
    values = jnp.where(observed, ys, 0.0)
    fills = [
        lambda y: dfx.linear_interpolation(ts, y, fill_forward_nans_at_end=True),
        lambda y: dfx.rectilinear_interpolation(ts, y)[1],
    ]
    for fill in fills:

        @jax.jit
        def loss(values, fill=fill):
            filled = fill(jnp.where(observed, values, NAN))
            weights = jnp.arange(1.0, 1.0 + filled.size).reshape(filled.shape)
            return jnp.sum(weights * filled)

        grad = jax.grad(loss)(values)
        np.testing.assert_allclose(grad, _fd_grad(loss, values), rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors, never silent broadcasting
# ---------------------------------------------------------------------------------------

CONSTRUCTORS = [
    pytest.param(
        lambda ts, ys: dfx.LinearInterpolation(ts, ys), id="LinearInterpolation"
    ),
    pytest.param(dfx.backward_hermite_coefficients, id="backward_hermite_coefficients"),
    pytest.param(dfx.natural_cubic_spline_coefficients, id="natural_spline"),
    pytest.param(dfx.linear_interpolation, id="linear_interpolation"),
    pytest.param(dfx.rectilinear_interpolation, id="rectilinear_interpolation"),
]


@pytest.mark.parametrize("construct", CONSTRUCTORS)
def test_batched_ys_is_refused_naming_both_shapes_and_vmap(construct):
    ts = jnp.linspace(0.0, 1.0, 400)
    ys = jnp.zeros((64, 400, 3))
    with pytest.raises(ValueError, match=r"\(64, 400, 3\)") as info:
        construct(ts, ys)
    message = str(info.value)
    assert "(400,)" in message and "jax.vmap" in message and "batch of 64" in message


@pytest.mark.parametrize("construct", CONSTRUCTORS)
def test_ys_with_the_wrong_number_of_times_is_refused(construct):
    with pytest.raises(ValueError, match=r"\(7, 3\).*\(8,\)"):
        construct(TS, jnp.zeros((7, 3)))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        construct(TS, {"a": jnp.zeros((8, 3)), "b": jnp.asarray(1.0)})


@pytest.mark.parametrize("construct", CONSTRUCTORS)
def test_two_dimensional_ts_is_refused_suggesting_vmap(construct):
    with pytest.raises(ValueError, match=r"\(64, 400\).*jax\.vmap"):
        construct(jnp.zeros((64, 400)), jnp.zeros((64, 400, 3)))


@pytest.mark.parametrize("construct", CONSTRUCTORS)
@pytest.mark.parametrize(
    "ts, match",
    [
        pytest.param([0.0, 1.0, 1.0, 2.0], "strictly increasing", id="repeated"),
        pytest.param([0.0, 2.0, 1.0, 3.0], "strictly increasing", id="decreasing"),
        pytest.param([0.0, NAN, 1.0, 3.0], "NaN", id="nan"),
    ],
)
def test_bad_times_are_refused(construct, ts, match):
    with pytest.raises(ValueError, match=match):
        construct(jnp.asarray(ts), jnp.zeros((4, 2)))


def test_bad_times_are_refused_at_run_time_under_jit():
    build = jax.jit(lambda ts, ys: dfx.LinearInterpolation(ts, ys).evaluate(0.5))
    with pytest.raises(Exception, match="strictly increasing"):
        jax.block_until_ready(build(jnp.array([0.0, 1.0, 1.0]), jnp.zeros((3, 2))))
    with pytest.raises(Exception, match="NaN"):
        jax.block_until_ready(build(jnp.array([0.0, NAN, 1.0]), jnp.zeros((3, 2))))


def test_a_single_time_is_refused():
    with pytest.raises(ValueError, match="at least two"):
        dfx.LinearInterpolation(jnp.array([0.0]), jnp.zeros((1, 2)))


def test_cubic_coefficients_of_the_wrong_form_are_refused():
    a = jnp.zeros((len(TS) - 1, 3))
    with pytest.raises(ValueError, match=r"\(a, b, c, d\)"):
        dfx.CubicInterpolation(TS, (a, a, a))
    with pytest.raises(ValueError, match=r"\(8, 3\).*\(8,\).*interval"):
        dfx.CubicInterpolation(TS, (jnp.zeros((8, 3)),) * 4)
    with pytest.raises(ValueError, match=r"\(64, 7, 3\).*batch of 64.*jax\.vmap"):
        dfx.CubicInterpolation(TS, (jnp.zeros((64, 7, 3)),) * 4)
    with pytest.raises(ValueError, match="equal shapes"):
        dfx.CubicInterpolation(TS, (a, a, a, jnp.zeros((7, 2))))


@pytest.mark.parametrize("build", BUILDERS)
def test_evaluating_a_batch_of_paths_outside_vmap_is_refused(build):
    ys = jnp.zeros((4, len(TS), 3))
    paths = jax.vmap(build, in_axes=(None, 0))(TS, ys)
    with pytest.raises(ValueError, match=r"batch of paths.*\(4, 8\).*jax\.vmap"):
        paths.derivative(0.5)
    with pytest.raises(ValueError, match=r"batch of paths"):
        paths.evaluate(0.5)


@pytest.mark.parametrize("build", BUILDERS)
def test_evaluating_at_an_array_of_times_is_refused_suggesting_vmap(build):
    path = build(TS, LINEAR_YS)
    with pytest.raises(ValueError, match=r"shape \(3,\).*jax\.vmap"):
        path.evaluate(jnp.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        path.derivative(jnp.array([0.1, 0.2, 0.3]))


def test_replace_nans_at_start_must_broadcast_against_the_channels():
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        dfx.linear_interpolation(TS, LINEAR_YS, replace_nans_at_start=jnp.zeros(2))


# ---------------------------------------------------------------------------------------
# Local interpolants share the conventions
# ---------------------------------------------------------------------------------------


def test_local_interpolants_share_the_evaluate_and_derivative_conventions():
    t0, t1 = 0.4, 1.3
    f = lambda t: jnp.stack([t**3 - t, jnp.sin(t)])
    df = jax.jacfwd(f)
    y0, y1 = f(t0), f(t1)
    dt = t1 - t0
    local_linear = dfx.LocalLinearInterpolation(t0=t0, t1=t1, y0=y0, y1=y1)
    global_linear = dfx.LinearInterpolation(jnp.array([t0, t1]), jnp.stack([y0, y1]))
    hermite = dfx.ThirdOrderHermitePolynomialInterpolation(
        t0=t0, t1=t1, y0=y0, y1=y1, k0=df(t0) * dt, k1=df(t1) * dt
    )
    for t in [0.5, 0.9, 1.2]:
        np.testing.assert_allclose(local_linear.evaluate(t), global_linear.evaluate(t))
        np.testing.assert_allclose(
            local_linear.evaluate(0.5, t), global_linear.evaluate(0.5, t), atol=1e-15
        )
        np.testing.assert_allclose(
            local_linear.derivative(t, left=False), global_linear.derivative(t)
        )
        # The Hermite cubic matches values and slopes at both ends; its increment
        # convention is value(t1) - value(t0); its derivative is d/dt of its value.
        np.testing.assert_allclose(
            hermite.evaluate(0.5, t), hermite.evaluate(t) - hermite.evaluate(0.5)
        )
        np.testing.assert_allclose(
            hermite.derivative(t), _fd_derivative(hermite.evaluate, t), rtol=1e-7
        )
    np.testing.assert_allclose(hermite.evaluate(t1), y1, rtol=1e-14)
    np.testing.assert_allclose(hermite.derivative(t0), df(t0), rtol=1e-13)
    np.testing.assert_allclose(hermite.derivative(t1), df(t1), rtol=1e-13)


def test_float32_hermite_slope_is_accurate_relative_to_the_change_over_the_step():
    # A state of size 100 that changes by about 1e-3 over the step. The slope in
    # time (`derivative`, and the gradient of `evaluate` with respect to the time,
    # which reaches a step's end times under `jax.grad`) is formed from differences
    # of the end values, so its float32 error scales with that change (measured:
    # 2.8e-7 relative), not with the state (forming it from the weighted values
    # themselves gave 8.3e-3 relative here).
    t0, t1 = 0.25, 1.25
    y0 = np.array([100.0, -37.5])
    k0, k1 = np.array([1.0e-3, 2.0e-3]), np.array([1.5e-3, 1.0e-3])
    y1 = y0 + np.array([1.2e-3, 1.6e-3])

    def slopes(dtype):
        cast = lambda x: jnp.asarray(np.asarray(x, np.float32), dtype)
        hermite = dfx.ThirdOrderHermitePolynomialInterpolation(
            t0=cast(t0), t1=cast(t1), y0=cast(y0), y1=cast(y1), k0=cast(k0), k1=cast(k1)
        )
        out = []
        for t in (0.3, 0.75, 1.2):
            out.append(hermite.derivative(cast(t)))
            out.append(jax.jacfwd(hermite.evaluate)(cast(t)))
            out.append(jax.grad(lambda s: jnp.sum(hermite.evaluate(s)))(cast(t)))
        return [np.asarray(x, np.float64) for x in out]

    for got, exact in zip(slopes(jnp.float32), slopes(jnp.float64), strict=True):
        np.testing.assert_allclose(got, exact, rtol=2e-5)


# ---------------------------------------------------------------------------------------
# Diffrax's signatures
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "LinearInterpolation",
        "CubicInterpolation",
        "backward_hermite_coefficients",
        "linear_interpolation",
        "rectilinear_interpolation",
        "ControlTerm",
        "WeaklyDiagonalControlTerm",
    ],
)
def test_signature_matches_diffrax(name):
    import inspect

    diffrax = pytest.importorskip("diffrax")

    def parameters(fn):
        return [
            (p.name, p.kind, p.default if p.default is None else type(p.default))
            for p in inspect.signature(fn).parameters.values()
        ]

    assert parameters(getattr(dfx, name)) == parameters(getattr(diffrax, name))
    if inspect.isclass(getattr(diffrax, name)):
        for method in ("evaluate", "derivative", "to_ode"):
            theirs = getattr(getattr(diffrax, name), method, None)
            if theirs is not None:
                ours = getattr(getattr(dfx, name), method)
                assert parameters(ours) == parameters(theirs), method


# Dopri8 (about 12 s, mostly compilation) in the slow run.
@pytest.mark.parametrize(
    "name, bound",
    [pytest.param("Dopri8", 1e-5, marks=pytest.mark.slow), ("Tsit5", 3e-6)],
)
def test_float32_saves_and_gradients_at_a_steps_end_keep_float32_accuracy(name, bound):
    # A requested time at a step's end (here `t1`) is interpolated at theta = 1,
    # where the continuous extension's large polynomial coefficients cancel. The
    # stages' weights are formed first (as scalars) and the stages combined after,
    # so the float32 gradient stays close to the float64 one (measured: 5e-6 and
    # 1.3e-6 relative; combining the stages first gave 4.2e-5 and 8.1e-6).
    def field(t, y, a):
        return jnp.stack(
            [a[0] * y[0] - a[1] * y[0] * y[1], a[3] * y[0] * y[1] - a[2] * y[1]]
        )

    def grads(dtype):
        args = jnp.array([1.5, 1.0, 3.0, 1.0], dtype)
        y0 = jnp.array([1.0, 0.5], dtype)

        def loss(y0, args):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(field),
                getattr(dfx, name)(),
                jnp.asarray(0.0, dtype),
                jnp.asarray(2.0, dtype),
                jnp.asarray(0.15, dtype),
                y0,
                args,
                saveat=dfx.SaveAt(ts=jnp.array([0.0, 0.6, 1.5, 2.0], dtype)),
            )
            return jnp.sum(sol.ys**2)

        g = jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args)
        return np.concatenate([np.asarray(x, np.float64) for x in g])

    exact = grads(jnp.float64)
    error = np.max(np.abs(grads(jnp.float32) - exact) / np.abs(exact))
    assert error < bound


def _slices_of(jaxpr, size):
    """The slices, in `jaxpr` and the jaxprs nested in it, of arrays of `size`
    elements into more than one element."""
    found, stack = [], [jaxpr.jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            if (
                eqn.primitive.name == "slice"
                and eqn.invars[0].aval.size == size
                and eqn.outvars[0].aval.size > 1
            ):
                found.append(eqn)
            for value in eqn.params.values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(item, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        stack.append(inner)
    return found


def test_queries_do_not_slice_the_knots():
    # A query searches the knots themselves: a slice of them (the interior knots,
    # say) is built again at every query in a loop, which made 3,000 queries of a
    # 500-knot path about 7x slower.
    ts = jnp.linspace(0.0, 1.0, 50)
    ys = jnp.sin(ts)
    paths = (
        dfx.LinearInterpolation(ts, ys),
        dfx.CubicInterpolation(ts, dfx.backward_hermite_coefficients(ts, ys)),
    )
    for path in paths:
        for query in (path.evaluate, path.derivative):
            jaxpr = jax.make_jaxpr(lambda t, query=query: query(t))(0.3)
            assert not _slices_of(jaxpr, 50), (type(path).__name__, query)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        0.0,
        1.0,
        0.1,
        jnp.ones(2),
        saveat=dfx.SaveAt(dense=True),
    )
    knots = sol.interpolation.ts.size
    assert not _slices_of(jax.make_jaxpr(sol.evaluate)(0.3), knots)


@pytest.mark.parametrize("left", [True, False])
def test_query_uses_the_interval_holding_the_time(left):
    # Times at, between and outside the knots: the slope is that of the interval
    # holding the time (at a knot, the one on its left or its right), or of the end
    # interval outside; the value is on that interval's line.
    ts = jnp.array([0.0, 1.0, 2.0, 3.0, 5.0])
    ys = jnp.array([0.0, 10.0, 40.0, 50.0, 90.0])
    slopes = [10.0, 30.0, 10.0, 20.0]
    path = dfx.LinearInterpolation(ts, ys)
    for t in (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0):
        inside = [i for i in range(4) if ts[i] <= t <= ts[i + 1]]
        if not inside:
            i = 0 if t < 0 else 3
        else:
            i = inside[0] if left else inside[-1]
        assert float(path.derivative(t, left=left)) == pytest.approx(slopes[i]), t
        value = float(ys[i] + slopes[i] * (t - ts[i]))
        assert float(path.evaluate(t, left=left)) == pytest.approx(value), t
