"""`jax.grad` through the same solve gives the same gradients in Diffrax and diffeqx.

A scalar loss (the sum of squares of everything saved) is differentiated with respect
to `y0` and `args`, for cases drawn deterministically from solver x step size
controller x SaveAt x adjoint x time direction x dtype x problem. The cases listed in
`DEFAULT_CASES` run by default, the rest carry the `slow` marker. Tolerances are those
of `_harness.TOLERANCE`: the two libraries differentiate the same arithmetic.
"""

import dataclasses
import itertools
import math
import random
from typing import Any

import pytest

diffrax = pytest.importorskip("diffrax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx  # noqa: E402

from ._harness import (  # noqa: E402
    EXPLICIT_SOLVERS,
    PROBLEMS,
    Span,
    diff_outputs,
    make_controller,
    problem,
)

AXES = dict(
    problem=PROBLEMS,
    solver=EXPLICIT_SOLVERS,
    controller=("const", "pid", "clip_jump"),
    saveat=("t1", "ts"),
    adjoint=("RecursiveCheckpointAdjoint", "DirectAdjoint", "BacksolveAdjoint"),
    backwards=(False, True),
    dtype=("float64", "float32"),
)
NUM_CASES = 40
# Run by default: one case per adjoint, together covering both SaveAt kinds, every
# controller, both directions and both dtypes.
DEFAULT_CASES = (2, 3, 9)


@dataclasses.dataclass(frozen=True)
class GradCase:
    problem: str
    solver: str
    controller: str
    saveat: str
    adjoint: str
    backwards: bool
    dtype: str

    def __str__(self):
        direction = "bwd" if self.backwards else "fwd"
        return "-".join(
            [self.problem, self.solver, self.controller, self.saveat, self.adjoint]
            + [direction, self.dtype]
        )


def loss_and_gradients(lib, case: GradCase) -> dict[str, Any]:
    """The loss and its gradient with respect to (y0, args), through `lib`."""
    dtype = jnp.float32 if case.dtype == "float32" else jnp.float64
    vector_field, y0, args = problem(case.problem, dtype)
    t0, t1 = (2.0, 0.0) if case.backwards else (0.0, 2.0)
    span = Span(t0, t1, dtype)
    controller, dt0 = make_controller(lib, case.controller, span, span, case.problem)
    if case.saveat == "ts":
        saveat = lib.SaveAt(ts=span.at(0.0, 0.3, 0.75, 1.0))
    else:
        saveat = lib.SaveAt(t1=True)

    # The times are made outside the differentiated function, so that under
    # `jax.jit` they are the same concrete values as in an eager call.
    times = (
        jnp.asarray(t0, dtype),
        jnp.asarray(t1, dtype),
        jnp.asarray(math.copysign(dt0, t1 - t0), dtype),
    )

    def loss(y0, args):
        sol = lib.diffeqsolve(
            lib.ODETerm(vector_field),
            getattr(lib, case.solver)(),
            *times,
            y0,
            args,
            saveat=saveat,
            stepsize_controller=controller,
            adjoint=getattr(lib, case.adjoint)(),
            max_steps=1024,  # under throw=True, room for every adaptive case
        )
        return sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(sol.ys))

    # Jitted: one compilation rather than one per operation of an eager derivative.
    if case.adjoint == "ForwardMode":
        # Forward-mode derivatives only (both libraries refuse reverse mode).
        value = jax.jit(loss)(y0, args)
        grads = jax.jit(jax.jacfwd(loss, argnums=(0, 1)))(y0, args)
    else:
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(y0, args)
    return jax.tree.map(
        np.asarray, {"loss": value, "grad_y0": grads[0], "grad_args": grads[1]}
    )


def _cases() -> list[GradCase]:
    product = [GradCase(*values) for values in itertools.product(*AXES.values())]
    sampled = random.Random(0).sample(product, 3 * NUM_CASES)
    # Euler gives no error estimate: Diffrax refuses to adapt its step size.
    valid = [
        c for c in sampled if not (c.solver == "Euler" and c.controller != "const")
    ]
    return valid[:NUM_CASES]


CASES = _cases()


def _param(index: int, case: GradCase):
    marks = () if index in DEFAULT_CASES else (pytest.mark.slow,)
    return pytest.param(case, id=str(case), marks=marks)


@pytest.mark.parametrize("case", [_param(i, c) for i, c in enumerate(CASES)])
def test_same_gradients_as_diffrax(case):
    expected = loss_and_gradients(diffrax, case)
    actual = loss_and_gradients(diffeqx, case)
    tolerance = None
    if case.adjoint == "BacksolveAdjoint" and case.dtype == "float32":
        # The adjoint is solved with its own adaptive steps, and in float32 a rounding
        # difference can flip one of its accept/reject decisions: the gradients then
        # differ at the adjoint solve's own accuracy. Measured on the sampled case
        # that shows it: 2e-4 apart, while each is 2-5 % from the exact gradient.
        tolerance = (1e-3, 1e-4)
    problems = diff_outputs(expected, actual, case.dtype, tolerance)
    assert not problems, f"{case}\n" + "\n".join(problems)


def test_default_cases_cover_every_adjoint_saveat_controller_direction_and_dtype():
    default = [CASES[i] for i in DEFAULT_CASES]
    for axis in ("adjoint", "saveat", "controller", "backwards", "dtype"):
        assert {getattr(c, axis) for c in default} == set(AXES[axis]), axis


# `ForwardMode` (forward-mode derivatives, `jax.jacfwd`): not in `AXES`, whose sample
# the default cases above are picked from; its own cases, one by default.
FORWARD_CASES = [
    GradCase("lv", "Tsit5", "pid", "ts", "ForwardMode", False, "float64"),
    GradCase("lin2", "Dopri5", "clip_jump", "t1", "ForwardMode", True, "float64"),
    GradCase("tree", "Heun", "const", "ts", "ForwardMode", True, "float32"),
    GradCase("lin1", "Bosh3", "pid", "t1", "ForwardMode", False, "float32"),
    GradCase("lv", "Dopri8", "const", "t1", "ForwardMode", True, "float64"),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=str(c), marks=() if i == 0 else (pytest.mark.slow,))
        for i, c in enumerate(FORWARD_CASES)
    ],
)
def test_forward_mode_same_derivatives_as_diffrax(case):
    expected = loss_and_gradients(diffrax, case)
    actual = loss_and_gradients(diffeqx, case)
    problems = diff_outputs(expected, actual, case.dtype)
    assert not problems, f"{case}\n" + "\n".join(problems)


def _steady_state_and_gradient(lib, dtype):
    """The steady state of `y' = -K (y - c(args))` and the gradient of a loss on it
    with respect to `args`, through `ImplicitAdjoint` (the implicit function theorem
    at the steady state the event stops at)."""
    matrix = jnp.asarray([[2.0, 0.5], [-0.3, 1.5]], dtype)

    def field(t, y, args):
        target = jnp.stack([jnp.sin(args[0]), args[0] * args[1]])
        return -(matrix @ (y - target))

    def loss(args):
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Tsit5(),
            jnp.asarray(0.0, dtype),
            jnp.asarray(jnp.inf, dtype),
            jnp.asarray(0.1, dtype),
            jnp.zeros(2, dtype),
            args,
            stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8),
            event=lib.Event(lib.steady_state_event()),
            adjoint=lib.ImplicitAdjoint(),
            max_steps=4096,
        )
        return jnp.sum(sol.ys[-1] ** 2), sol.ys[-1]

    args = jnp.asarray([0.7, -1.2], dtype)
    (value, state), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return np.asarray(value), np.asarray(state), np.asarray(grad)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_implicit_adjoint_same_gradient_as_diffrax(dtype):
    ours = _steady_state_and_gradient(diffeqx, dtype)
    # Diffrax 0.7.2's `ImplicitAdjoint` multiplies by a Python integer inside its
    # linearisation, which strict dtype promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        theirs = _steady_state_and_gradient(diffrax, dtype)
    rtol = 1e-10 if dtype == jnp.float64 else 1e-5
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    # And both are the exact gradient of |c(args)|^2 at the steady state y = c(args).
    a0, a1 = 0.7, -1.2
    exact = np.array(
        [
            2 * np.sin(a0) * np.cos(a0) + 2 * (a0 * a1) * a1,
            2 * (a0 * a1) * a0,
        ]
    )
    np.testing.assert_allclose(
        ours[2], exact, rtol=1e-4 if dtype == jnp.float32 else 1e-6
    )


def _per_member_gradients(lib, controller, dtype):
    """`jax.vmap` of `jax.value_and_grad` (one gradient per member: the `jax.vmap`
    outside the derivative) of a loss on a Lotka–Volterra solve, with respect to
    the shared parameters and each member's initial state, the members taking
    different numbers of steps; each member's step count alongside."""
    field = lambda t, y, args: jnp.stack(  # noqa: E731
        [args[0] * y[0] - args[1] * y[0] * y[1], args[3] * y[0] * y[1] - args[2] * y[1]]
    )

    def loss(params, y0, t1):
        if controller == "pid":
            step = dict(stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6))
        else:
            step = {}
        sol = lib.diffeqsolve(
            lib.ODETerm(field), lib.Tsit5(), jnp.asarray(0.0, dtype), t1,
            jnp.asarray(0.1, dtype), y0, args=params,
            saveat=lib.SaveAt(ts=t1 * jnp.linspace(0.0, 1.0, 9, dtype=dtype)),
            max_steps=256, **step,
        )  # fmt: skip
        return jnp.mean((sol.ys / 10) ** 2), sol.stats["num_steps"]

    params = jnp.asarray([0.5, 0.02, 0.4, 0.02], dtype)
    y0s = jnp.asarray([[10.0, 10.0], [15.0, 5.0], [4.0, 12.0]], dtype)
    t1s = jnp.asarray([8.0, 12.0, 10.0], dtype)
    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))(params, y0s, t1s)


@pytest.mark.parametrize(
    "controller, dtype",
    [("pid", jnp.float64), ("const", jnp.float64), ("pid", jnp.float32)],
)
def test_per_member_gradients_as_diffrax(controller, dtype):
    # diffeqx's default adjoint runs its own stored loop here, whose step holds the
    # members that have finished; Diffrax runs Equinox's checkpointed loop.
    ((value, steps), grads), ((value_, steps_), grads_) = (
        _per_member_gradients(lib, controller, dtype) for lib in (diffeqx, diffrax)
    )
    np.testing.assert_array_equal(steps, steps_)
    assert len(set(np.asarray(steps).tolist())) == 3  # different step counts
    rtol = 1e-10 if dtype == jnp.float64 else 2e-5
    np.testing.assert_allclose(value, value_, rtol=rtol)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
