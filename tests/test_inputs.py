"""What `diffeqsolve` accepts as `y0` and as times, and the dtypes it solves in: as
Diffrax does, with explicit casts only (the suite runs under strict promotion)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx


def _decay(t, y, args):
    return jax.tree.map(lambda x: -x, y)


def _solve(y0, t0=0.0, t1=1.0, dt0=0.1, **kwargs):
    kwargs.setdefault("saveat", dfx.SaveAt(t1=True))
    return dfx.diffeqsolve(dfx.ODETerm(_decay), dfx.Tsit5(), t0, t1, dt0, y0, **kwargs)


def test_integer_and_boolean_leaves_are_promoted_to_floating_point():
    sol = _solve((1.5, 0, jnp.array([2, 3], dtype=jnp.int32), True))
    position, velocity, pair, flag = sol.ys
    for leaf in sol.ys:
        assert leaf.dtype == jnp.float64
    np.testing.assert_allclose(position, [1.5 * np.exp(-1)], rtol=1e-6)
    np.testing.assert_allclose(velocity, [0.0])
    np.testing.assert_allclose(pair, [[2 * np.exp(-1), 3 * np.exp(-1)]], rtol=1e-6)
    np.testing.assert_allclose(flag, [np.exp(-1)], rtol=1e-6)


@pytest.mark.parametrize("y0", [None, {}, ()], ids=["None", "dict", "tuple"])
def test_empty_state_solves_and_saves_fn(y0):
    sol = _solve(y0, saveat=dfx.SaveAt(ts=[0.5, 1.0], fn=lambda t, y, args: t))
    np.testing.assert_allclose(sol.ts, [0.5, 1.0])
    np.testing.assert_allclose(sol.ys, [0.5, 1.0])
    assert int(sol.stats["num_steps"]) == 10


def test_integer_times_solve_in_the_default_floating_dtype():
    sol = _solve(jnp.array(1.0), t0=0, t1=1, dt0=1)
    assert sol.ts.dtype == jnp.float64
    sol = _solve(jnp.array(1.0), t0=0, t1=1, dt0=0.01)
    np.testing.assert_allclose(sol.ys, [np.exp(-1)], rtol=1e-9)


@pytest.mark.parametrize(
    "y_dtype, t_dtype, expected_y, expected_t",
    [
        (jnp.int32, jnp.float32, jnp.float32, jnp.float32),
        (jnp.float32, jnp.float32, jnp.float32, jnp.float32),
        (jnp.float32, jnp.float64, jnp.float64, jnp.float64),
        (jnp.float64, jnp.float32, jnp.float64, jnp.float32),
        # The float32 twin of the complex128 case (complex64 states: the test of
        # PID on complex and real leaves below) is `slow`.
        pytest.param(
            jnp.complex64,
            jnp.float32,
            jnp.complex64,
            jnp.float32,
            marks=pytest.mark.slow,
        ),
        (jnp.complex128, jnp.float64, jnp.complex128, jnp.float64),
    ],
)
@pytest.mark.parametrize(
    "adaptive",
    [
        pytest.param(False, id="constant"),
        # PID on mixed widths and complex leaves runs by default in
        # test_pid_on_a_state_of_complex_and_real_leaves_of_several_widths.
        pytest.param(True, id="pid", marks=pytest.mark.slow),
    ],
)
def test_mixed_dtypes_solve_without_implicit_promotion(
    y_dtype, t_dtype, expected_y, expected_t, adaptive
):
    y0 = jnp.asarray(1, dtype=y_dtype)
    t0, t1, dt0 = (jnp.asarray(x, dtype=t_dtype) for x in (0.0, 1.0, 0.1))
    controller = (
        dfx.PIDController(rtol=1e-5, atol=1e-5) if adaptive else dfx.ConstantStepSize()
    )
    saveat = dfx.SaveAt(t1=True, ts=jnp.asarray([0.5], dtype=t_dtype), dense=True)
    sol = _solve(y0, t0, t1, dt0, saveat=saveat, stepsize_controller=controller)
    assert sol.ys.dtype == expected_y and sol.ts.dtype == expected_t
    rtol = 1e-4 if jnp.finfo(expected_y).bits <= 64 else 1e-6
    np.testing.assert_allclose(sol.ys, [np.exp(-0.5), np.exp(-1)], rtol=rtol)
    dense = sol.evaluate(jnp.asarray(0.25, dtype=t_dtype))
    assert dense.dtype == expected_y
    np.testing.assert_allclose(dense, np.exp(-0.25), rtol=rtol)
    slope = sol.derivative(jnp.asarray(0.25, dtype=t_dtype))
    assert slope.dtype == expected_y
    np.testing.assert_allclose(slope, -np.exp(-0.25), rtol=1e-2)


def test_float32_save_times_make_python_float_times_float32():
    # Python numbers are weakly typed: the save times decide the time dtype.
    sol = _solve(
        jnp.asarray(1.0, dtype=jnp.float32),
        saveat=dfx.SaveAt(ts=jnp.asarray([0.5, 1.0], dtype=jnp.float32)),
    )
    assert sol.ts.dtype == jnp.float32 and sol.ys.dtype == jnp.float32


def test_non_numeric_state_leaf_is_refused_naming_it():
    with pytest.raises(TypeError, match=r"y0.*\['name'\]"):
        _solve({"x": jnp.array(1.0), "name": "decay"})


def test_complex_times_are_refused():
    with pytest.raises(ValueError, match="complex"):
        _solve(jnp.array(1.0), t1=1.0 + 0j)


def _rotate(t, y, args):
    return jax.tree.map(lambda x: 1j * x if jnp.iscomplexobj(x) else -x, y)


def _rotation_steps(z0):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_rotate),
        dfx.Tsit5(),
        0.0,
        3.0,
        0.1,
        z0,
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-7),
        max_steps=64,
    )
    n = int(sol.stats["num_steps"])
    return sol, np.asarray(sol.ts[:n])


def test_pid_measures_a_complex_error_by_its_magnitude():
    # z' = iz: a magnitude-based error norm is invariant under a phase of z0, so the
    # accepted steps do not depend on it (they would with only the real part counted).
    sol, ts = _rotation_steps(jnp.asarray(1.0 + 0j, dtype=jnp.complex128))
    phase = np.exp(1.3j)
    rotated, rotated_ts = _rotation_steps(jnp.asarray(phase, dtype=jnp.complex128))
    assert rotated.stats["num_steps"] == sol.stats["num_steps"]
    assert rotated.stats["num_rejected_steps"] == sol.stats["num_rejected_steps"]
    np.testing.assert_allclose(rotated_ts, ts, rtol=1e-9)
    np.testing.assert_allclose(sol.ys[len(ts) - 1], np.exp(3j), rtol=1e-4)


@pytest.mark.parametrize("t_dtype", [jnp.float32, jnp.float64])
def test_pid_on_a_state_of_complex_and_real_leaves_of_several_widths(t_dtype):
    y0 = {
        "z": jnp.asarray(1.0 + 0j, dtype=jnp.complex64),
        "x": jnp.asarray([1.0, 2.0], dtype=jnp.float64),
        "w": jnp.asarray(0.5, dtype=jnp.float32),
    }
    t0, t1, dt0 = (jnp.asarray(x, dtype=t_dtype) for x in (0.0, 1.0, 0.1))
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_rotate),
        dfx.Tsit5(),
        t0,
        t1,
        dt0,
        y0,
        saveat=dfx.SaveAt(t1=True),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-7),
    )
    wide = t_dtype == jnp.float64
    assert sol.ys["z"].dtype == (jnp.complex128 if wide else jnp.complex64)
    assert sol.ys["x"].dtype == jnp.float64
    assert sol.ys["w"].dtype == (jnp.float64 if wide else jnp.float32)
    np.testing.assert_allclose(np.asarray(sol.ys["z"]), [np.exp(1j)], rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(sol.ys["x"]), [[np.exp(-1), 2 * np.exp(-1)]], rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(sol.ys["w"]), [0.5 * np.exp(-1)], rtol=1e-4)


@functools.cache
def _float32_dense_solution():
    # One solve (a compilation) for the cases below, which evaluate it.
    y0 = jnp.array([1.0], jnp.float32)
    f32 = jnp.float32
    return _solve(y0, f32(0), f32(1), f32(0.1), saveat=dfx.SaveAt(dense=True))


@pytest.mark.parametrize(
    "t", [0.5, np.float64(0.5), jnp.float64(0.5), jnp.float32(0.5)]
)
def test_dense_output_of_a_float32_solve_accepts_a_time_of_any_float_dtype(t):
    sol = _float32_dense_solution()
    value, slope = sol.evaluate(t), sol.derivative(t)
    assert value.dtype == slope.dtype == jnp.float32
    np.testing.assert_allclose(value, np.exp([-0.5]), rtol=1e-4)
    np.testing.assert_allclose(slope, -np.exp([-0.5]), rtol=1e-3)
    np.testing.assert_allclose(
        sol.evaluate(0.2, t), np.exp([-0.5]) - np.exp([-0.2]), rtol=1e-4
    )


@pytest.mark.parametrize(
    "field", [1, True, np.int32(1)], ids=["int", "bool", "np.int32"]
)
def test_an_integer_vector_field_on_a_floating_state_is_integrated(field):
    # y' = 1 from a field returning a Python or NumPy integer: diffeqx kept the
    # field's integer dtype, and an adaptive solve silently returned y0 unchanged.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: field),
        dfx.Tsit5(),
        0.0,
        1.0,
        0.1,
        jnp.asarray(0.5),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
    )
    np.testing.assert_allclose(np.asarray(sol.ys[-1]), 1.5, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("solver", [dfx.Tsit5(), dfx.Dopri5(), dfx.Dopri8()])
@pytest.mark.parametrize("adaptive", [False, True], ids=["constant", "pid"])
def test_half_precision_states_are_combined_in_float32(dtype, solver, adaptive):
    # The stages, and the dense output's weights, are combined in float32 and
    # rounded to the state's dtype once: the solution of y' = -y at the save times
    # is within two epsilons (relative) of exp(-t). Combined in the state's dtype,
    # Tsit5 and Dopri8 were 3.5 to 66 epsilons off.
    controller = (
        dfx.PIDController(rtol=1e-2, atol=1e-2) if adaptive else dfx.ConstantStepSize()
    )
    t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, 1.0, 0.1))
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_decay),
        solver,
        t0,
        t1,
        dt0,
        jnp.ones(2, dtype),
        stepsize_controller=controller,
        saveat=dfx.SaveAt(ts=jnp.linspace(t0, t1, 5, dtype=dtype)),
    )
    assert sol.ys.dtype == dtype
    exact = np.exp(-np.asarray(sol.ts, np.float64))
    error = np.abs(np.asarray(sol.ys[:, 0], np.float64) - exact) / exact
    assert np.max(error) <= 2 * float(jnp.finfo(dtype).eps), np.max(error)
