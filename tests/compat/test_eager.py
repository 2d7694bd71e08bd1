"""Calls outside `jax.jit`: Diffrax compiles `diffeqsolve` once (it is wrapped in
`equinox.filter_jit`) and reuses it; so does diffeqx, with the same answer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx
from _compilations import compilations

diffrax = pytest.importorskip("diffrax")


def _field(t, y, args):
    return -args * y * jnp.cos(t)


@pytest.mark.parametrize("vmap", [False, True], ids=["single", "vmap"])
def test_repeated_eager_calls_compile_nothing_in_either_library(vmap):
    def call(lib, y0):
        def solve(y):
            sol = lib.diffeqsolve(
                lib.ODETerm(_field),
                lib.Tsit5(),
                0.0,
                2.0,
                0.1,
                y,
                args=jnp.asarray(0.7),
                saveat=lib.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
                stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-8),
            )
            return sol.ts, sol.ys, sol.stats["num_steps"]

        return jax.vmap(solve)(jnp.stack([y0, 2 * y0])) if vmap else solve(y0)

    y0, other_y0 = jnp.array([1.0, 2.0]), jnp.array([3.0, 6.0])
    results = {}
    for lib in (diffrax, diffeqx):
        call(lib, y0)
        count, results[lib.__name__] = compilations(lambda lib=lib: call(lib, other_y0))
        assert count == 0, lib.__name__
    expected, actual = (jax.tree.leaves(results[n]) for n in ("diffrax", "diffeqx"))
    for a, b in zip(expected, actual, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12)


@pytest.mark.parametrize("vmap", [False, True], ids=["single", "vmap"])
def test_eager_failure_raises_equinox_runtime_error_in_both_libraries(vmap):
    """Code written for Diffrax that catches `equinox.EquinoxRuntimeError` around an
    eager call (Diffrax's `diffeqsolve` is wrapped in `equinox.filter_jit`) catches
    diffeqx's too, with the failure's message."""
    import equinox as eqx

    def call(lib):
        def solve(y0):
            return lib.diffeqsolve(
                lib.ODETerm(_field), lib.Tsit5(), 0.0, 10.0, 0.01, y0,
                args=jnp.asarray(0.7), max_steps=5,
            ).ys  # fmt: skip

        y0 = jnp.ones((3, 2)) if vmap else jnp.ones(2)
        with pytest.raises(eqx.EquinoxRuntimeError) as info:
            jax.vmap(solve)(y0) if vmap else solve(y0)
        return str(info.value)

    assert "maximum number of solver steps was reached" in call(diffrax)
    ours = call(diffeqx)
    assert ours.startswith("The maximum number of solver steps was reached")
    assert "Traceback" not in ours  # the message, not a callback's traceback


def test_a_solve_is_not_traced_again_when_the_enclosing_function_is():
    # Inside `equinox.filter_jit`, both libraries trace the solve as a nested jit:
    # when the step is traced again (a counter that turns from a Python int into
    # an array), the vector field is not traced again, and the answers agree.
    results = {}
    for lib in (diffrax, diffeqx):
        traced = []

        def field(t, y, args, traced=traced):
            traced.append(None)
            return -args * y * jnp.cos(t)

        def loss(rate, y0, lib=lib, field=field):
            sol = lib.diffeqsolve(
                lib.ODETerm(field),
                lib.Tsit5(),
                0.0,
                2.0,
                0.1,
                y0,
                args=rate,
                saveat=lib.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
                stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-10),
            )
            return jnp.sum(sol.ys**2)

        @eqx.filter_jit
        def step(rate, y0, counter, loss=loss):
            return jax.value_and_grad(loss)(rate, y0), counter + 1

        rate, y0 = jnp.asarray(0.7), jnp.array([1.0, 2.0])
        first, counter = step(rate, y0, 0)
        traces = len(traced)
        again, _ = step(rate, y0, counter)
        assert traces > 0 and len(traced) == traces, lib.__name__
        np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(first[0]))
        results[lib.__name__] = first
    np.testing.assert_allclose(results["diffeqx"], results["diffrax"], rtol=1e-12)


@pytest.mark.parametrize(
    "solver, times",
    [("Euler", (0, 100, 1)), ("Tsit5", (2.0, 5, 0.01)), ("Tsit5", (5.0, 2.0, -0.01))],
    ids=["Euler-integers", "Tsit5-forwards", "Tsit5-backwards"],
)
@pytest.mark.parametrize("as_arrays", [False, True], ids=["numbers", "arrays"])
def test_eager_constant_steps_take_diffrax_step_times_bit_for_bit(
    solver, times, as_arrays
):
    """Constant steps in an eager call: Diffrax (in `equinox.filter_jit`) compiles
    Python-number times in as constants, and XLA folds the step times computed from
    them; arrays are traced. diffeqx does the same, so the step times agree bit for
    bit either way (with numbers, they did not before 2026-12-06: e.g. step 15 of
    `t0=0, t1=100, dt0=1` in float32 ended at 15.000001 rather than 15, which
    changes the answer of code that uses the time as an integer). So do Euler's
    values; a Runge-Kutta method's constant steps sum their stages elementwise
    rather than by Diffrax's dot products, which round differently in the last bit
    (docs/migration.md)."""
    if as_arrays:
        times = tuple(jnp.asarray(x, jnp.float64) for x in times)
    outputs = {}
    for lib in (diffrax, diffeqx):
        sol = lib.diffeqsolve(
            lib.ODETerm(_field),
            getattr(lib, solver)(),
            *times,
            jnp.array([1.0, -2.0]),
            args=jnp.asarray(0.7),
            saveat=lib.SaveAt(steps=True),
            max_steps=400,
        )
        outputs[lib.__name__] = (sol.ts, sol.stats["num_steps"], sol.ys)
    expected, actual = outputs["diffrax"], outputs["diffeqx"]
    np.testing.assert_array_equal(np.asarray(actual[0]), np.asarray(expected[0]))
    assert int(actual[1]) == int(expected[1])
    ys, ys_diffrax = np.asarray(actual[2]), np.asarray(expected[2])
    if solver == "Euler":
        np.testing.assert_array_equal(ys, ys_diffrax)
    else:
        np.testing.assert_allclose(ys, ys_diffrax, rtol=1e-13, atol=0)
