"""Program-size budgets: the jaxpr equation counts of a handful of standard solves are
pinned just above their current values, so that a change that bloats the compiled
program (and so its compile time) fails here, naming the solve, the counts and the
part of the solve that grew. Equation counts are deterministic for a given JAX and
Equinox; times are not, so nothing here is timed (see benchmarks/compile_profile.py).

A deliberate increase: raise the budget in `BUDGETS` in the same change, saying why.
"""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import diffeqx as dfx
from diffeqx._profile import count_equations, residual_bytes

# Each budget is the count when it was set plus about 5 %, measured with JAX 0.10.2 and Equinox
# 0.13 (x64 on, as in the test suite).
BUDGETS = {
    # The forward budgets were raised from 780, 850, 490 and 805 when the loop's
    # starting values began to be computed from `y0` at run time (about 15 setup
    # equations, for a solve on CPU that stays on one thread: see `_runtime_zero` in
    # `_solve/setup.py`); 776, 848, 495 and 792 equations then.
    "tsit5_pid_ts": 815,
    # Lowered from 4010 and 3670 when `SaveAt(ts=...)` under reverse mode started
    # interpolating after the loop (2988 and 2717 equations then), and from 3140
    # and 2860 when the checkpointed loop began to carry its scalars packed (2999
    # and 2782 equations before, 2641 and 2411 after). Lowered from 2780 when the
    # default adjoint began to store every step's state where `max_steps` of them
    # fit in 8 MiB (2553 equations before, 2235 after: no decision in the backward
    # loop between recomputing a step and differentiating it), and from 2350 when
    # that storing loop became diffeqx's own (2235 equations before, 1869 after:
    # Equinox's checkpointed loop also takes a forward-mode derivative of the step).
    "tsit5_pid_ts_grad": 1960,
    # Raised from 890 when explicit Runge-Kutta stages under `vmap` on CPU began to
    # be combined by elementwise sums rather than dot products (a product and a sum
    # per weight: 922 equations then, from 832; the solve runs in about half the time),
    # and from 965 when the loop under `vmap` stopped carrying a predicate per member
    # (1036 equations then, from 922: the step itself holds finished members, and its
    # starting values are all mapped; JAX batches the step twice rather than three
    # times, and the solve traces and lowers in less time, see docs/performance.md).
    "tsit5_pid_ts_vmap": 1085,
    "dopri8_pid": 520,
    "cde_linear_path": 830,
    "neural_ode_training_step": 2540,
    # The fixed-step path (constant steps known at trace time, run as a scan), and
    # its gradient (494 and 1353 equations when set, through checkpointed blocks;
    # 522 since the stages' weights are each multiplied by the step length once per
    # step, one scalar product per non-zero weight, without reverse mode; 912 for
    # the gradient since it stores every step within 64 MiB). Lowered from 540 and
    # 1420 when the scan's starting values stopped being computed from `y0` at run
    # time (493 and 883 equations then). The forward budget was raised from 520 when
    # a solve inside `jax.jit` began to be traced as a nested `jax.jit` (545
    # equations then, from 495): the concrete array this program passes as `args` is
    # then an input of the nested trace, as under Diffrax's `diffeqsolve`, and the
    # vector field's unpacking of it is traced (slices) rather than done at trace
    # time; XLA folds the constant in the compiled program.
    "tsit5_constant": 575,
    "tsit5_constant_grad": 930,
}


def _lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    return jnp.stack(
        [alpha * y[0] - beta * y[0] * y[1], -gamma * y[1] + delta * y[0] * y[1]]
    )


_LV_ARGS = jnp.array([0.5, 0.02, 0.4, 0.02])
_TS = jnp.linspace(0.0, 20.0, 100)


def _tsit5_pid_ts(y0, args=_LV_ARGS):
    return dfx.diffeqsolve(
        dfx.ODETerm(_lotka_volterra),
        dfx.Tsit5(),
        0.0,
        20.0,
        0.1,
        y0,
        args,
        saveat=dfx.SaveAt(ts=_TS),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
    ).ys


def _dopri8_pid(y0):
    def lorenz(t, y, args):
        return jnp.stack(
            [10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1], y[0] * y[1] - 8 / 3 * y[2]]
        )

    return dfx.diffeqsolve(
        dfx.ODETerm(lorenz),
        dfx.Dopri8(),
        0.0,
        1.0,
        0.01,
        y0,
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    ).ys


def _cde(xs):
    ts = jnp.linspace(0.0, 1.0, xs.shape[0])
    control = dfx.LinearInterpolation(ts, xs)
    matrix = jnp.ones((4, xs.shape[1])) * 0.1
    term = dfx.ControlTerm(lambda t, y, args: jnp.tanh(y)[:, None] * matrix, control)
    return dfx.diffeqsolve(
        term.to_ode(),
        dfx.Tsit5(),
        0.0,
        1.0,
        None,
        jnp.zeros(4),
        stepsize_controller=dfx.ClipStepSizeController(
            dfx.PIDController(rtol=1e-3, atol=1e-6), jump_ts=ts
        ),
    ).ys


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def _training_step():
    """Loss and gradient of a batched neural ODE (MLP 64 x 2, batch 32, 50 saves)."""
    field = _Field(eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=jr.key(0)))
    ts = jnp.linspace(0.0, 5.0, 50)
    y0s = jr.normal(jr.key(1), (32, 2))
    targets = jnp.zeros((32, 50, 2))

    @eqx.filter_value_and_grad
    def loss(field, y0s, targets):
        def one(y0, target):
            ys = dfx.diffeqsolve(
                dfx.ODETerm(field),
                dfx.Tsit5(),
                0.0,
                5.0,
                0.1,
                y0,
                saveat=dfx.SaveAt(ts=ts),
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
            ).ys
            return jnp.mean((ys - target) ** 2)

        return jnp.mean(jax.vmap(one)(y0s, targets))

    return loss, (field, y0s, targets)


def _tsit5_constant(y0, args=_LV_ARGS):
    return dfx.diffeqsolve(
        dfx.ODETerm(_lotka_volterra), dfx.Tsit5(), 0.0, 20.0, 0.01, y0, args
    ).ys


def _programs():
    y0 = jnp.array([10.0, 10.0])
    return {
        "tsit5_pid_ts": (_tsit5_pid_ts, (y0,)),
        "tsit5_pid_ts_grad": (
            jax.grad(lambda y0, args: jnp.sum(_tsit5_pid_ts(y0, args)), (0, 1)),
            (y0, _LV_ARGS),
        ),
        "tsit5_pid_ts_vmap": (jax.vmap(_tsit5_pid_ts), (jnp.ones((8, 2)) * 10,)),
        "dopri8_pid": (_dopri8_pid, (jnp.array([1.0, 1.0, 1.0]),)),
        "cde_linear_path": (_cde, (jnp.cumsum(jnp.ones((20, 3)), axis=0) / 20,)),
        "neural_ode_training_step": _training_step(),
        "tsit5_constant": (_tsit5_constant, (y0,)),
        "tsit5_constant_grad": (
            jax.grad(lambda y0, args: jnp.sum(_tsit5_constant(y0, args)), (0, 1)),
            (y0, _LV_ARGS),
        ),
    }


@pytest.mark.parametrize("name", list(BUDGETS))
def test_program_stays_within_its_equation_budget(name):
    fn, args = _programs()[name]
    closed, *_ = eqx.filter_make_jaxpr(fn)(*args)
    parts = count_equations(closed)
    total = sum(parts.values())
    breakdown = ", ".join(f"{part} {count}" for part, count in parts.items() if count)
    assert total <= BUDGETS[name], (
        f"The program of `{name}` has {total} jaxpr equations, over its budget of "
        f"{BUDGETS[name]} (JAX {jax.__version__}, Equinox {eqx.__version__}). By part: "
        f"{breakdown}. If the growth is deliberate, raise the budget in "
        "tests/test_program_size.py and say why."
    )


# ---------------------------------------------------------------------------------------
# Tracing runs nothing
# ---------------------------------------------------------------------------------------


def _kvaerno5_robertson(y0):
    def robertson(t, y, args):
        return jnp.stack(
            [
                -0.04 * y[0] + 1e4 * y[1] * y[2],
                0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
                3e7 * y[1] ** 2,
            ]
        )

    return dfx.diffeqsolve(
        dfx.ODETerm(robertson),
        dfx.Kvaerno5(),
        0.0,
        1e2,
        1e-6,
        y0,
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-9),
        throw=False,
    ).ys


class _XlaCompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            self.names.append(message.split(" of ", 1)[1].split(" in ")[0])


@pytest.mark.parametrize(
    "name, fn, y0",
    [
        ("tsit5_pid_ts", _tsit5_pid_ts, jnp.array([10.0, 10.0])),
        ("kvaerno5_robertson", _kvaerno5_robertson, jnp.array([1.0, 0.0, 0.0])),
    ],
)
def test_lowering_a_solve_compiles_nothing_else(name, fn, y0):
    # Anything evaluated eagerly while tracing (e.g. a comparison of two constant
    # result codes) is compiled as a program of its own the first time it runs in a
    # process, about 10 ms each.
    handler = _XlaCompiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        jax.clear_caches()
        with jax.log_compiles():
            jax.jit(fn).lower(y0)
    finally:
        logger.removeHandler(handler)
    assert handler.names == [], (
        f"Lowering `{name}` compiled {len(handler.names)} other programs: "
        f"{handler.names}"
    )


def test_residual_bytes_counts_what_reverse_mode_keeps():
    x = jnp.ones(10, jnp.float32)
    # sin(x) * 2: its derivative needs cos(x) (10 float32s), nothing else.
    assert residual_bytes(jax.make_jaxpr(lambda x: jnp.sin(x) * 2)(x)) == 40
    # A linear function keeps nothing.
    assert residual_bytes(jax.make_jaxpr(lambda x: 3 * x + 1)(x)) == 0
    # A product of two inputs keeps both.
    assert residual_bytes(jax.make_jaxpr(lambda x, y: x * y)(x, x)) == 80
    # Values of the constants alone are kept once, outside a scan over the step, and
    # are not counted: here sin(w) and cos(w), of a captured `w`; x is counted.
    w = jnp.linspace(0.0, 1.0, 10, dtype=jnp.float32)
    assert residual_bytes(jax.make_jaxpr(lambda x: x * jnp.sin(w))(x)) == 40
    # A scan inside keeps each iteration's values: cos of 3 carries.
    scanned = jax.make_jaxpr(
        lambda x: jax.lax.scan(lambda c, _: (jnp.sin(c), None), x, length=3)[0]
    )(x)
    assert residual_bytes(scanned) == 3 * 40
    # Integer inputs are not differentiated, but a value computed from one is kept
    # where the derivative needs it: cos(x) and the converted `n`.
    counted = jax.make_jaxpr(lambda x, n: jnp.sin(x) * n.astype(x.dtype))(
        x, jnp.int32(2)
    )
    assert residual_bytes(counted) == 40 + 4
    # Something without a derivative rule cannot be bounded.
    shape = jax.ShapeDtypeStruct((10,), jnp.float32)
    called = jax.make_jaxpr(lambda x: jax.pure_callback(lambda v: v, shape, x))(x)
    assert residual_bytes(called) == float("inf")
