"""Trace-time budgets under `jax.vmap`: how many times JAX batches each loop body.

JAX batches a `lax.while_loop` or `lax.scan` under `jax.vmap` by batching its body's
program until the set of mapped loop values stops growing. A value that starts
unmapped and is mapped after one iteration (a buffer of zeros that the body writes
mapped states into, an accumulator of cotangents) costs one more batching of the
whole body, which is most of a batched solve's trace time. diffeqx starts such
values mapped (`_transforms.batched_as` and `batched_like`); these tests count the
extra batchings of the solves' loops, deterministically (nothing is timed), and fail
naming the loops that grew.
"""

import collections
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from jax._src.interpreters import batching

import diffeqx as dfx
from diffeqx._eager import forget_traces

_LOOP_RULES = ("_while_loop_batching_rule", "_scan_batching_rule")


def _extra_batchings(fn, *args):
    """`{(rule, body equations): patterns - 1}` over the loops whose body JAX batched
    with more than one pattern of mapped inputs while tracing `fn(*args)`."""
    patterns = collections.defaultdict(set)
    sizes = {}
    original = batching.batch_jaxpr

    def recording(closed_jaxpr, axis_data, in_batched, *args, **kwargs):
        rule = sys._getframe(1).f_code.co_name
        if rule in _LOOP_RULES:
            key = (rule, id(closed_jaxpr.jaxpr))
            patterns[key].add(tuple(in_batched))
            sizes[key] = len(closed_jaxpr.jaxpr.eqns)
        return original(closed_jaxpr, axis_data, in_batched, *args, **kwargs)

    # From cold caches: a program traced (and batched) before is reused.
    jax.clear_caches()
    forget_traces()
    batching.batch_jaxpr = recording
    try:
        jax.make_jaxpr(fn)(*args)
    finally:
        batching.batch_jaxpr = original
    assert patterns, "no loop was batched: the test no longer sees JAX's loop rules"
    return {
        (rule.split("_")[1], sizes[key]): len(found) - 1
        for key, found in patterns.items()
        if len(found) > 1
        for rule in [key[0]]
    }


def _field(t, y, args):
    return args * jnp.stack([y[0] - y[0] * y[1], y[0] * y[1] - y[1]])


def _solve(y0, args, max_steps, adjoint=None, saveat=None):
    return dfx.diffeqsolve(
        dfx.ODETerm(_field),
        dfx.Tsit5(),
        0.0,
        5.0,
        0.1,
        y0,
        args=args,
        saveat=saveat or dfx.SaveAt(ts=jnp.linspace(0.0, 5.0, 6)),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        adjoint=adjoint or dfx.RecursiveCheckpointAdjoint(),
        max_steps=max_steps,
    ).ys


_Y0S = jnp.stack([jnp.linspace(0.5, 1.5, 4), jnp.linspace(1.5, 0.5, 4)], -1)


def _grad_of_vmap(max_steps):
    def loss(args):
        ys = jax.vmap(lambda y0: _solve(y0, args, max_steps))(_Y0S)
        return jnp.sum(ys**2)

    return jax.grad(loss), (jnp.asarray(1.0),)


def _vmap_of_grad(max_steps):
    def loss(args, y0):
        return jnp.sum(_solve(y0, args, max_steps) ** 2)

    per_member = jax.vmap(jax.grad(loss), in_axes=(None, 0))
    return per_member, (jnp.asarray(1.0), _Y0S)


def _backsolve():
    def loss(args):
        solve = lambda y0: _solve(y0, args, 256, adjoint=dfx.BacksolveAdjoint())
        return jnp.sum(jax.vmap(solve)(_Y0S) ** 2)

    return jax.grad(loss), (jnp.asarray(1.0),)


def _sde_over_keys():
    # Euler-Maruyama with constant steps (the fixed-step scan), only the Brownian
    # path's key mapped: the state starts the same for every member.
    def one(key, sigma):
        path = dfx.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=key)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.ControlTerm(lambda t, y, args: args * jnp.eye(2), path),
        )
        sol = dfx.diffeqsolve(
            terms, dfx.Euler(), 0.0, 1.0, 0.05, jnp.ones(2), args=sigma
        )
        return jnp.sum(sol.ys**2)

    loss = lambda sigma: jnp.sum(
        jax.vmap(one, in_axes=(0, None))(jr.split(jr.key(0), 4), sigma)
    )
    return jax.grad(loss), (jnp.asarray(0.5),)


def _sde_traced_times():
    # The Brownian tree's depth known only at run time (its span traced): its walks
    # loop over the levels, with sums that start as zeros.
    def one(key, t1):
        path = dfx.VirtualBrownianTree(0.0, t1, tol=1e-3, shape=(2,), key=key)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.ControlTerm(lambda t, y, args: args * jnp.eye(2), path),
        )
        sol = dfx.diffeqsolve(terms, dfx.Heun(), 0.0, t1, 0.05, jnp.ones(2), args=0.5)
        return jnp.sum(sol.ys**2)

    keys = jr.split(jr.key(0), 4)
    loss = lambda t1: jnp.sum(jax.vmap(one, in_axes=(0, None))(keys, t1))
    return jax.grad(loss), (jnp.asarray(1.0),)


def _implicit():
    # Kvaerno5's implicit stages run in a loop, each with a root find.
    def one(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: jnp.stack([-y[0] + y[1] ** 2, -10 * y[1]])),
            dfx.Kvaerno5(),
            0.0,
            1.0,
            0.01,
            y0,
            stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-7),
        ).ys

    return jax.vmap(one), (_Y0S,)


def _constant_steps_saving_ts():
    # The fixed-step scan saving at requested times: each member's saves.
    def one(y0):
        saveat = dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 7))
        term = dfx.ODETerm(lambda t, y, args: -y)
        return dfx.diffeqsolve(term, dfx.Euler(), 0.0, 1.0, 0.01, y0, saveat=saveat).ys

    return jax.vmap(one), (_Y0S,)


# Each case's budget of extra batchings (patterns beyond the first, summed over its
# loops), as measured when set with JAX 0.10.2 and Equinox 0.13. Before diffeqx
# started these loops' values mapped: 2, 2, 2, 2, 5, 2, 4, 2 and 3.
CASES = {
    # The default adjoint storing every step's state: its forward loop and its
    # backward loop, each batched once more when the store or the cotangents started
    # unmapped.
    "grad of vmap, every state stored": (lambda: _grad_of_vmap(64), 0),
    "grad of vmap, thinned store": (lambda: _grad_of_vmap(2**18), 0),
    "vmap of grad, every state stored": (lambda: _vmap_of_grad(64), 0),
    "vmap of grad, thinned store": (lambda: _vmap_of_grad(2**18), 0),
    # The backward pass's scan over the save times is batched once. What remains:
    # the forward solves inside the custom derivative (traced before JAX batches
    # them, so their starting values cannot be mapped from the start), and the
    # backward solves' flags.
    "BacksolveAdjoint under vmap": (_backsolve, 3),
    "fixed-step SDE over keys": (_sde_over_keys, 0),
    # One scan of 12 equations is still batched twice.
    "SDE over keys, times traced": (_sde_traced_times, 1),
    # The root find's loop (Optimistix's: its count of iterations starts unmapped)
    # is still batched twice; the loop over the stages once.
    "Kvaerno5 under vmap": (_implicit, 1),
    "constant steps saving at ts under vmap": (_constant_steps_saving_ts, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loops_are_batched_within_budget(name):
    build, budget = CASES[name]
    fn, args = build()
    extra = _extra_batchings(fn, *args)
    assert sum(extra.values()) <= budget, (
        f"{name}: JAX batched loop bodies {sum(extra.values())} more times than "
        f"their first (budget {budget}); (kind, body equations): extra batchings = "
        f"{extra}. A loop value that starts unmapped and is mapped after one "
        "iteration costs a batching of the whole body: start it mapped "
        "(`_transforms.batched_as`, `batched_like`)."
    )
