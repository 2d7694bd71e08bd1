"""One Runge–Kutta step gives Diffrax's solution and error estimate bit for bit.

The error estimate decides every accept/reject; a difference of one ULP in it flips
float32 decisions near the threshold. diffeqx takes it as `sum_i b_error_i k_i`, one
dot product of the weights with the stage increments, as Diffrax does, so the two
must agree exactly (in float32 and float64, forwards and backwards, for stages run
unrolled or in a loop).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffrax = pytest.importorskip("diffrax")

import diffeqx  # noqa: E402

SOLVERS = ("Heun", "Midpoint", "Ralston", "Bosh3", "Tsit5", "Dopri5", "Dopri8")
# (y0 scale, t0, dt): forwards and backwards, several step sizes.
STEPS = ((1.0, 0.0, 0.1), (0.7, 0.3, 0.25), (1.3, 1.0, -0.2), (2.0, 0.1, 0.05))


def _field(t, y, args):
    return -args * y + jnp.sin(t)


def _one_step(lib, solver, dtype, scale, t0, dt):
    y0 = jnp.asarray([scale, -0.4 * scale], dtype)
    args = jnp.asarray(0.7, dtype)
    term = lib.ODETerm(_field)

    # init and step in one program (as inside diffeqsolve), so that both libraries'
    # programs are compiled alike.
    @jax.jit
    def run(t0, t1, y0, args):
        state = solver.init(term, t0, t1, y0, args)
        y1, y_error, *_ = solver.step(term, t0, t1, y0, args, state, False)
        return y1, y_error

    t0 = jnp.asarray(t0, dtype)
    return [np.asarray(x) for x in run(t0, t0 + jnp.asarray(dt, dtype), y0, args)]


# Tsit5 in float64 in the default run; the other cases (a few seconds each, mostly
# compilation) carry the `slow` marker.
_DEFAULT_CASES = (("Tsit5", "float64"),)
CASES = [
    pytest.param(
        name,
        dtype,
        marks=() if (name, dtype) in _DEFAULT_CASES else (pytest.mark.slow,),
        id=f"{name}-{dtype}",
    )
    for name in SOLVERS
    for dtype in ("float32", "float64")
]


@pytest.mark.parametrize("name,dtype", CASES)
def test_step_and_error_estimate_bit_for_bit(name, dtype):
    for scale, t0, dt in STEPS:
        expected = _one_step(diffrax, getattr(diffrax, name)(), dtype, scale, t0, dt)
        actual = _one_step(diffeqx, getattr(diffeqx, name)(), dtype, scale, t0, dt)
        np.testing.assert_array_equal(actual[0], expected[0], err_msg="y1")
        np.testing.assert_array_equal(actual[1], expected[1], err_msg="y_error")


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("Tsit5", "float32"),
        pytest.param("Tsit5", "float64", marks=pytest.mark.slow),
        pytest.param("Bosh3", "float32", marks=pytest.mark.slow),
        pytest.param("Dopri5", "float64", marks=pytest.mark.slow),
    ],
)
def test_stages_in_a_loop_give_the_same_bits(name, dtype):
    expected = _one_step(diffrax, getattr(diffrax, name)(), dtype, 0.7, 0.3, 0.25)
    actual = _one_step(
        diffeqx, getattr(diffeqx, name)(scan_stages=True), dtype, 0.7, 0.3, 0.25
    )
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
