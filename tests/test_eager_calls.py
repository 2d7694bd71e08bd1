"""Calls outside `jax.jit`: a solve is compiled once and reused by later calls that
differ only in array values, under eager `jax.vmap` and `jax.grad` too, and gives
what the same solve gives under `jax.jit`."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from _compilations import compilations


def _count(fn, *args):
    return compilations(fn, *args)[0]


def _decay(t, y, args):
    return -args * y


def _solve(y0, rate=0.5, t1=1.0, **kwargs):
    kwargs.setdefault("stepsize_controller", dfx.PIDController(rtol=1e-6, atol=1e-8))
    return dfx.diffeqsolve(
        dfx.ODETerm(_decay), dfx.Tsit5(), 0.0, t1, 0.1, y0, args=rate, **kwargs
    )


def _loss(rate, y0):
    return jnp.sum(_solve(y0, rate).ys)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda y0: _solve(y0).ys, id="solve"),
        pytest.param(
            lambda y0: _solve(y0, saveat=dfx.SaveAt(ts=jnp.linspace(0, 1, 5))).ys,
            id="SaveAt(ts)",
        ),
        pytest.param(
            lambda y0: (
                dfx.diffeqsolve(
                    dfx.ODETerm(_decay), dfx.Euler(), 0.0, 1.0, 0.01, y0, args=0.5
                ).ys
            ),
            id="constant steps",
        ),
        pytest.param(
            lambda y0: jax.vmap(lambda y: _solve(y).ys)(jnp.stack([y0, 2 * y0])),
            id="vmap",
        ),
        pytest.param(
            lambda y0: jax.grad(_loss, argnums=(0, 1))(jnp.asarray(0.5), y0),
            id="grad",
        ),
        pytest.param(
            lambda y0: jax.grad(
                lambda y: jnp.sum(_solve(y, adjoint=dfx.BacksolveAdjoint()).ys)
            )(y0),
            id="BacksolveAdjoint",
        ),
    ],
)
def test_a_repeated_eager_call_compiles_nothing(call):
    y0 = jnp.array([1.0, 2.0])
    assert _count(call, y0) > 0
    # New values, same shapes: the compiled solve is reused.
    assert _count(call, 3 * y0) == 0


def test_eager_call_compiles_again_only_for_what_is_static():
    y0 = jnp.array([1.0, 2.0])
    _solve(y0, t1=1.0)
    # An adaptive solve reads only the direction of its times at trace time.
    assert _count(lambda: _solve(y0, t1=2.0).ys) == 0
    assert _count(lambda: _solve(y0, rate=jnp.asarray(0.7)).ys) > 0
    assert _count(lambda: _solve(y0, rate=jnp.asarray(0.9)).ys) == 0
    # A Python number in `args` is static, as under `equinox.filter_jit`.
    assert _count(lambda: _solve(y0, rate=0.9).ys) > 0


def _below_half(state, **kwargs):
    return state.y[0] < 0.5


def test_deprecated_discrete_event_compiles_and_warns_once_per_program():
    # The deprecated `discrete_terminating_event=` becomes an `Event` whose condition
    # compares equal for the same function: a repeated call reuses the program, and
    # the warning is made when the solve is traced, as in Diffrax (before, each call
    # made a new condition, compiled again and warned again).
    def solve(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            0.0,
            5.0,
            0.1,
            y0,
            args=1.0,
            discrete_terminating_event=_below_half,
        )

    with pytest.warns(UserWarning, match="deprecated"):
        assert _count(solve, jnp.array([1.0, 2.0])) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count, sol = compilations(solve, jnp.array([0.9, 2.0]))
    assert count == 0
    # The event stops the solve after the first step whose end has y < 0.5.
    t_end = float(sol.ts[-1])
    assert 0.9 * np.exp(-t_end) < 0.5 < 0.9 * np.exp(-(t_end - 0.1))


@pytest.mark.parametrize("t1", [1.0, 2.0])
def test_eager_constant_steps_follow_the_times_given(t1):
    # Constant steps with times known at the call run as a scan whose length comes
    # from the times: each value is its own program.
    for times in ((0.0, t1, 0.1), tuple(jnp.asarray(x) for x in (0.0, t1, 0.1))):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay), dfx.Euler(), *times, jnp.ones(2), args=1.0
        )
        assert int(sol.stats["num_steps"]) == round(t1 / 0.1)
        assert float(sol.ts[-1]) == t1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_eager_call_equals_the_jitted_call(dtype):
    y0 = jnp.array([1.0, 2.0], dtype)
    times = tuple(jnp.asarray(x, dtype) for x in (0.0, 1.0, 0.1))

    def solve(t0, t1, dt0, y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y * jnp.cos(t)),
            dfx.Tsit5(),
            t0,
            t1,
            dt0,
            y0,
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 7, dtype=dtype), steps=True),
            stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-7),
        )
        return sol.ts, sol.ys, sol.stats

    eager = solve(*times, y0)
    jitted = jax.jit(solve)(*times, y0)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype


def test_eager_times_keep_their_dtypes_and_direction():
    # float32 and float64 times with equal values are different programs; so are
    # forwards and backwards solves.
    for dtype in (jnp.float32, jnp.float64):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            jnp.asarray(0.0, dtype),
            jnp.asarray(1.0, dtype),
            jnp.asarray(0.1, dtype),
            jnp.ones(2, dtype),
            args=jnp.asarray(1.0, dtype),
        )
        assert sol.ts.dtype == dtype and sol.ys.dtype == dtype
    backwards = dfx.diffeqsolve(
        dfx.ODETerm(_decay),
        dfx.Tsit5(),
        1.0,
        0.0,
        -0.1,
        jnp.ones(2),
        args=1.0,
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
    )
    np.testing.assert_allclose(backwards.ys[-1], np.exp(1.0) * np.ones(2), rtol=1e-6)


@dataclasses.dataclass
class _Rates:
    """Not hashable (a dataclass with `eq=True` and no `frozen=True`)."""

    rate: float


@pytest.mark.parametrize("constant_steps", [False, True])
def test_eager_call_with_unhashable_static_arguments_runs_op_by_op(constant_steps):
    rates = _Rates(0.5)
    with pytest.raises(TypeError):
        hash(rates)
    if constant_steps:
        solver, dt0, controller = dfx.Heun(), 1e-3, dfx.ConstantStepSize()
    else:
        solver, dt0 = dfx.Tsit5(), 0.1
        controller = dfx.PIDController(rtol=1e-8, atol=1e-10)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -args.rate * y),
        solver,
        0.0,
        1.0,
        dt0,
        jnp.ones(2),
        args=rates,
        stepsize_controller=controller,
    )
    np.testing.assert_allclose(sol.ys[-1], np.exp(-0.5) * np.ones(2), rtol=1e-6)


def test_eager_gradient_matches_finite_differences():
    y0 = jnp.array([1.0, 2.0])
    rate = jnp.asarray(0.5)
    grad_rate, grad_y0 = jax.grad(_loss, argnums=(0, 1))(rate, y0)
    eps = 1e-6
    fd = (_loss(rate + eps, y0) - _loss(rate - eps, y0)) / (2 * eps)
    np.testing.assert_allclose(grad_rate, fd, rtol=1e-5)
    np.testing.assert_allclose(grad_y0, np.exp(-0.5) * np.ones(2), rtol=1e-6)


def test_eager_dense_evaluation_compiles_once_for_any_time():
    sol = _solve(jnp.array([1.0, 2.0]), saveat=dfx.SaveAt(dense=True))
    sol.evaluate(0.25)
    sol.derivative(0.25)
    for t in (0.5, jnp.asarray(0.75)):
        assert _count(sol.evaluate, t) == 0
        assert _count(sol.derivative, t) == 0
    np.testing.assert_allclose(
        sol.evaluate(0.5), np.exp(-0.25) * np.array([1.0, 2.0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        sol.derivative(0.5), -0.5 * np.exp(-0.25) * np.array([1.0, 2.0]), rtol=1e-5
    )
    increment = sol.evaluate(0.25, 0.5)
    np.testing.assert_allclose(increment, sol.evaluate(0.5) - sol.evaluate(0.25))


def test_call_compiled_keys_static_leaves_by_type_and_value():
    from diffeqx._eager import call_compiled

    def scaled(factor, x):
        # `factor` is static: a Python value when traced.
        return x * float(factor), factor

    x = jnp.arange(3.0)
    # One program per static value and type; a new array value reuses it.
    assert compilations(call_compiled, scaled, (2, x))[0] == 1
    assert compilations(call_compiled, scaled, (2, x + 1))[0] == 0
    assert compilations(call_compiled, scaled, (2.0, x))[0] == 1
    assert compilations(call_compiled, scaled, (True, x))[0] == 1
    out, factor = call_compiled(scaled, (2.0, x))
    np.testing.assert_array_equal(out, 2.0 * np.arange(3.0))
    # The output's non-array leaves come back as the trace made them.
    assert factor == 2.0 and type(factor) is float


def test_call_compiled_traces_numbers_given_as_values():
    from diffeqx._eager import call_compiled

    def shift(x, t):
        return x + t

    x = jnp.arange(3.0)
    assert compilations(call_compiled, shift, (x,), (0.5,))[0] == 1
    assert compilations(call_compiled, shift, (x,), (0.25,))[0] == 0
    np.testing.assert_array_equal(
        call_compiled(shift, (x,), (0.25,)), np.arange(3.0) + 0.25
    )
    # A Python number is weakly typed, as `jnp.asarray` makes it.
    out = call_compiled(shift, (jnp.arange(3, dtype=jnp.float32),), (0.5,))
    assert out.dtype == jnp.float32


def test_call_compiled_declines_unhashable_static_leaves():
    from diffeqx._eager import call_compiled

    assert call_compiled(lambda s, x: x, ({1, 2}, jnp.ones(2))) is None


def test_eager_failure_is_an_equinox_runtime_error_with_the_message_only(caplog):
    """An eager call waits for its result; a failure with `throw=True` raises
    `equinox.EquinoxRuntimeError` with the solve's message (not JAX's error wrapping
    a callback traceback), and logs nothing. Under `jax.jit` the error is JAX's, as
    for any jitted program, and carries the same message."""
    import logging

    import equinox as eqx

    def solve(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y), dfx.Tsit5(), 0.0, 10.0, 0.01, y0,
            max_steps=5,
        ).ys  # fmt: skip

    message = (
        "The maximum number of solver steps was reached. Try increasing `max_steps`"
    )
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(eqx.EquinoxRuntimeError) as info:
            solve(jnp.ones(2))
    assert str(info.value).startswith(message)
    assert "Traceback" not in str(info.value)
    assert not [r for r in caplog.records if r.name == "jax._src.callback"]
    with pytest.raises(jax.errors.JaxRuntimeError, match="maximum number of solver"):
        jax.block_until_ready(jax.jit(solve)(jnp.ones(2)))
    # Other errors pass through unchanged, and a successful call still returns.
    np.testing.assert_allclose(
        dfx.diffeqsolve(dfx.ODETerm(lambda t, y, args: -y), dfx.Tsit5(), 0.0, 1.0,
                        0.1, jnp.ones(2)).ys,
        np.exp(-1.0) * np.ones((1, 2)), rtol=1e-4,
    )  # fmt: skip


def _paths():
    ts = jnp.linspace(0.0, 2.0, 9)
    ys = jnp.stack([jnp.sin(ts), jnp.cos(3 * ts)], axis=-1)
    key = jax.random.key(5)
    return {
        "LinearInterpolation": dfx.LinearInterpolation(ts, ys),
        "CubicInterpolation": dfx.CubicInterpolation(
            ts, dfx.backward_hermite_coefficients(ts, ys)
        ),
        "VirtualBrownianTree": dfx.VirtualBrownianTree(
            0.0, 2.0, 1e-3, (2,), key, levy_area=dfx.SpaceTimeLevyArea
        ),
        "UnsafeBrownianPath": dfx.UnsafeBrownianPath((2,), key),
    }


# The method each path's queries run their arithmetic in (counted below).
_QUERY_BODIES = {
    "LinearInterpolation": "_interpret_t",
    "CubicInterpolation": "_interpret_t",
    "VirtualBrownianTree": "_evaluate",
    "UnsafeBrownianPath": "_evaluate",
}


@pytest.mark.parametrize("name", list(_paths()))
def test_eager_path_queries_run_compiled_once_and_equal_jitted_ones(name, monkeypatch):
    # Op by op, a query ran dozens of small programs per call (a tree's `evaluate`
    # 40 ms, an interpolation's 5 ms, on CPU). Compiled and cached, a later call at
    # new times compiles nothing and does not run the query's Python code again.
    path = _paths()[name]
    body = _QUERY_BODIES[name]
    original = getattr(type(path), body)
    runs = []

    def counted(self, *args, **kwargs):
        runs.append(None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(path), body, counted)
    queries = [lambda a, b: path.evaluate(a, b)]
    if name.endswith("Interpolation"):
        queries += [lambda a, b: path.evaluate(a), lambda a, b: path.derivative(a)]
    if name == "VirtualBrownianTree":
        queries += [lambda a, b: path.evaluate(a, b, use_levy=True).H]
    for query in queries:
        query(0.25, 0.5)
        for a, b in ((0.3, 1.7), (jnp.asarray(1.1), jnp.asarray(0.6))):
            runs.clear()
            count, eager = compilations(query, a, b)
            assert count == 0
            assert not runs
            jitted = jax.jit(query)(jnp.asarray(a), jnp.asarray(b))
            np.testing.assert_allclose(eager, jitted, rtol=1e-13, atol=1e-15)


def test_eager_tree_query_outside_its_interval_still_raises():
    tree = _paths()["VirtualBrownianTree"]
    with pytest.raises(ValueError, match="outside the tree's interval"):
        tree.evaluate(0.5, 2.5)
    with pytest.raises(ValueError, match="outside the tree's interval"):
        tree.evaluate(jnp.asarray(-0.1))


def test_eager_path_query_under_eager_vmap_and_grad():
    path = _paths()["CubicInterpolation"]
    times = jnp.linspace(0.1, 1.9, 5)
    batched = jax.vmap(path.evaluate)(times)
    expected = jnp.stack([jax.jit(lambda s: path.evaluate(s))(t) for t in times])
    np.testing.assert_allclose(batched, expected, rtol=1e-13)
    slope = jax.grad(lambda t: path.evaluate(t)[0])(jnp.asarray(0.7))
    np.testing.assert_allclose(slope, path.derivative(0.7)[0], rtol=1e-10)


def test_eager_constant_steps_with_numbers_equal_the_jitted_call_with_literals():
    # Python-number times of a constant-step solve are compiled in as constants (the
    # program is per value anyway), as under `jax.jit` with the numbers written in:
    # the same step times, e.g. exact integers for an integer grid.
    def solve(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -0.01 * y),
            dfx.Euler(),
            0,
            100,
            1,
            y0,
            saveat=dfx.SaveAt(steps=True),
        )
        return sol.ts, sol.ys

    y0 = jnp.ones(2, jnp.float32)
    eager, jitted = solve(y0), jax.jit(solve)(y0)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(eager[0])[:100], np.arange(1, 101))
