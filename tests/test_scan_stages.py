"""`scan_stages`: explicit Runge–Kutta stages in a loop or unrolled give the same bits,
values and gradients, and the default picks the loop for a neural network and the
unrolled stages for a small vector field."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx


def _stage_loops(fn, *args) -> int:
    """How many loops over the stage index the program of `fn` has (the solve
    loop itself is a `while`; the stage loop is a `fori_loop`, i.e. a `while` or
    `scan` nested inside it)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("while[") + text.count("scan[")


def _mlp_problem():
    mlp = eqx.nn.MLP(2, 2, 16, 2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)

    def loss(params, solver):
        field = eqx.combine(params, static)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: field(y)),
            solver,
            0.0,
            2.0,
            0.1,
            jnp.array([1.0, 0.5]),
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 2.0, 9)),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
        )
        return jnp.sum(sol.ys**2), sol.ys

    return params, loss


def test_loop_and_unrolled_stages_agree_in_values():
    # A network's solve: the stages in a loop (the default for a network) and
    # unrolled. (Gradients: the next test, and the rematerialised loop's below.)
    params, loss = _mlp_problem()
    ys = {
        scan: jax.jit(lambda p, scan=scan: loss(p, dfx.Tsit5(scan_stages=scan))[1])(
            params
        )
        for scan in (None, False)
    }
    np.testing.assert_allclose(ys[None], ys[False], rtol=1e-13, atol=1e-14)


# Each case compiles two gradients of a network's solve: Dopri5's in the slow run.
@pytest.mark.parametrize(
    "name", ["Tsit5", pytest.param("Dopri5", marks=pytest.mark.slow)]
)
def test_loop_and_unrolled_stages_agree_in_values_and_gradients(name):
    params, loss = _mlp_problem()
    solver_cls = getattr(dfx, name)
    results = {}
    for scan in (True, False):
        vg = jax.jit(
            jax.value_and_grad(
                lambda p, scan=scan: loss(p, solver_cls(scan_stages=scan)),
                has_aux=True,
            )
        )
        results[scan] = vg(params)
    (_, ys_loop), grads_loop = results[True]
    (_, ys_unrolled), grads_unrolled = results[False]
    np.testing.assert_allclose(ys_loop, ys_unrolled, rtol=1e-13, atol=1e-14)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13),
        grads_loop,
        grads_unrolled,
    )


def test_default_loops_for_a_network_and_unrolls_a_small_field():
    params, loss = _mlp_problem()
    solver = dfx.Tsit5()
    network = _stage_loops(lambda p: loss(p, solver)[0], params)
    unrolled = _stage_loops(lambda p: loss(p, dfx.Tsit5(scan_stages=False))[0], params)
    assert network > unrolled

    def small(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y), solver, 0.0, 1.0, 0.1, y0
        ).ys

    def small_looped(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Tsit5(scan_stages=True),
            0.0,
            1.0,
            0.1,
            y0,
        ).ys

    assert _stage_loops(small, jnp.ones(2)) < _stage_loops(small_looped, jnp.ones(2))


def test_scan_stages_is_checked():
    with pytest.raises(ValueError, match="scan_stages"):
        dfx.Tsit5(scan_stages="yes")
    assert dfx.Dopri8().scan_stages is True


def _batched_mlp_problem(rows):
    """A network applied to every row of a `(rows, 2)` state: with many rows its
    intermediate values are large."""
    mlp = eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=jax.random.key(1))
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = jax.random.uniform(jax.random.key(2), (rows, 2), minval=-1.0, maxval=1.0)

    def loss(params, solver, adjoint=None):
        field = eqx.combine(params, static)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: jax.vmap(field)(y)),
            solver,
            0.0,
            0.5,
            0.1,
            y0,
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 0.5, 3)),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
            adjoint=dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
            max_steps=64,
        )
        return jnp.sum(sol.ys**2)

    return params, loss


def _remats(monkeypatch):
    """Records the stage-loop bodies handed to `jax.checkpoint`, each with whether it
    was traced for a loop over the steps that differentiates one step at a time (the
    default adjoint's; the solve also traces a step outside its loop, for the shapes
    of its outputs, which costs no memory)."""
    from diffeqx._transforms import steps_differentiated_one_at_a_time

    wrapped = []
    real = jax.checkpoint

    def spy(fn, *args, **kwargs):
        if "AbstractERK.step" in getattr(fn, "__qualname__", ""):
            wrapped.append(steps_differentiated_one_at_a_time())
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(jax, "checkpoint", spy)
    return wrapped


def test_stage_loop_recomputes_large_stages_where_every_step_keeps_them(monkeypatch):
    """Under reverse mode, a stage loop whose vector field computes large values
    (256 rows through a 64-wide network) is rematerialised where the loop over the
    steps keeps every step's values for the backward pass (`DirectAdjoint`): the
    backward pass recomputes them rather than keeping them for every stage of every
    step. Not in the default adjoint's loop, which differentiates one step at a
    time; nor for small values (a single row), nor without reverse mode."""
    wrapped = _remats(monkeypatch)

    def remats(fn, *args):
        wrapped.clear()
        jax.make_jaxpr(fn)(*args)
        return list(wrapped)

    params, loss = _batched_mlp_problem(256)
    direct = dfx.DirectAdjoint()
    assert remats(jax.grad(lambda p: loss(p, dfx.Tsit5(), direct)), params)
    assert True not in remats(jax.grad(lambda p: loss(p, dfx.Tsit5())), params)
    assert remats(lambda p: loss(p, dfx.Tsit5()), params) == []
    small_params, small_loss = _mlp_problem()
    assert remats(jax.grad(lambda p: small_loss(p, dfx.Tsit5())[0]), small_params) == []


@pytest.mark.parametrize(
    "adjoint", ["default", pytest.param("direct", marks=pytest.mark.slow)]
)
def test_large_stages_give_the_unrolled_stages_gradient(adjoint):
    """The gradient with the stage loop of a network with large values (compiled
    unrolled under the default adjoint, rematerialised under `DirectAdjoint`) is
    that of stages unrolled in Python, and agrees with finite differences."""
    params, loss = _batched_mlp_problem(256)
    chosen = dfx.DirectAdjoint() if adjoint == "direct" else None
    grads = {
        scan: jax.jit(
            jax.grad(lambda p, scan=scan: loss(p, dfx.Tsit5(scan_stages=scan), chosen))
        )(params)
        for scan in (None, False)
    }
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13),
        grads[None],
        grads[False],
    )
    # Against a central difference along one direction of the parameters.
    leaves, treedef = jax.tree.flatten(params)
    direction = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(jax.random.key(i), x.shape, x.dtype)
            for i, x in enumerate(leaves)
        ],
    )
    value = jax.jit(lambda p: loss(p, dfx.Tsit5(), chosen))
    h = 1e-5

    def shifted(sign):
        return value(jax.tree.map(lambda x, d: x + sign * h * d, params, direction))

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    exact = sum(
        jnp.vdot(g, d)
        for g, d in zip(
            jax.tree.leaves(grads[None]), jax.tree.leaves(direction), strict=True
        )
    )
    np.testing.assert_allclose(exact, fd, rtol=1e-5)


def _stage_loop_unrolls(monkeypatch, in_loop=False):
    """Records the `unroll` of each stage loop built (its body's name says so); with
    `in_loop`, only of those built for a loop over the steps that differentiates one
    step at a time (see `_remats`)."""
    from diffeqx._transforms import steps_differentiated_one_at_a_time

    unrolls = []
    real = jax.lax.fori_loop

    def spy(lower, upper, body, init, **kwargs):
        if "AbstractERK.step" in getattr(body, "__qualname__", "") and (
            not in_loop or steps_differentiated_one_at_a_time()
        ):
            unrolls.append(kwargs.get("unroll", False))
        return real(lower, upper, body, init, **kwargs)

    monkeypatch.setattr(jax.lax, "fori_loop", spy)
    return unrolls


def test_stage_loop_is_compiled_unrolled_under_reverse_mode_unless_rematerialised(
    monkeypatch,
):
    """Under first-order reverse mode the stage loop of a network is traced once but
    compiled unrolled (with large intermediate values too, under the default
    adjoint); without reverse mode, and when the body is rematerialised (large
    values under `DirectAdjoint`), it stays a loop."""
    unrolls = _stage_loop_unrolls(monkeypatch)

    def built(fn, *args):
        unrolls.clear()
        jax.make_jaxpr(fn)(*args)
        return set(unrolls)

    params, loss = _mlp_problem()
    assert built(jax.grad(lambda p: loss(p, dfx.Tsit5())[0]), params) == {True}
    assert built(lambda p: loss(p, dfx.Tsit5())[0], params) == {False}
    large_params, large_loss = _batched_mlp_problem(256)
    direct = dfx.DirectAdjoint()
    assert built(
        jax.grad(lambda p: large_loss(p, dfx.Tsit5(), direct)), large_params
    ) == {False}
    # Second derivatives keep the loop compact.
    assert built(jax.hessian(lambda p: loss(p, dfx.Tsit5())[0]), params) == {False}


@pytest.mark.parametrize(
    "kind, expected",
    [("checkpointed", True), ("stored", True), ("bounded", False), ("lax", False)],
)
def test_loops_say_whether_they_differentiate_one_step_at_a_time(kind, expected):
    """A loop's body is traced knowing whether the loop differentiates one iteration
    at a time, also when the loop is nested in the body of one that does (a solve in
    a vector field): the inner loop's own kind decides."""
    from diffeqx._adjoint.base import while_loop_of_kind
    from diffeqx._transforms import (
        differentiated_one_step_at_a_time,
        steps_differentiated_one_at_a_time,
    )

    seen = []

    def body(carry):
        seen.append(steps_differentiated_one_at_a_time())
        return carry[0] + 1, carry[1] * 0.5

    loop = while_loop_of_kind(kind)
    for outer in (False, True):
        seen.clear()
        with differentiated_one_step_at_a_time(outer):
            jax.make_jaxpr(
                lambda x: loop(
                    lambda c: c[0] < 3,
                    body,
                    (0, x),
                    max_steps=4,
                    buffers=lambda c: [],
                )
            )(1.0)
        assert seen and set(seen) == {expected}


def test_a_fixed_step_solve_is_traced_as_keeping_every_step():
    """The fixed-step path keeps every step's values (or a block's) for reverse
    mode, so its step is traced as such even inside a loop that differentiates one
    step at a time."""
    from diffeqx._transforms import (
        differentiated_one_step_at_a_time,
        steps_differentiated_one_at_a_time,
    )

    seen = []

    def field(t, y, args):
        seen.append(steps_differentiated_one_at_a_time())
        return -y

    with differentiated_one_step_at_a_time():
        jax.make_jaxpr(
            lambda y0: (
                dfx.diffeqsolve(dfx.ODETerm(field), dfx.Euler(), 0.0, 1.0, 0.25, y0).ys
            )
        )(jnp.ones(2))
    assert seen and not any(seen)


def test_large_stages_are_compiled_unrolled_in_the_default_adjoints_loop(monkeypatch):
    """Under the default adjoint, whose loop over the steps differentiates one step
    at a time, the stage loop of a network with large values (256 rows) is compiled
    unrolled there too: its values are kept for one step only."""
    unrolls = _stage_loop_unrolls(monkeypatch, in_loop=True)
    params, loss = _batched_mlp_problem(256)
    jax.make_jaxpr(jax.grad(lambda p: loss(p, dfx.Tsit5())))(params)
    assert unrolls and set(unrolls) == {True}


def _lotka_volterra_solve(y0, solver=None):
    def field(t, y, args):
        return jnp.stack(
            [0.1 * y[0] - 0.02 * y[0] * y[1], 0.02 * y[0] * y[1] - 0.4 * y[1]]
        )

    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5() if solver is None else solver,
        0.0,
        20.0,
        0.1,
        y0,
        saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 20.0, 11, dtype=y0.dtype)),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    return sol.ys, sol.stats["num_steps"]


def _dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only choice")
def test_vmap_in_float64_on_cpu_combines_stages_by_sums_with_the_loops_answer():
    """Under `vmap` on CPU in float64 the stages of a small field are combined by
    elementwise sums (not dot products), and the batch gives each member's own
    solve to rounding, in the same steps. In float32 the dot products stay."""
    y0s = jnp.array([[10.0, 10.0], [12.0, 8.0], [15.0, 5.0]])
    batched = jax.vmap(_lotka_volterra_solve)
    # At least Tsit5's five stage states and its solution (the interpolation of
    # the saves has products of its own, batched or not).
    assert _dots(batched, y0s.astype(jnp.float32)) - _dots(batched, y0s) >= 6
    unrolled = dfx.Tsit5(scan_stages=False)
    assert (
        _dots(lambda y0: _lotka_volterra_solve(y0, unrolled), y0s[0])
        - _dots(batched, y0s)
        >= 6
    )
    ys, steps = jax.jit(batched)(y0s)
    for i in range(y0s.shape[0]):
        ys_i, steps_i = jax.jit(_lotka_volterra_solve)(y0s[i])
        assert int(steps[i]) == int(steps_i)
        np.testing.assert_allclose(ys[i], ys_i, rtol=1e-12, atol=1e-12)


def _adaptive_solve(n, solver):
    def solve(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y + 0.5 * jnp.sin(jnp.roll(y, 1)) * y),
            solver,
            0.0,
            5.0,
            0.1,
            y0,
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 5.0, 6)),
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        )
        return sol.ys, sol.stats["num_steps"]

    return solve, jnp.linspace(0.5, 1.5, n)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only choice")
def test_default_loops_the_stages_of_a_tiny_adaptive_solve_on_cpu():
    """On CPU, an adaptive solve of a few states (whose stage loop XLA compiles into
    one kernel) runs its stages in a loop; a larger state, a `vmap`, a gradient or
    constant steps keep the unrolled stages. Loop and unrolled stages take the
    same steps to the same values."""
    small, y0 = _adaptive_solve(2, dfx.Tsit5())
    small_unrolled, _ = _adaptive_solve(2, dfx.Tsit5(scan_stages=False))
    assert _stage_loops(small, y0) == _stage_loops(small_unrolled, y0) + 1
    ys, steps = jax.jit(small)(y0)
    ys_unrolled, steps_unrolled = jax.jit(small_unrolled)(y0)
    assert int(steps) == int(steps_unrolled)
    np.testing.assert_allclose(ys, ys_unrolled, rtol=1e-13, atol=1e-13)

    large, y0_large = _adaptive_solve(16, dfx.Tsit5())
    large_unrolled, _ = _adaptive_solve(16, dfx.Tsit5(scan_stages=False))
    assert _stage_loops(large, y0_large) == _stage_loops(large_unrolled, y0_large)

    batch = jnp.stack([y0, 2 * y0])
    assert _stage_loops(jax.vmap(small), batch) == _stage_loops(
        jax.vmap(small_unrolled), batch
    )

    def loss(solve):
        return lambda y0: jnp.sum(solve(y0)[0])

    assert _stage_loops(jax.grad(loss(small)), y0) == _stage_loops(
        jax.grad(loss(small_unrolled)), y0
    )

    def constant(solver):
        return lambda y0: (
            dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, args: -y), solver, 0.0, 1.0, 0.1, y0
            ).ys
        )

    assert _stage_loops(constant(dfx.Tsit5()), y0) == _stage_loops(
        constant(dfx.Tsit5(scan_stages=False)), y0
    )


def _field_traces(solver, n) -> int:
    """How many times the program of `_adaptive_solve` evaluates its vector field
    (each evaluation has one `sin`)."""
    solve, y0 = _adaptive_solve(n, solver)
    return str(jax.make_jaxpr(solve)(y0)).count(" sin ")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only choice")
@pytest.mark.parametrize(
    "name, n, traces",
    [
        # The first stage's vector field (at the start) and the loop's body: the
        # last stage runs in the loop.
        ("Tsit5", 2, 2),
        ("Dopri8", 2, 2),
        # Stages in a loop, the last stage after it: with the solution and the
        # vector field carried too, the loop would no longer be one kernel.
        ("Tsit5", 5, 3),
        ("Dopri8", 3, 3),
        # Unrolled: every stage traced.
        ("Tsit5", 16, 7),
    ],
)
def test_first_same_as_last_stage_runs_in_a_one_kernel_loop(name, n, traces):
    """A first-same-as-last method whose stage loop is compiled into one kernel
    even with the solution and the last vector field carried through it runs its
    last stage in the loop (the vector field traced once fewer), with the unrolled
    stages' steps and values."""
    solver = getattr(dfx, name)
    assert _field_traces(solver(), n) == traces
    solve, y0 = _adaptive_solve(n, solver())
    solve_unrolled, _ = _adaptive_solve(n, solver(scan_stages=False))
    ys, steps = jax.jit(solve)(y0)
    ys_unrolled, steps_unrolled = jax.jit(solve_unrolled)(y0)
    assert int(steps) == int(steps_unrolled)
    np.testing.assert_allclose(ys, ys_unrolled, rtol=1e-13, atol=1e-13)
