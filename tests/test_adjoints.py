"""Derivatives through every adjoint, in float64, against central finite differences
and closed forms.

Truth here is either a closed form (the vector field at `t1`, a steady state's
implicit derivative) or central finite differences of the primal solve. The problems
are smooth and solved tightly (`PIDController(rtol=atol=1e-10)`, or constant steps
with Tsit5), so the discretisation error is far below the finite-difference error.

Finite differences in the times: the step grid of `ConstantStepSize` is
`t0 + k * dt0` with the last step shortened to end at `t1`. Here `t1 - t0` is not a
multiple of `dt0` and no save time lies on the grid, so perturbing `t0`, `t1` or a save
time by the finite-difference step changes neither the number of steps nor the step
that a save time falls in, and the discrete solution is smooth in every time.
(`t1 - t0` a whole number of steps also works for Tsit5 at these step sizes: the extra
step of length `h` that then appears on one side changes the solution by far less than
the finite-difference error. The grid above avoids relying on that.)

One comparison rule serves every test, `assert_close`: see its docstring.

Sections: 1. every adjoint x every differentiable argument x two controllers;
2. the derivative in t1; 3. closure-captured and eqx.Module parameters; 4. higher
order through RecursiveCheckpointAdjoint; 5. a neural-ODE Hessian; 6. ImplicitAdjoint;
7. BacksolveAdjoint misuse; 8. BacksolveAdjoint under vmap and in float32;
9. BacksolveAdjoint with `SaveAt(fn=...)` and `SaveAt(subs=...)`. Each
section has tests in the default run; combinations that only repeat a covered code
path at the cost of another multi-second compilation are marked slow.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import diffeqx as dfx

FD_STEP = 1e-5
TOL = 1e-10  # forward (and backward) solve tolerances of the adaptive cases
MAX_STEPS = 256  # small bound keeps the bounded loops cheap to compile


def _flat(x):
    return np.asarray(ravel_pytree(x)[0], dtype=np.float64)


def assert_close(actual, expected, *, rtol, floor=None, label=""):
    """Asserts `|actual - expected| <= rtol * max(|expected|, floor)` entrywise.

    `floor` defaults to `1e-3 * max|expected|`: entries much smaller than the largest
    are then held to an absolute error of `rtol * floor` rather than to their own
    size, because the error of a finite-difference estimate (about `1e-10` here) does
    not shrink with the value it estimates. Pass an explicit `floor` where `expected`
    may be (close to) zero, e.g. a derivative that should vanish.

    Returns the largest observed `|actual - expected| / max(|expected|, floor)`.
    """
    actual, expected = _flat(actual), _flat(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{label}: non-finite values {actual}"
    if floor is None:
        floor = 1e-3 * np.max(np.abs(expected))
    assert floor > 0, f"{label}: zero expected values need an explicit floor"
    err = np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), floor))
    print(f"[{label}] max relative error {err:.2e} (rtol {rtol:.0e})")
    assert err <= rtol, (
        f"{label}: max relative error {err:.3e} > {rtol:.0e}\n"
        f"actual   {actual}\nexpected {expected}"
    )
    return err


def fd_gradient(fn, x, step=FD_STEP):
    """Central finite differences of the scalar `fn` at the PyTree `x`, flattened in
    `ravel_pytree` order. `fn` is called with PyTrees of the same dtypes as `x`."""
    flat, unravel = ravel_pytree(x)
    flat = np.asarray(flat, dtype=np.float64)
    out = np.zeros_like(flat)
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = step
        plus = float(fn(unravel(jnp.asarray(flat + e))))
        minus = float(fn(unravel(jnp.asarray(flat - e))))
        out[i] = (plus - minus) / (2 * step)
    return out


def fd_jacobian(fn, x, step=FD_STEP):
    """Central finite differences of the array-valued `fn` at the PyTree `x`: an array
    of shape `(fn(x).size, x.size)` in `ravel_pytree` order."""
    flat, unravel = ravel_pytree(x)
    flat = np.asarray(flat, dtype=np.float64)
    cols = []
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = step
        plus = _flat(fn(unravel(jnp.asarray(flat + e))))
        minus = _flat(fn(unravel(jnp.asarray(flat - e))))
        cols.append((plus - minus) / (2 * step))
    return np.stack(cols, axis=1)


def _seminorm_backsolve():
    controller = dfx.PIDController(rtol=TOL, atol=TOL, norm=dfx.adjoint_rms_seminorm)
    return dfx.BacksolveAdjoint(stepsize_controller=controller)


ADJOINTS = {
    "recursive": dfx.RecursiveCheckpointAdjoint(),
    "direct": dfx.DirectAdjoint(),
    "backsolve": dfx.BacksolveAdjoint(),
    "backsolve-seminorm": _seminorm_backsolve(),
    "forward": dfx.ForwardMode(),
}

# ---------------------------------------------------------------------------------------
# 1. Every adjoint x every differentiable argument x both controllers, against finite
#    differences. One problem; the derivative with respect to all five arguments is
#    compiled once per (adjoint, controller) and shared by the tests of each argument.
# ---------------------------------------------------------------------------------------

T0, T1 = 0.1, 1.31
DT0 = 0.03  # (T1 - T0) / DT0 = 40.33 steps
TS = jnp.array([0.36, 0.71, 1.04])  # strictly inside steps of the DT0 grid
Y0 = jnp.array([1.0, -0.5])
ARGS = {"a": jnp.array([0.7, 1.3]), "b": jnp.array(0.4)}
ARGNAMES = ("y0", "args", "t0", "t1", "ts")


def _field(t, y, args):
    # Nonlinear, coupled, and explicitly time-dependent, so that every argument
    # (including the times) has a non-trivial derivative.
    return -args["a"] * y + args["b"] * jnp.sin(y[::-1]) + 0.5 * jnp.cos(2.0 * t)


def _loss_of_ys(ys):
    # Different weights for every saved row, so each save has its own cotangent.
    rows = jnp.arange(1.0, ys.shape[0] + 1.0, dtype=ys.dtype)[:, None]
    weights = jnp.array([1.0, -2.0], ys.dtype).reshape((1,) * (ys.ndim - 1) + (2,))
    return jnp.sum(weights * ys**2) + jnp.sum(rows * ys)


def _problem(controller):
    """(stepsize controller, dt0, SaveAt kwargs). The adaptive cases save at t0, ts
    and t1; the constant-step case at ts and t1. All save t1, so that the derivative
    with respect to t1 is non-zero. "pid-float32" is for float32 states."""
    if controller == "pid":
        return dfx.PIDController(rtol=TOL, atol=TOL), None, dict(t0=True, t1=True)
    if controller == "pid-float32":
        return dfx.PIDController(rtol=1e-6, atol=1e-6), None, dict(t0=True, t1=True)
    return dfx.ConstantStepSize(), DT0, dict(t1=True)


def _solve_ys(adjoint, controller, y0, args, t0, t1, ts, field=_field):
    stepsize_controller, dt0, save = _problem(controller)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5(),
        t0,
        t1,
        dt0,
        y0,
        args,
        saveat=dfx.SaveAt(ts=ts, **save),
        stepsize_controller=stepsize_controller,
        adjoint=adjoint,
        max_steps=MAX_STEPS,
    )
    return sol.ys


def _inputs():
    return (Y0, ARGS, jnp.asarray(T0), jnp.asarray(T1), TS)


@functools.cache
def _primal_ys(controller):
    return jax.jit(
        lambda *inputs: _solve_ys(dfx.RecursiveCheckpointAdjoint(), controller, *inputs)
    )


@functools.cache
def _derivative_fn(adjoint_name, controller):
    """The derivative of the loss with respect to all five arguments at once:
    `jax.grad` for reverse adjoints, `jax.jacfwd` for `ForwardMode`; jitted."""
    adjoint = ADJOINTS[adjoint_name]

    def loss(*inputs):
        return _loss_of_ys(_solve_ys(adjoint, controller, *inputs))

    transform = jax.jacfwd if adjoint_name == "forward" else jax.grad
    return jax.jit(transform(loss, argnums=tuple(range(5))))


@functools.cache
def _derivatives(adjoint_name, controller):
    return _derivative_fn(adjoint_name, controller)(*_inputs())


@functools.cache
def _fd_argument(controller, argname):
    i = ARGNAMES.index(argname)
    primal = _primal_ys(controller)

    def loss_in(x):
        inputs = list(_inputs())
        inputs[i] = x
        return _loss_of_ys(primal(*inputs))

    return fd_gradient(loss_in, _inputs()[i])


def _config(adjoint_name, controller, slow=False):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(
        adjoint_name, controller, id=f"{adjoint_name}-{controller}", marks=marks
    )


# Both controllers and every adjoint but ForwardMode are in the default run
# (BacksolveAdjoint with the seminorm and adaptive steps); the remaining combinations
# (each a separate compilation of several seconds) are marked slow. ForwardMode
# against finite differences by default: test_transforms.py::test_forward_mode_jvp_...
# (and the default adjoint's forward mode in section 4 below).
CONFIGS = [
    _config("recursive", "pid"),
    _config("recursive", "constant", slow=True),
    _config("direct", "pid", slow=True),
    _config("direct", "constant"),
    _config("backsolve", "pid", slow=True),
    _config("backsolve", "constant", slow=True),
    _config("backsolve-seminorm", "pid"),
    _config("backsolve-seminorm", "constant", slow=True),
    _config("forward", "pid", slow=True),
    _config("forward", "constant", slow=True),
]
REVERSE_CONFIGS = [c for c in CONFIGS if c.values[0] != "forward"]


@pytest.mark.parametrize("argname", ARGNAMES)
@pytest.mark.parametrize("adjoint_name, controller", CONFIGS)
def test_derivative_matches_finite_differences(adjoint_name, controller, argname):
    index = ARGNAMES.index(argname)
    derivative = _derivatives(adjoint_name, controller)[index]
    assert jax.tree.structure(derivative) == jax.tree.structure(_inputs()[index])
    assert_close(
        derivative,
        _fd_argument(controller, argname),
        rtol=1e-6,
        label=f"fd/{adjoint_name}/{controller}/{argname}",
    )


# ---------------------------------------------------------------------------------------
# 2. d(loss)/d(t1) = <cotangent of ys at t1, f(t1, y(t1), args)>
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("adjoint_name, controller", REVERSE_CONFIGS)
def test_t1_gradient_is_field_at_t1_dotted_with_cotangent(adjoint_name, controller):
    ys = _primal_ys(controller)(*_inputs())
    cotangent = jax.grad(_loss_of_ys)(ys)[-1]  # the last row is the save at t1
    expected = jnp.vdot(cotangent, _field(T1, ys[-1], ARGS))
    got = _derivatives(adjoint_name, controller)[ARGNAMES.index("t1")]
    assert_close(got, expected, rtol=1e-8, label=f"t1/{adjoint_name}/{controller}")


# ---------------------------------------------------------------------------------------
# 3. Parameters captured by a vector-field closure, and an eqx.Module vector field
# ---------------------------------------------------------------------------------------

CAPTURE_ADJOINTS = [
    pytest.param(dfx.RecursiveCheckpointAdjoint(), id="recursive"),
    # BacksolveAdjoint with parameters inside the vector field by default: the
    # closure-captured parameter test below.
    pytest.param(dfx.BacksolveAdjoint(), id="backsolve", marks=pytest.mark.slow),
]


def _solve_captured(field, adjoint):
    """Constant steps and known times, saving at t1: the parameters reach the solve
    only through `field` (`args` is None)."""
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5(),
        0.0,
        1.0,
        0.05,
        jnp.array([1.2, -0.3]),
        adjoint=adjoint,
        max_steps=MAX_STEPS,
    )
    return _loss_of_ys(sol.ys)


def _closure_loss(p, adjoint=dfx.RecursiveCheckpointAdjoint()):
    return _solve_captured(lambda t, y, args: -p * y + 0.2 * jnp.sin(t), adjoint)


@functools.cache
def _closure_fd():
    return fd_gradient(jax.jit(_closure_loss), jnp.asarray(0.8))


@pytest.mark.parametrize(
    "kind, adjoint",
    [
        pytest.param(
            "python-float",
            dfx.BacksolveAdjoint(),
            id="python-float-backsolve",
            marks=pytest.mark.slow,
        ),
        pytest.param("array", dfx.BacksolveAdjoint(), id="array-backsolve"),
        pytest.param(
            "python-float",
            dfx.RecursiveCheckpointAdjoint(),
            id="python-float-recursive",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "array",
            dfx.RecursiveCheckpointAdjoint(),
            id="array-recursive",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_gradient_wrt_closure_captured_parameter(kind, adjoint):
    p = 0.8 if kind == "python-float" else jnp.asarray(0.8)
    grad = jax.jit(jax.grad(lambda p: _closure_loss(p, adjoint)))(p)
    label = f"closure/{kind}/{type(adjoint).__name__}"
    assert_close(grad, _closure_fd(), rtol=1e-6, label=label)


class _Field(eqx.Module):
    weight: jax.Array
    bias: jax.Array
    scale: float = eqx.field(static=True, default=0.5)

    def __call__(self, t, y, args):
        return jnp.tanh(self.weight @ y + self.bias) - self.scale * y


MODULE_FIELD = _Field(jnp.array([[0.3, -1.1], [0.8, 0.2]]), jnp.array([0.1, -0.4]))


@functools.cache
def _module_fd():
    primal = jax.jit(lambda f: _solve_captured(f, dfx.RecursiveCheckpointAdjoint()))
    return fd_gradient(primal, MODULE_FIELD)


@pytest.mark.parametrize("adjoint", CAPTURE_ADJOINTS)
def test_gradient_wrt_module_vector_field(adjoint):
    grad = eqx.filter_jit(eqx.filter_grad(lambda f: _solve_captured(f, adjoint)))(
        MODULE_FIELD
    )
    assert isinstance(grad, _Field)
    label = f"module/{type(adjoint).__name__}"
    assert_close(grad, _module_fd(), rtol=1e-6, label=label)


# ---------------------------------------------------------------------------------------
# 4. Higher order through RecursiveCheckpointAdjoint (the default): section 1's field,
#    the final state as a function of `args`, with constant steps. `t1` is passed in
#    traced, which keeps the solve in the general loop (not the fixed-step scan), whose
#    kind (plain, checkpointed or bounded) RecursiveCheckpointAdjoint picks from the
#    derivatives being taken.
#
#    Constant steps rather than adaptive ones: with rtol=atol=1e-10, rounding
#    differences of 1e-16 in the state (e.g. between a forward pass and its
#    recomputation in the backward pass) move the adaptive step sizes by about 1e-6
#    relative, and so the derivatives by about 1e-10 relative. Forward and reverse
#    mode then agree to about 1e-10 rather than to rounding, and central differences
#    of a gradient pick up about 1e-10 / (2 * FD_STEP) = 5e-6 of noise. With constant
#    steps every mode computes the same discrete derivative, to rounding.
# ---------------------------------------------------------------------------------------

ARGS_TANGENT = {"a": jnp.array([0.3, -1.0]), "b": jnp.array(0.7)}


def _final_state(args, t1):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_field),
        dfx.Tsit5(),
        T0,
        t1,
        DT0,
        Y0,
        args,
        max_steps=MAX_STEPS,
    )
    return sol.ys[-1]


def _final_loss_of(y):
    return y[0] ** 2 + jnp.sin(3.0 * y[1])


def _final_loss(args, t1):
    return _final_loss_of(_final_state(args, t1))


def _tree_vdot(x, y):
    leaves = zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    return sum(jnp.vdot(a, b) for a, b in leaves)


@functools.cache
def _final_primal():
    return jax.jit(_final_state)


@functools.cache
def _final_forward_grad():
    return jax.jit(jax.jacfwd(_final_loss))


@functools.cache
def _final_fd():
    """Central differences with respect to `args`: of the loss (the gradient), and of
    the forward-mode gradient (the Hessian, shape (3, 3)). The forward-mode gradient
    is itself checked against finite differences and reverse mode below."""
    t1 = jnp.asarray(T1)
    primal = _final_primal()
    grad = fd_gradient(lambda a: _final_loss_of(primal(a, t1)), ARGS)
    hessian = fd_jacobian(lambda a: _final_forward_grad()(a, t1), ARGS)
    return grad, hessian


def test_higher_order_forward_mode_matches_finite_differences():
    fd_grad, _ = _final_fd()
    t1 = jnp.asarray(T1)

    def jvp(args, t1):
        return jax.jvp(lambda a: _final_loss(a, t1), (args,), (ARGS_TANGENT,))[1]

    tangent = jax.jit(jvp)(ARGS, t1)
    jacfwd = _final_forward_grad()(ARGS, t1)
    assert jax.tree.structure(jacfwd) == jax.tree.structure(ARGS)
    assert_close(tangent, fd_grad @ _flat(ARGS_TANGENT), rtol=1e-6, label="ho/jvp")
    assert_close(jacfwd, fd_grad, rtol=1e-6, label="ho/jacfwd")
    assert_close(
        tangent, _tree_vdot(jacfwd, ARGS_TANGENT), rtol=1e-12, label="ho/jvp=jacfwd"
    )


# Forward mode against finite differences stays in the default run
# (test_higher_order_forward_mode_...), as does reverse mode (section 1).
@pytest.mark.slow
def test_higher_order_jacfwd_and_jacrev_agree():
    # The Jacobian of the final state: forward and reverse mode compute the same
    # discrete derivative, so they agree far below the finite-difference error.
    t1 = jnp.asarray(T1)
    jacfwd = jax.jit(jax.jacfwd(_final_state))(ARGS, t1)
    jacrev = jax.jit(jax.jacrev(_final_state))(ARGS, t1)
    assert jax.tree.structure(jacfwd) == jax.tree.structure(jacrev)
    assert_close(jacrev, jacfwd, rtol=1e-10, label="ho/jacrev=jacfwd")
    primal = _final_primal()
    fd = fd_jacobian(lambda a: primal(a, t1), ARGS)
    # Columns in `ravel_pytree(ARGS)` order: a[0], a[1], b.
    flat_jacfwd = np.concatenate([jacfwd["a"], jacfwd["b"][:, None]], axis=1)
    assert_close(flat_jacfwd, fd, rtol=1e-6, label="ho/jacfwd(y1)")


# grad of grad and the Hessian against the closed form in the default run:
# test_transform_detection.py::test_default_adjoint_loop_choice_and_derivative.
@pytest.mark.slow
def test_higher_order_grad_of_grad_matches_finite_differences():
    _, fd_hessian = _final_fd()

    def directional(args, t1):
        return _tree_vdot(jax.grad(_final_loss)(args, t1), ARGS_TANGENT)

    hvp = jax.jit(jax.grad(directional))(ARGS, jnp.asarray(T1))
    expected = fd_hessian @ _flat(ARGS_TANGENT)
    assert_close(hvp, expected, rtol=1e-6, label="ho/grad(grad)")


# Forward over reverse through the checkpointed loop is also in the default run, in
# the neural-ODE Hessian below.
@pytest.mark.slow
def test_higher_order_hessian_and_jacfwd_of_grad_match_finite_differences():
    _, fd_hessian = _final_fd()
    flat, unravel = ravel_pytree(ARGS)

    def flat_loss(x, t1):
        return _final_loss(unravel(x), t1)

    t1 = jnp.asarray(T1)
    hessian = jax.jit(jax.hessian(flat_loss))(flat, t1)
    jacfwd_grad = jax.jit(jax.jacfwd(jax.grad(flat_loss)))(flat, t1)
    jacrev_grad = jax.jit(jax.jacrev(jax.grad(flat_loss)))(flat, t1)
    rev_over_fwd = jax.jit(jax.jacrev(jax.jacfwd(flat_loss)))(flat, t1)
    assert_close(hessian, fd_hessian, rtol=1e-6, label="ho/hessian")
    assert_close(hessian, hessian.T, rtol=1e-10, label="ho/hessian symmetric")
    assert_close(jacfwd_grad, hessian, rtol=1e-10, label="ho/jacfwd(grad)=hessian")
    assert_close(jacrev_grad, hessian, rtol=1e-10, label="ho/jacrev(grad)=hessian")
    assert_close(rev_over_fwd, hessian, rtol=1e-10, label="ho/jacrev(jacfwd)=hessian")


# ---------------------------------------------------------------------------------------
# 5. Hessian of a small neural-ODE loss with respect to all its parameters
#    (forward over reverse through RecursiveCheckpointAdjoint's checkpointed loop)
# ---------------------------------------------------------------------------------------

NODE_TS = jnp.array([0.25, 0.5, 0.75, 1.0])


class _NeuralField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def _neural_loss_fn(controller, saveat):
    model = _NeuralField(
        eqx.nn.MLP(2, 2, width_size=4, depth=1, activation=jnp.tanh, key=jr.key(0))
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat_params, unravel = ravel_pytree(params)
    target = jnp.array([0.3, -0.6])
    if controller == "pid":
        stepsize_controller, dt0 = dfx.PIDController(rtol=TOL, atol=TOL), None
    else:
        stepsize_controller, dt0 = dfx.ConstantStepSize(), 0.05

    def loss(flat):
        field = eqx.combine(unravel(flat), static)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            1.0,
            dt0,
            jnp.array([0.5, 1.0]),
            saveat=saveat,
            stepsize_controller=stepsize_controller,
            max_steps=MAX_STEPS,
        )
        return jnp.sum((sol.ys - target) ** 2)

    return loss, flat_params


@pytest.mark.parametrize(
    "controller, saveat",
    [
        # Saving along the trajectory (the inner save loop): constant steps, so that
        # the comparison is not blurred by the adaptive steps (see section 4).
        pytest.param(
            "constant", dfx.SaveAt(ts=NODE_TS), id="constant-ts", marks=pytest.mark.slow
        ),
        # Adaptive steps, final state only: the steps move with the parameters, but
        # at these tolerances that changes the gradient by far less than 1e-6.
        pytest.param("pid", dfx.SaveAt(t1=True), id="pid-t1", marks=pytest.mark.slow),
    ],
)
def test_neural_ode_hessian_is_symmetric_and_matches_finite_differences(
    controller, saveat
):
    loss, flat = _neural_loss_fn(controller, saveat)
    assert flat.size == 22  # 2 -> 4 -> 2 with biases
    hessian = jax.jit(jax.hessian(loss))(flat)
    assert hessian.shape == (flat.size, flat.size)
    scale = float(jnp.max(jnp.abs(hessian)))
    assert scale > 1e-3
    assert np.all(np.isfinite(hessian))
    # Symmetric: absolute asymmetry relative to the Hessian's largest entry.
    assert_close(hessian, hessian.T, rtol=1e-10, floor=scale, label="node/symmetric")
    # Central differences of the gradient, here computed in forward mode (cheaper to
    # compile; forward and reverse gradients agree to rounding, see section 4).
    fd = fd_jacobian(jax.jit(jax.jacfwd(loss)), flat)
    label = f"node/{controller}/hessian-fd"
    assert_close(hessian, fd, rtol=1e-6, floor=1e-3 * scale, label=label)


# ---------------------------------------------------------------------------------------
# 6. ImplicitAdjoint: steady state of dy/dt = a - b y^3, y* = (a / b)^(1/3)
# ---------------------------------------------------------------------------------------

STEADY_ARGS = {"a": jnp.array([2.0, 0.5]), "b": jnp.array([1.5, 0.8])}
STEADY_Y0 = jnp.array([0.2, 1.7])
STEADY_WEIGHTS = jnp.array([1.0, -3.0])


def _cubic(t, y, args):
    return args["a"] - args["b"] * y**3


def _steady_state(y0, args, saveat=dfx.SaveAt(t1=True)):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_cubic),
        dfx.Tsit5(),
        0.0,
        jnp.inf,
        0.1,
        y0,
        args,
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
        # Looser than the solver: at rtol=atol=1e-10, the explicit solver's steps near
        # the steady state grow to its stability limit, where |dy/dt| hovers around
        # 1e-9 and the default (controller) tolerance would never be met.
        event=dfx.Event(dfx.steady_state_event(rtol=1e-8, atol=1e-8)),
        adjoint=dfx.ImplicitAdjoint(),
        max_steps=4096,
    )
    return sol.ys[-1]


def _steady_closed_form(args):
    """y* and its derivatives: dy*/da = 1 / (3 b y*^2), dy*/db = -y* / (3 b)."""
    root = (args["a"] / args["b"]) ** (1 / 3)
    return root, 1 / (3 * args["b"] * root**2), -root / (3 * args["b"])


def test_implicit_steady_state_and_reverse_mode_match_closed_form():
    root, d_a, d_b = _steady_closed_form(STEADY_ARGS)
    steady = _steady_state(STEADY_Y0, STEADY_ARGS)
    assert_close(steady, root, rtol=1e-7, label="imp/root")

    def loss(y0, args):
        return jnp.vdot(STEADY_WEIGHTS, _steady_state(y0, args))

    g_y0, g_args = jax.jit(jax.grad(loss, argnums=(0, 1)))(STEADY_Y0, STEADY_ARGS)
    expected = {"a": STEADY_WEIGHTS * d_a, "b": STEADY_WEIGHTS * d_b}
    assert_close(g_args, expected, rtol=1e-6, label="imp/grad")
    # The steady state does not depend on where the solve started.
    assert_close(g_y0, jnp.zeros(2), rtol=1e-12, floor=1.0, label="imp/grad-y0")


def test_implicit_forward_mode_matches_closed_form():
    _, d_a, d_b = _steady_closed_form(STEADY_ARGS)
    jac = jax.jit(jax.jacfwd(_steady_state, argnums=(0, 1)))(STEADY_Y0, STEADY_ARGS)
    jac_y0, jac_args = jac
    assert_close(jac_args["a"], jnp.diag(d_a), rtol=1e-6, label="imp/jacfwd-a")
    assert_close(jac_args["b"], jnp.diag(d_b), rtol=1e-6, label="imp/jacfwd-b")
    assert_close(
        jac_y0, jnp.zeros((2, 2)), rtol=1e-12, floor=1.0, label="imp/jacfwd-y0"
    )


def test_implicit_adjoint_rejects_saving_at_ts():
    with pytest.raises(ValueError, match="ImplicitAdjoint.*SaveAt\\(t1=True\\)"):
        _steady_state(STEADY_Y0, STEADY_ARGS, saveat=dfx.SaveAt(ts=jnp.array([0.5])))


# ---------------------------------------------------------------------------------------
# 7. BacksolveAdjoint misuse
# ---------------------------------------------------------------------------------------


def _backsolve_solve(dt0=0.1, **kwargs):
    kwargs.setdefault("saveat", dfx.SaveAt(t1=True))
    kwargs.setdefault("stepsize_controller", dfx.PIDController(rtol=1e-6, atol=1e-6))
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        0.0,
        1.0,
        dt0,
        jnp.array([1.0]),
        adjoint=dfx.BacksolveAdjoint(),
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(
            dict(saveat=dfx.SaveAt(steps=True)), r"SaveAt\(steps=True\)", id="steps"
        ),
        pytest.param(
            dict(saveat=dfx.SaveAt(dense=True)), r"SaveAt\(dense=True\)", id="dense"
        ),
        pytest.param(
            dict(
                saveat=dfx.SaveAt(
                    subs=[dfx.SubSaveAt(t1=True), dfx.SubSaveAt(steps=True)]
                )
            ),
            r"SaveAt\(steps=True\).*any `SubSaveAt`",
            id="steps-in-subs",
        ),
        pytest.param(
            dict(event=dfx.Event(lambda t, y, args, **kw: y[0] - 0.5)),
            r"does not support events",
            id="event",
        ),
        pytest.param(
            dict(stepsize_controller=dfx.StepTo(jnp.linspace(0.0, 1.0, 5)), dt0=None),
            r"cannot run `StepTo\(ts\)` backwards",
            id="step-to",
        ),
    ],
)
def test_backsolve_rejects_unsupported_problems(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _backsolve_solve(**kwargs)


@pytest.mark.slow
def test_backsolve_step_to_runs_with_a_backward_controller():
    # The fix the StepTo error suggests: give the backward solve its own controller.
    adjoint = dfx.BacksolveAdjoint(
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10)
    )

    def loss(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            y0,
            saveat=dfx.SaveAt(t1=True),
            stepsize_controller=dfx.StepTo(jnp.linspace(0.0, 1.0, 41)),
            adjoint=adjoint,
        ).ys[-1, 0]

    grad = jax.grad(loss)(jnp.array([1.0]))
    assert_close(grad, jnp.exp(-1.0), rtol=1e-6, label="backsolve/step-to")


def test_backsolve_rejects_unknown_keyword():
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*\['rtol'\]"):
        dfx.BacksolveAdjoint(rtol=1e-3)


# ---------------------------------------------------------------------------------------
# 8. BacksolveAdjoint under vmap, and in float32 (section 1's problem)
# ---------------------------------------------------------------------------------------

BATCH_Y0 = jnp.array([[1.0, -0.5], [0.3, 0.9], [-1.2, 0.4]])
VMAP_CONFIG = ("backsolve-seminorm", "pid")


def test_backsolve_vmap_over_y0_matches_loop():
    grad = _derivative_fn(*VMAP_CONFIG)
    _, args, t0, t1, ts = _inputs()
    batched = jax.jit(jax.vmap(grad, (0, None, None, None, None)))(
        BATCH_Y0, args, t0, t1, ts
    )
    for i, y0 in enumerate(BATCH_Y0):
        member = jax.tree.map(lambda x, i=i: x[i], batched)
        # Each member takes its own adaptive steps inside the batch. Not to rounding:
        # batched arithmetic may round differently, which moves the adaptive steps
        # (see section 4) and the gradients by about 1e-10.
        assert_close(member, grad(y0, args, t0, t1, ts), rtol=1e-8, label=f"vmap/{i}")


def _field_keeping_dtype(t, y, args):
    # `_field` evaluated in the state's dtype (the suite runs under strict dtype
    # promotion, so the time is cast explicitly).
    return _field(jnp.asarray(t).astype(y.dtype), y, args)


@pytest.mark.parametrize(
    "times", [pytest.param("python-float", marks=pytest.mark.slow), "float32"]
)
def test_backsolve_float32_is_finite_and_close_to_float64(times):
    y0 = Y0.astype(jnp.float32)
    args = jax.tree.map(lambda x: x.astype(jnp.float32), ARGS)
    # Float32 save times: a float64 time anywhere makes the times, and so (as in
    # Diffrax) the state, float64.
    ts = TS.astype(jnp.float32)
    if times == "float32":
        t0, t1 = np.float32(T0), np.float32(T1)
    else:
        t0, t1 = T0, T1

    def loss(y0, args):
        adjoint = dfx.BacksolveAdjoint()
        return _loss_of_ys(
            _solve_ys(
                adjoint, "pid-float32", y0, args, t0, t1, ts, _field_keeping_dtype
            )
        )

    g32 = jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, args)
    for leaf in jax.tree.leaves(g32):
        assert leaf.dtype == jnp.float32
    g64 = _derivatives(*VMAP_CONFIG)[:2]
    # float32 rounding and the 1e-6 solver tolerance: agreement to about 1e-5.
    assert_close(g32, g64, rtol=1e-4, label=f"float32/{times}")


# ---------------------------------------------------------------------------------------
# 9. BacksolveAdjoint with SaveAt(fn=...) and SaveAt(subs=...) (section 1's problem):
#    each output's cotangent is pulled back through its `fn` at its save times
# ---------------------------------------------------------------------------------------


def _save_fn(t, y, args):
    # Depends on the time, the state and `args`, and returns a PyTree, so that every
    # part of the pullback through `fn` is exercised.
    return {"u": jnp.sin(y) * t, "v": y[0] * y[1] * args["b"]}


def _fn_saveat(kind, ts, weight):
    def fn(t, y, args):
        # `weight` is captured by the closure: its gradient comes through `fn` alone.
        out = _save_fn(t, y, args)
        return {"u": out["u"] * weight, "v": out["v"]}

    if kind == "fn":
        return dfx.SaveAt(t0=True, ts=ts, t1=True, fn=fn)
    # Two outputs whose save times interleave: the states at t1 and at t0, and `fn`
    # at ts (and at a time in between, from a second `fn` output).
    return dfx.SaveAt(
        subs={
            "state": dfx.SubSaveAt(t0=True, t1=True),
            "fn": dfx.SubSaveAt(ts=ts, fn=fn),
            "mid": dfx.SubSaveAt(ts=ts[1:2] + 0.1, fn=lambda t, y, args: y * t),
        }
    )


def _fn_loss(kind, adjoint, y0, args, t0, t1, ts, weight):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_field),
        dfx.Tsit5(),
        t0,
        t1,
        None,
        y0,
        args,
        saveat=_fn_saveat(kind, ts, weight),
        stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
        adjoint=adjoint,
        max_steps=MAX_STEPS,
    )
    total = jnp.zeros(())
    for i, leaf in enumerate(jax.tree.leaves(sol.ys)):
        weights = jnp.arange(1.0, leaf.size + 1.0).reshape(leaf.shape) / leaf.size
        total = total + jnp.sum(weights * (leaf + 0.3 * i) ** 2)
    # The saved times are outputs too.
    return total + 0.1 * sum(jnp.sum(t**2) for t in jax.tree.leaves(sol.ts))


FN_KINDS = [
    pytest.param("fn", False, id="fn", marks=pytest.mark.slow),
    pytest.param("subs", False, id="subs", marks=pytest.mark.slow),
    pytest.param("subs", True, id="subs-backwards", marks=pytest.mark.slow),
]


def _fn_inputs(backwards):
    if backwards:  # from T1 back to T0, saving at the same times in reverse order
        return (Y0, ARGS, jnp.asarray(T1), jnp.asarray(T0), TS[::-1], jnp.asarray(1.5))
    return (Y0, ARGS, jnp.asarray(T0), jnp.asarray(T1), TS, jnp.asarray(1.5))


@pytest.mark.parametrize("kind, backwards", FN_KINDS)
def test_backsolve_fn_and_subs_gradients_match_finite_differences(kind, backwards):
    inputs = _fn_inputs(backwards)
    argnums = tuple(range(len(inputs)))
    backsolve = dfx.BacksolveAdjoint(
        stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL)
    )

    def loss(adjoint):
        return lambda *x: _fn_loss(kind, adjoint, *x)

    got = jax.jit(jax.grad(loss(backsolve), argnums))(*inputs)
    exact = jax.jit(jax.grad(loss(dfx.RecursiveCheckpointAdjoint()), argnums))(*inputs)
    primal = jax.jit(loss(dfx.RecursiveCheckpointAdjoint()))
    names = ("y0", "args", "t0", "t1", "ts", "weight")
    for i, name in enumerate(names):

        def loss_in(x, i=i):
            return primal(*inputs[:i], x, *inputs[i + 1 :])

        fd = fd_gradient(loss_in, inputs[i])
        label = f"{kind}/{'bwd' if backwards else 'fwd'}/{name}"
        assert_close(got[i], fd, rtol=1e-6, label=label)
        assert_close(got[i], exact[i], rtol=1e-6, label=label + " vs default")


def test_backsolve_fn_output_structure_and_values_are_unchanged():
    # The forward solve saves the states beside `fn`'s outputs; the solution holds
    # only what was asked for, with the values the default adjoint gives.
    inputs = _fn_inputs(False)
    saveat = _fn_saveat("subs", TS, 1.5)

    def solve(adjoint, y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(_field),
            dfx.Tsit5(),
            T0,
            T1,
            None,
            y0,
            ARGS,
            saveat=saveat,
            stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
            adjoint=adjoint,
            max_steps=MAX_STEPS,
        )

    def outputs(y0):
        sol = solve(dfx.BacksolveAdjoint(), y0)
        return sol.ys, sol.ts

    # Under `jax.vjp`, so that the forward rule (which saves the states) runs.
    ys, ts = jax.jit(lambda y0: jax.vjp(outputs, y0)[0])(inputs[0])
    expected = solve(dfx.RecursiveCheckpointAdjoint(), inputs[0])
    assert jax.tree.structure(ys) == jax.tree.structure(expected.ys)
    for a, b in zip(jax.tree.leaves(ys), jax.tree.leaves(expected.ys), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(ts), jax.tree.leaves(expected.ts), strict=True):
        np.testing.assert_array_equal(a, b)
