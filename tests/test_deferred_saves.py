"""`SaveAt(ts=...)` under reverse mode: the requested times are interpolated after the
loop from recorded steps (`save.defer_ts`) rather than in an inner loop of every step.

Both ways must give the same solution and the same gradients: each case runs the
same loss with deferral on (the default under `jax.grad`) and forced off (a zero
memory budget), checks that the deferred path really ran, compares values and
gradients, and checks the values against a closed form or the solve without any
derivative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffeqx as dfx
from diffeqx._solve import save as save_module, setup as solve_setup


@pytest.fixture
def defer_calls(monkeypatch):
    """Records every deferral decision of the solves traced in the test."""
    calls = []
    original = solve_setup.defer_ts

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(solve_setup, "defer_ts", spy)
    return calls


def _without_deferral(monkeypatch):
    monkeypatch.setattr(save_module, "DEFER_BUDGET_BYTES", 0)
    monkeypatch.setattr(save_module, "DEFER_BUDGET_BYTES_BATCHED", 0)


def _decay(t, y, args):
    return -args * y


def _both_ways(monkeypatch, defer_calls, value_and_grad, *args):
    """`value_and_grad(*args)` with deferral, then without; checks which ran."""
    deferred = value_and_grad(*args)
    assert defer_calls and all(defer_calls), defer_calls
    defer_calls.clear()
    jax.clear_caches()  # trace again, not reuse the compiled deferred program
    with monkeypatch.context() as patch:
        _without_deferral(patch)
        looped = value_and_grad(*args)
    assert defer_calls and not any(defer_calls), defer_calls
    return deferred, looped


def _assert_close(a, b, rtol=1e-12, atol=1e-13):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b
    )


# Deferred saving against saving in the loop by default: against Diffrax's (which
# saves inside each step), under vmap, with the default adjoint:
# tests/compat/test_saves_under_grad.py::test_batched_saves_and_gradients_match_diffrax.
# The cases here (two compilations each, the caches cleared in between) are `slow`,
# except the forwards one below: the default run's check that deferral takes place.
@pytest.mark.parametrize(
    "backwards", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_deferred_matches_loop_and_closed_form(monkeypatch, defer_calls, backwards):
    t0, t1 = (2.0, 0.0) if backwards else (0.0, 2.0)
    ts = jnp.linspace(t0, t1, 17)
    # Forwards with `t0` and `t1` saved around the requested times, backwards without.
    save_t0 = save_t1 = not backwards

    def loss(rate, y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            t0,
            t1,
            0.1 if not backwards else -0.1,
            y0,
            args=rate,
            saveat=dfx.SaveAt(t0=save_t0, t1=save_t1, ts=ts),
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-12),
        )
        return jnp.sum(sol.ys**2), (sol.ts, sol.ys)

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    rate, y0 = jnp.asarray(0.7), jnp.asarray(1.3)
    deferred, looped = _both_ways(monkeypatch, defer_calls, vg, rate, y0)
    _assert_close(deferred, looped)
    (_, (ts_out, ys_out)), grads = deferred
    expected_ts = np.concatenate(
        [[t0] if save_t0 else [], np.asarray(ts), [t1] if save_t1 else []]
    )
    np.testing.assert_array_equal(ts_out, expected_ts)
    exact = 1.3 * np.exp(-0.7 * (expected_ts - t0))
    np.testing.assert_allclose(ys_out, exact, rtol=1e-8)
    # Gradients of sum(y(t)^2) in closed form.
    tau = expected_ts - t0
    np.testing.assert_allclose(grads[1], np.sum(2 * exact * exact / 1.3), rtol=1e-7)
    np.testing.assert_allclose(grads[0], np.sum(-2 * tau * exact * exact), rtol=1e-7)


@pytest.mark.slow
def test_deferred_pytree_state_fn_and_many_times(monkeypatch, defer_calls):
    """A PyTree state, a `fn`, and more requested times than the compare-all count
    (a binary search over the requested times), including repeated times."""
    ts = jnp.sort(jnp.concatenate([jnp.linspace(0.0, 3.0, 300), jnp.array([1.0, 1.0])]))

    def field(t, y, args):
        return {"a": -y["a"], "b": jnp.stack([-y["b"][1], y["b"][0]]) * args}

    def loss(omega):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Dopri5(),
            0.0,
            3.0,
            0.1,
            {"a": jnp.asarray(1.0), "b": jnp.array([1.0, 0.0])},
            args=omega,
            saveat=dfx.SaveAt(ts=ts, fn=lambda t, y, args: (y["a"] * t, y["b"][0])),
            stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-11),
        )
        a, b = sol.ys
        return jnp.sum(a) + jnp.sum(b**2), sol.ys

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True))
    deferred, looped = _both_ways(monkeypatch, defer_calls, vg, jnp.asarray(1.1))
    _assert_close(deferred, looped)
    (_, (a, b)), grad = deferred
    np.testing.assert_allclose(a, np.exp(-np.asarray(ts)) * np.asarray(ts), atol=1e-7)
    np.testing.assert_allclose(b, np.cos(1.1 * np.asarray(ts)), atol=1e-7)
    # d/domega sum(cos(omega t)^2) = -sum(t sin(2 omega t)).
    expected = -np.sum(np.asarray(ts) * np.sin(2 * 1.1 * np.asarray(ts)))
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


@pytest.mark.slow
def test_deferred_under_vmap(monkeypatch, defer_calls):
    """Batch members take different steps, and record them in different slots."""
    ts = jnp.linspace(0.0, 5.0, 23)

    def lotka_volterra(t, y, args):
        a, b = args
        return jnp.stack([a * y[0] - y[0] * y[1], -b * y[1] + y[0] * y[1]])

    def member(y0, params):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lotka_volterra),
            dfx.Tsit5(),
            0.0,
            5.0,
            0.05,
            y0,
            args=params,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
        )
        return sol.ys

    y0s = jnp.array([[2.0, 1.0], [1.0, 0.5], [3.0, 2.0]])

    def loss(params):
        ys = jax.vmap(member, in_axes=(0, None))(y0s, params)
        return jnp.mean(ys[..., 0] * ys[..., 1]), ys

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True))
    params = jnp.array([1.5, 1.0])
    deferred, looped = _both_ways(monkeypatch, defer_calls, vg, params)
    _assert_close(deferred, looped, rtol=1e-10, atol=1e-11)
    (_, ys), grad = deferred
    assert np.all(np.isfinite(ys)) and np.all(np.isfinite(grad))


@pytest.mark.slow
def test_deferred_keeps_saves_of_a_failed_solve(monkeypatch, defer_calls):
    """`throw=False`: a solve that runs out of steps keeps every time it reached and
    leaves the others `inf`, with either way of saving. The times not reached add
    nothing to the gradient, even through an `fn` (here `sqrt(y - 0.2)`) that is
    undefined on the states past the end (the solution decays below 0.2 there)."""
    ts = jnp.linspace(0.0, 10.0, 41)

    def loss(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            0.0,
            10.0,
            0.1,
            y0,
            args=jnp.asarray(1.0),
            saveat=dfx.SaveAt(ts=ts, fn=lambda t, y, args: jnp.sqrt(y - 0.2)),
            stepsize_controller=dfx.ConstantStepSize(),
            max_steps=20,
            throw=False,
        )
        return jnp.sum(jnp.where(jnp.isfinite(sol.ys), sol.ys, 0.0)), (
            sol.ys,
            sol.result == dfx.RESULTS.max_steps_reached,
        )

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True))
    deferred, looped = _both_ways(monkeypatch, defer_calls, vg, jnp.asarray(2.0))
    _assert_close(deferred, looped)
    (_, (ys, out_of_steps)), grad = deferred
    assert bool(out_of_steps)
    t = np.asarray(ts)
    reached = t <= 2.0 + 1e-9
    exact = np.sqrt(2.0 * np.exp(-t[reached]) - 0.2)
    np.testing.assert_allclose(ys[reached], exact, rtol=1e-6)
    assert np.all(np.isinf(ys[~reached]))
    # d/dy0 of sum(sqrt(y0 exp(-t) - 0.2)) over the times reached.
    expected = np.sum(np.exp(-t[reached]) / (2 * exact))
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


@pytest.mark.slow
def test_deferred_with_terminating_event(monkeypatch, defer_calls):
    """A terminating event located inside a step: times before it are saved, the
    rest stay `inf`; the gradient flows through both."""
    ts = jnp.linspace(0.0, 3.0, 31)

    def loss(rate):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            0.0,
            3.0,
            0.1,
            jnp.asarray(1.0),
            args=rate,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-12),
            event=dfx.Event(
                lambda t, y, args, **kwargs: y - 0.3,
                root_finder=optx.Newton(rtol=1e-12, atol=1e-12),
            ),
        )
        finite = jnp.isfinite(sol.ys)
        return jnp.sum(jnp.where(finite, sol.ys, 0.0)), sol.ys

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True))
    deferred, looped = _both_ways(monkeypatch, defer_calls, vg, jnp.asarray(0.8))
    _assert_close(deferred, looped)
    (_, ys), _ = deferred
    t_event = np.log(1 / 0.3) / 0.8
    before = np.asarray(ts) <= t_event
    np.testing.assert_allclose(
        ys[before], np.exp(-0.8 * np.asarray(ts)[before]), rtol=1e-8
    )
    assert np.all(np.isinf(ys[~before]))


@pytest.mark.parametrize("n", [1, 2, 3, 50, 128, 129, 200, 1000])
def test_counting_requested_times_reached(n):
    """How many requested times a step reaches, against NumPy: compared all at once
    up to 128 times, by a binary search above; repeated times; NaN reaches none."""
    rng = np.random.default_rng(n)
    ts = np.sort(rng.uniform(0.0, 1.0, n))
    ts[n // 2 : n // 2 + 3] = ts[n // 2]
    queries = np.concatenate([rng.uniform(-0.1, 1.1, 40), ts, [np.inf, -np.inf]])
    count = jax.jit(jax.vmap(save_module._count_at_most, in_axes=(None, 0)))
    np.testing.assert_array_equal(
        count(jnp.asarray(ts), jnp.asarray(queries)),
        np.sum(ts[None, :] <= queries[:, None], axis=1),
    )
    assert int(save_module._count_at_most(jnp.asarray(ts), jnp.asarray(np.nan))) == 0


def test_no_deferral_without_reverse_mode_or_with_steps(defer_calls):
    ts = jnp.linspace(0.0, 1.0, 5)

    def solve(rate, saveat):
        return dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            1.0,
            args=rate,
            saveat=saveat,
        ).ys

    # Tracing decides; nothing needs to run.
    jax.make_jaxpr(lambda r: solve(r, dfx.SaveAt(ts=ts)))(jnp.asarray(1.0))
    assert defer_calls and not any(defer_calls)
    defer_calls.clear()
    jax.make_jaxpr(
        jax.grad(lambda r: jnp.sum(solve(r, dfx.SaveAt(ts=ts, steps=True))[:5]))
    )(jnp.asarray(1.0))
    assert defer_calls and not any(defer_calls)
