"""A small solve's loop compiled into one CPU kernel (`diffeqx/_solve/kernel.py`).

Where the loop's operations allow, diffeqx asks XLA to compile a plain (not batched,
not differentiated) solve's whole loop into one kernel. It must give the usual
program's answer (to rounding in general: the kernel may sum in another order, and
an adaptive solve's steps follow the last digits of its error estimate; see the
Performance page), and must never ask for it where XLA's single-kernel emitter
cannot compile the loop (a compile error would be a solve that cannot run at all).
Each case here compiles a solve with and without the request and compares the
results bit for bit (these cases agree to the bit), and checks whether the request
was made: for every operation the emitter is known to reject, that it was not."""

import os

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import diffeqx as dfx
from _sde import spark_on_a_tree
from _xla_defaults import run_pytest_with_xla_defaults
from diffeqx._solve import kernel

_MARK = 'inlineable="false"'


def _compile(fn, *args, enabled=True):
    previous = kernel.enabled
    kernel.enabled = enabled
    # The request is made while tracing, and `diffeqsolve` keeps its traces.
    jax.clear_caches()
    try:
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    finally:
        kernel.enabled = previous


def _check(fn, *args, one_kernel: bool, ulps: int = 0):
    """Compiles `fn` both ways; the same results bit for bit (or, given `ulps`,
    floating-point results within that many units in the last place of each value,
    or of 1 for values below it), and one kernel or not as expected."""
    with_kernel = _compile(fn, *args)
    without = _compile(fn, *args, enabled=False)
    assert (_MARK in with_kernel.as_text()) is one_kernel
    assert _MARK not in without.as_text()
    got, want = with_kernel(*args), without(*args)
    for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if ulps and np.issubdtype(b.dtype, np.floating):
            unit = np.spacing(np.maximum(np.abs(b), 1).astype(b.dtype))
            assert np.all(np.abs(a - b) <= ulps * unit), (a, b)
        else:
            np.testing.assert_array_equal(a, b)
    return got


def _lotka_volterra(t, y, args):
    a, b, c, d = args
    prey, predator = y[0], y[1]
    return jnp.stack(
        [a * prey - b * prey * predator, c * prey * predator - d * predator]
    )


_LV_ARGS = jnp.array([1.5, 1.0, 1.0, 3.0])
_PID = dfx.PIDController(rtol=1e-7, atol=1e-9)


def _solve(field, solver, y0, args=None, *, saveat=None, **kwargs):
    kwargs.setdefault("stepsize_controller", _PID)
    dtype = jtu.tree_leaves(y0)[0].dtype  # times in the state's precision
    return dfx.diffeqsolve(
        dfx.ODETerm(field),
        solver,
        t0=jnp.asarray(0.0, dtype),
        t1=jnp.asarray(5.0, dtype),
        dt0=jnp.asarray(0.01, dtype),
        y0=y0,
        args=args,
        saveat=dfx.SaveAt(t1=True) if saveat is None else saveat,
        **kwargs,
    )


def _outputs(sol):
    return sol.ts, sol.ys, sol.stats["num_steps"], sol.result._value


@pytest.mark.parametrize(
    "solver", [dfx.Tsit5(), dfx.Dopri5(), dfx.Dopri8(), dfx.Bosh3(), dfx.Heun()]
)
def test_explicit_solvers_run_as_one_kernel_with_the_same_answer(solver):
    def fn(y0, args):
        saveat = dfx.SaveAt(ts=jnp.linspace(0.0, 5.0, 21, dtype=y0.dtype))
        sol = _solve(
            _lotka_volterra, solver, y0, args, saveat=saveat, max_steps=100_000
        )
        return _outputs(sol)

    ts, ys, steps, result = _check(
        fn, jnp.array([10.0, 10.0]), _LV_ARGS, one_kernel=True
    )
    assert result == 0 and steps > 20
    # And the right answer: Lotka-Volterra conserves this quantity.
    a, b, c, d = np.asarray(_LV_ARGS)
    ys = np.asarray(ys)
    invariant = (
        c * ys[:, 0] - d * np.log(ys[:, 0]) + b * ys[:, 1] - a * np.log(ys[:, 1])
    )
    np.testing.assert_allclose(invariant, invariant[0], rtol=1e-5)


@pytest.mark.parametrize(
    "saveat",
    [
        dfx.SaveAt(steps=True),
        dfx.SaveAt(t0=True, t1=True),
        dfx.SaveAt(dense=True),
        dfx.SaveAt(subs=[dfx.SubSaveAt(t1=True), dfx.SubSaveAt(steps=True)]),
    ],
    ids=["steps", "t0-t1", "dense", "subs"],
)
def test_saves_of_every_kind_in_one_kernel(saveat):
    def fn(y0, args):
        sol = _solve(_lotka_volterra, dfx.Tsit5(), y0, args, saveat=saveat)
        out = [sol.ts, sol.ys, sol.stats["num_steps"]]
        if saveat.dense:
            out.append(sol.evaluate(jnp.asarray(2.5, y0.dtype)))
        return out

    _check(fn, jnp.array([10.0, 10.0]), _LV_ARGS, one_kernel=True)


def test_pytree_state_float32_and_a_matrix_vector_product():
    matrix = jnp.array([[-0.5, 1.0], [-1.0, -0.5]], dtype=jnp.float32)

    def field(t, y, args):
        return {"x": matrix @ y["x"], "s": -y["s"]}

    def fn(y0):
        sol = _solve(
            field,
            dfx.Tsit5(),
            y0,
            stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-6),
        )
        return sol.ys, sol.stats["num_steps"]

    y0 = {"x": jnp.array([1.0, 0.0], jnp.float32), "s": jnp.array(2.0, jnp.float32)}
    ys, _ = _check(fn, y0, one_kernel=True)
    assert ys["x"].dtype == jnp.float32
    np.testing.assert_allclose(ys["s"][-1], 2.0 * np.exp(-5.0), rtol=1e-4)


def test_an_event_in_one_kernel():
    """The event is located in the kernel too. With XLA's default code generator
    the usual program computes Newton's iterations with other roundings (the kernel
    is compiled as with the older emitters, with which the two agree to the bit):
    the located time then differs by a few units in the last place (up to 15
    measured, within the root finder's tolerance of 1e-10)."""

    def field(t, y, args):
        return jnp.stack([y[1], jnp.asarray(-9.81, y.dtype)])

    def fn(y0):
        event = dfx.Event(
            lambda t, y, args, **kw: y[0], optx.Newton(rtol=1e-10, atol=1e-10)
        )
        sol = _solve(field, dfx.Tsit5(), y0, event=event)
        return sol.ts, sol.ys, sol.event_mask

    defaults = os.environ.get("DIFFEQX_TEST_XLA_DEFAULTS") is not None
    ts, ys, mask = _check(
        fn, jnp.array([10.0, 0.0]), one_kernel=True, ulps=64 if defaults else 0
    )
    assert bool(mask)
    np.testing.assert_allclose(ts[-1], np.sqrt(2 * 10.0 / 9.81), rtol=1e-6)


def test_an_event_whose_linear_solve_is_a_factorisation_is_located_after():
    """A root finder whose linear solves take a factorisation (a LAPACK call, which
    the kernel cannot compile): the loop is still one kernel, the event located
    after it, with the usual program's values to the bit."""

    def field(t, y, args):
        return jnp.stack([y[1], jnp.asarray(-9.81, y.dtype)])

    def fn(y0):
        finder = optx.Newton(rtol=1e-10, atol=1e-10, linear_solver=lx.LU())
        event = dfx.Event(lambda t, y, args, **kw: y[0], finder)
        sol = _solve(field, dfx.Tsit5(), y0, event=event)
        return sol.ts, sol.ys, sol.event_mask

    y0 = jnp.array([10.0, 0.0])
    text = _compile(fn, y0).as_text()
    assert "lapack" in text.lower()  # the factorisation, outside the kernel
    ts, _, mask = _check(fn, y0, one_kernel=True)
    assert bool(mask)
    np.testing.assert_allclose(ts[-1], np.sqrt(2 * 10.0 / 9.81), rtol=1e-6)


def test_dense_output_with_an_event_located_by_bisection_in_one_kernel():
    def field(t, y, args):
        return jnp.stack([y[1], -y[0]])

    def fn(y0):
        event = dfx.Event(
            lambda t, y, args, **kw: y[0] - 0.5,
            optx.Bisection(rtol=1e-10, atol=1e-10),
        )
        sol = _solve(
            field, dfx.Dopri5(), y0, event=event, saveat=dfx.SaveAt(t1=True, dense=True)
        )
        return sol.ts[-1], sol.evaluate(sol.ts[-1] / 2)

    t1, y_half = _check(fn, jnp.array([1.0, 0.0]), one_kernel=True)
    np.testing.assert_allclose(t1, np.arccos(0.5), rtol=1e-6)
    np.testing.assert_allclose(y_half[0], np.cos(t1 / 2), rtol=1e-5)


def test_pytree_state_with_a_boolean_event_in_one_kernel():
    def field(t, y, args):
        return {"a": -y["a"], "b": jnp.stack([y["b"][1], -y["b"][0]])}

    def fn(y0):
        event = dfx.Event(lambda t, y, args, **kw: y["a"] < 0.25)
        sol = _solve(field, dfx.Tsit5(), y0, event=event, saveat=dfx.SaveAt(steps=True))
        return sol.ts, sol.ys, sol.event_mask, sol.stats["num_steps"]

    y0 = {"a": jnp.asarray(1.0), "b": jnp.array([0.0, 1.0])}
    ts, _, mask, steps = _check(fn, y0, one_kernel=True)
    assert bool(mask)
    # The step in which the condition turns true ends the solve.
    assert np.asarray(ts)[int(steps) - 1] >= np.log(4.0)


def test_a_boolean_event_given_a_root_finder_with_saves_at_times_in_one_kernel():
    """A root finder on an event of boolean conditions only has no root to find.
    Traced anyway (behind a predicate XLA found constant), with saves at requested
    times, the kernel aborted the process in XLA's code generator (the "explicit
    index" check failure, found by the events sweep on 2026-12-07)."""

    def field(t, y, args):
        return jnp.stack([y[1], -y[0]])

    def fn(y0):
        event = dfx.Event(
            lambda t, y, args, **kw: y[0] < 0.5,
            root_finder=optx.Newton(rtol=1e-10, atol=1e-10),
        )
        saveat = dfx.SaveAt(ts=jnp.array([0.0, 0.8, 3.6]))
        sol = _solve(field, dfx.Tsit5(), y0, event=event, saveat=saveat)
        return sol.ts, sol.ys, sol.event_mask, sol.stats["num_steps"]

    ts, ys, mask, steps = _check(fn, jnp.array([1.0, 0.0]), one_kernel=True)
    assert bool(mask)
    # x = cos t: saved at 0 and 0.8 (x > 0.5 until pi/3); the solve ends before 3.6.
    np.testing.assert_allclose(np.asarray(ys)[:2, 0], np.cos([0.0, 0.8]), rtol=1e-6)
    assert np.asarray(ts)[2] == np.inf and int(steps) > 1


def test_an_adaptive_sde_on_a_brownian_tree_in_one_kernel():
    """An adaptive SPaRK solve of one path on a `VirtualBrownianTree` with space-time
    Lévy area (the tree's queries in the loop: hashes, a scan down its 19 levels,
    two scans up) runs as one kernel.

    Truth: with no drift and additive noise the solution is `y0 + W(5) - W(0)`
    whatever the steps, so the tree queried inside the kernel must sum to the tree's
    own increment. With general noise the answer is not the usual program's bit
    for bit: the tree's values may round differently in a differently compiled
    program (as documented), and an adaptive SDE solve's accepted steps follow the
    last bits of its error estimate; both are solutions of the same path, within
    the method's strong error (order 1/2 here)."""
    key = jax.random.key(0)
    y0 = jnp.array([1.0, 0.5, -0.3, 2.0])

    def additive(key):
        sol, bm = spark_on_a_tree(
            key,
            lambda t, y, args: jnp.zeros_like(y),
            lambda t, y, args: jnp.eye(4),
            y0,
            dtmax=0.05,
            saveat=dfx.SaveAt(steps=True),
            max_steps=256,
        )
        return sol.ys[sol.stats["num_steps"] - 1], sol.stats["num_steps"], bm

    compiled = _compile(additive, key)
    assert _MARK in compiled.as_text()
    y1, steps, bm = compiled(key)
    assert steps >= 100  # steps of at most 0.05: the loop ran
    np.testing.assert_allclose(y1, y0 + bm.evaluate(0.0, 5.0), rtol=0, atol=1e-12)

    def general(key):
        sol, _ = spark_on_a_tree(
            key,
            lambda t, y, args: -y + jnp.sin(y),
            lambda t, y, args: 0.3 * jnp.outer(jnp.cos(y), y),
            y0,
        )
        return sol.ys[-1], sol.stats["num_steps"], sol.result._value

    with_kernel, without = _compile(general, key), _compile(general, key, enabled=False)
    assert _MARK in with_kernel.as_text() and _MARK not in without.as_text()
    (y_k, steps_k, result_k), (y_u, steps_u, result_u) = with_kernel(key), without(key)
    assert result_k == result_u == 0
    assert abs(int(steps_k) - int(steps_u)) <= 0.25 * int(steps_u)
    np.testing.assert_allclose(y_k, y_u, rtol=0, atol=0.05)


def test_a_failed_solve_in_one_kernel_keeps_its_result_code():
    def fn(y0, args):
        sol = _solve(_lotka_volterra, dfx.Tsit5(), y0, args, max_steps=7, throw=False)
        return sol.ys, sol.result._value, sol.stats["num_steps"]

    _, result, steps = _check(fn, jnp.array([10.0, 10.0]), _LV_ARGS, one_kernel=True)
    assert result == dfx.RESULTS.max_steps_reached._value and steps == 7


@pytest.mark.parametrize(
    "what",
    [
        "matrix product",
        "sort",
        "scatter of several indices",
        "many operations",
        "large matrix-vector product",
        "large state",
        "implicit",
    ],
)
def test_loops_the_emitter_cannot_compile_take_the_usual_path(what):
    matrix = jnp.eye(3) * -0.5
    solver = dfx.Tsit5()
    y0 = jnp.array([1.0, 2.0, 3.0])
    if what == "matrix product":

        def field(t, y, args):
            return (matrix @ jnp.outer(y, y) @ matrix).sum(axis=1) * 0.01 - y

    elif what == "sort":

        def field(t, y, args):
            return -jnp.sort(y)

    elif what == "scatter of several indices":

        def field(t, y, args):
            return (
                jnp.zeros_like(y)
                .at[jnp.array([0, 1, 2, 1])]
                .add(-y[jnp.array([0, 1, 2, 1])])
            )

    elif what == "many operations":

        def field(t, y, args):
            z = y
            for k in range(100):
                z = jnp.sin(z * (1.0 + 0.001 * k)) - 0.05 * z * z
            return z - y

    elif what == "large matrix-vector product":
        # A 40 by 40 matrix (over 1,024 elements) with saves at times: compiled as
        # one kernel, XLA's code generator aborted the process (an "explicit
        # index" check failure) with its default settings, measured 2026-12-06.
        matrix = jax.random.normal(jax.random.key(3), (40, 40)) / 16.0
        up = jax.random.normal(jax.random.key(5), (40, 3))

        def field(t, y, args):
            return up.T @ jnp.tanh(matrix @ jnp.tanh(up @ y)) * 0.1 - y

    elif what == "large state":
        y0 = jnp.linspace(1.0, 2.0, 5000)

        def field(t, y, args):
            return -y

    else:
        solver = dfx.Kvaerno3()

        def field(t, y, args):
            return -y

    saveat = None
    if what == "large matrix-vector product":
        saveat = dfx.SaveAt(ts=jnp.linspace(0.0, 5.0, 20))

    def fn(y0):
        sol = _solve(field, solver, y0, saveat=saveat)
        return sol.ys, sol.stats["num_steps"]

    _check(fn, y0, one_kernel=False)


def test_not_under_grad_an_ode_vmap_a_progress_meter_or_constant_steps():
    def loss(y0, args):
        return _solve(_lotka_volterra, dfx.Tsit5(), y0, args).ys.sum()

    y0 = jnp.array([10.0, 10.0])

    def constant_steps(y0, args):
        # (Constant steps keep the usual loop: see `run_loop`.)
        return _solve(
            _lotka_volterra,
            dfx.Tsit5(),
            y0,
            args,
            stepsize_controller=dfx.ConstantStepSize(),
            saveat=dfx.SaveAt(steps=True),
        ).ys

    for fn, args in [
        (constant_steps, (y0, _LV_ARGS)),
        (jax.grad(loss), (y0, _LV_ARGS)),
        # An ODE under `jax.vmap`: the batched loop (see `kernel.call_per_member`).
        (jax.vmap(loss, in_axes=(0, None)), (jnp.stack([y0, y0 + 1]), _LV_ARGS)),
        (
            lambda y0, args: (
                _solve(
                    _lotka_volterra,
                    dfx.Tsit5(),
                    y0,
                    args,
                    progress_meter=dfx.TextProgressMeter(),
                ).ys
            ),
            (y0, _LV_ARGS),
        ),
    ]:
        assert _MARK not in _compile(fn, *args).as_text()


def _trace(fn, *args):
    return jax.make_jaxpr(fn)(*args).jaxpr


def test_the_check_of_a_loops_operations():
    x = jnp.arange(6.0)
    assert kernel.fits(_trace(lambda x: jnp.tanh(x).sum() * x, x))
    assert kernel.fits(_trace(lambda x: x.at[2].set(0.0), x))
    assert kernel.fits(_trace(lambda x: jnp.ones((6, 6)) @ x + x, x))
    assert not kernel.fits(_trace(lambda x: x.at[jnp.array([1, 2])].add(1.0), x))
    assert not kernel.fits(_trace(lambda x: jnp.outer(x, x) @ jnp.outer(x, x), x))
    assert not kernel.fits(_trace(jnp.sort, x))
    assert not kernel.fits(_trace(lambda x: jnp.fft.fft(x).real, x))
    assert not kernel.fits(_trace(lambda x: jnp.linalg.solve(jnp.eye(6), x), x))
    assert not kernel.fits(_trace(lambda x: jax.pure_callback(np.sin, x, x), x))
    assert not kernel.fits(_trace(lambda x: jnp.tile(x, 1000), x))
    # Nested bodies are checked too.
    assert not kernel.fits(
        _trace(lambda x: jax.lax.cond(x[0] > 0, jnp.sort, lambda x: x, x), x)
    )
    assert not kernel.fits(
        _trace(lambda x: jax.lax.fori_loop(0, 3, lambda i, x: jnp.sort(x), x), x)
    )


@pytest.mark.skipif(
    os.environ.get("DIFFEQX_TEST_XLA_DEFAULTS") is not None,
    reason="already running with XLA's defaults",
)
@pytest.mark.parametrize(
    "which",
    ["kernels", pytest.param("all", marks=pytest.mark.slow)],
)
def test_one_kernel_cases_with_xlas_default_code_generator(which):
    """The test run compiles with XLA's older CPU emitters (`conftest.py`); users get
    XLA's defaults, where these cases must compile and agree too. The default run
    leaves out the cases that only check which path a solve takes (decided before
    anything is compiled); the slow run takes every case, slow ones included."""
    selected = ["-k", "not default_code_generator"]
    if which == "kernels":
        selected[1] += "".join(f" and not {name}" for name in _ROUTING_ONLY)
    else:
        selected += ["-m", "slow or not slow"]
    done = run_pytest_with_xla_defaults("tests/test_one_kernel.py", *selected)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


# Cases that check which path a solve takes, and what a transformation of it does
# (their kernels are those of the other cases), and those that take the usual path
# (no kernel of this kind; the usual programs under XLA's defaults: the slow run
# and `test_xla_defaults.py`).
_ROUTING_ONLY = (
    "test_member_by_member_is_differentiated_after_being_traced",
    "test_members_that_do_not_fit_one_kernel_and_ode_batches_run_batched",
    "test_not_under_grad_an_ode_vmap_a_progress_meter_or_constant_steps",
    "test_transformations_of_an_already_traced_solve",
    "test_loops_the_emitter_cannot_compile_take_the_usual_path",
)


def test_transformations_of_an_already_traced_solve():
    """`jax.vmap` and `jax.grad` of a program already traced (and cached) transform it
    without tracing it again: the batched program must not ask for one kernel (its
    operations were never checked), and both must give the right answers."""

    def final(a):
        sol = _solve(lambda t, y, a: -a * y, dfx.Tsit5(), jnp.ones(2), a)
        return sol.ys[-1, 0]

    solve = jax.jit(final)
    a = jnp.asarray(0.3)
    assert _MARK in solve.lower(a).compile().as_text()
    np.testing.assert_allclose(solve(a), np.exp(-1.5), rtol=1e-7)
    program = jax.extend.core.jaxpr_as_fun(jax.make_jaxpr(final)(a))
    batch = jnp.array([0.3, 0.5, 0.7])
    batched = jax.jit(jax.vmap(lambda a: program(a)[0]))
    assert _MARK not in batched.lower(batch).compile().as_text()
    np.testing.assert_allclose(batched(batch), np.exp(-5.0 * batch), rtol=1e-7)
    np.testing.assert_allclose(jax.grad(solve)(a), -5.0 * np.exp(-1.5), rtol=1e-6)


def _members_alone(fn, in_axes, *args):
    """`jax.vmap(fn, in_axes)(*args)` computed member by member, each alone (one
    compiled program, called once per member)."""
    size = next(
        jtu.tree_leaves(x)[0].shape[0]
        for x, axis in zip(args, in_axes, strict=True)
        if axis == 0
    )
    alone = jax.jit(fn)

    def member(i):
        return [
            x if axis is None else jtu.tree_map(lambda v: v[i], x)
            for x, axis in zip(args, in_axes, strict=True)
        ]

    outs = [alone(*member(i)) for i in range(size)]
    return jtu.tree_map(lambda *xs: np.stack(xs), *outs)


def _compiled_batched(fn, in_axes, *args, per_member=True):
    previous = kernel.per_member
    kernel.per_member = per_member
    jax.clear_caches()
    try:
        return jax.jit(jax.vmap(fn, in_axes=in_axes)).lower(*args).compile()
    finally:
        kernel.per_member = previous


def _sde(key, y0=None, scale=0.3, diffusion=None):
    sol, _ = spark_on_a_tree(
        key,
        lambda t, y, args: -y + jnp.sin(y),
        diffusion or (lambda t, y, scale: scale * jnp.outer(jnp.cos(y), y)),
        jnp.ones(4) if y0 is None else y0,
        saveat=dfx.SaveAt(t0=True, t1=True),
        args=scale,
    )
    return sol.ys, sol.stats["num_steps"], sol.result._value


@pytest.mark.parametrize(
    "mapped",
    [
        "key",
        pytest.param("y0", marks=pytest.mark.slow),
        pytest.param("scale", marks=pytest.mark.slow),
    ],
)
def test_a_vmap_on_brownian_trees_runs_member_by_member_as_a_loop(mapped):
    """Under `jax.vmap`, an adaptive SDE on a `VirtualBrownianTree` runs each
    member as one kernel, the members in turn: each member's answer is that of its
    solve alone, to the bit (also eagerly), whichever argument is mapped."""
    key = jax.random.key(3)
    if mapped == "key":
        args, in_axes = (jax.random.split(key, 3),), (0,)
        fn = _sde
    elif mapped == "y0":
        args, in_axes = (key, jnp.array([[1.0] * 4, [0.5] * 4, [2.0] * 4])), (None, 0)
        fn = _sde
    else:
        args, in_axes = (key, jnp.array([0.1, 0.3, 0.5])), (None, 0)
        fn = lambda key, scale: _sde(key, scale=scale)  # noqa: E731 - as `args`
    want = _members_alone(fn, in_axes, *args)
    compiled = _compiled_batched(fn, in_axes, *args)
    assert _MARK in compiled.as_text()
    eager = jax.vmap(fn, in_axes=in_axes)(*args)
    for got in (compiled(*args), eager):
        for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
    ys, steps, result = want
    assert (result == 0).all() and len(set(steps.tolist())) > 1
    # The batched loop (`kernel.per_member` off) runs the same solves: there are
    # no kernels, and the answers agree to within the solves' tolerance (their
    # rounding differs, which changes the adaptive steps taken).
    batched = _compiled_batched(fn, in_axes, *args, per_member=False)
    assert _MARK not in batched.as_text()
    np.testing.assert_allclose(batched(*args)[0], ys, rtol=0.05, atol=0.05)


def test_member_by_member_is_differentiated_after_being_traced():
    """A function traced under `jax.jit` without derivatives, then differentiated
    (JAX transforms its cached program): the gradient through the members' loop.
    With additive noise and no drift the solution is `y0 + scale * W(t1)` whatever
    the steps, so the gradient is the tree's own increment."""

    def final(scale, key):
        sol, bm = spark_on_a_tree(
            key,
            lambda t, y, args: jnp.zeros_like(y),
            lambda t, y, scale: scale * jnp.eye(4),
            jnp.ones(4),
            args=scale,
        )
        return jnp.sum(sol.ys[-1]), jnp.sum(bm.evaluate(0.0, 5.0))

    def loss(scale, keys):
        return jnp.sum(jax.vmap(lambda key: final(scale, key)[0])(keys))

    keys = jax.random.split(jax.random.key(5), 2)
    scale = jnp.asarray(0.3)
    jitted = jax.jit(loss)
    jax.clear_caches()
    assert _MARK in jitted.lower(scale, keys).compile().as_text()
    increments = sum(jax.jit(final)(scale, key)[1] for key in keys)
    np.testing.assert_allclose(jitted(scale, keys), 8.0 + scale * increments, rtol=1e-9)
    np.testing.assert_allclose(jax.grad(jitted)(scale, keys), increments, rtol=1e-9)


def test_members_that_do_not_fit_one_kernel_and_ode_batches_run_batched():
    keys = jax.random.split(jax.random.key(3), 2)

    def sorted_noise(key):
        # A sort: not an operation the single-kernel emitter compiles.
        return _sde(key, diffusion=lambda t, y, args: 0.3 * jnp.diag(jnp.sort(y)))

    compiled = _compiled_batched(sorted_noise, (0,), keys)
    assert _MARK not in compiled.as_text()
    ys, _, result = compiled(keys)
    assert (np.asarray(result) == 0).all() and np.isfinite(ys).all()

    # A mapped value the terms close over (not an argument of the solve): the
    # batched loop, which gives the same solves to within their tolerance.
    def closing_over(scale, key):
        return _sde(key, diffusion=lambda t, y, args: scale * jnp.diag(jnp.cos(y)))

    scales = jnp.array([0.1, 0.3])
    args = (scales, keys[0])
    compiled = _compiled_batched(closing_over, (0, None), *args)
    assert _MARK not in compiled.as_text()
    want = _members_alone(closing_over, (0, None), *args)
    np.testing.assert_allclose(compiled(*args)[0], want[0], rtol=0.05, atol=0.05)
