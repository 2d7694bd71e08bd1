"""A reverse-mode differentiable while loop that stores every iteration's state:
the default adjoint's loop over the steps when `max_steps` of the solve's states fit
its bound (see `RecursiveCheckpointAdjoint`); beyond it, the same loop storing at
most `slots` states at a time (`_run_thinned`: every iteration's while the slots
last, then every other one, and so on), whose backward pass recomputes the
iterations between two stored states into a segment buffer before differentiating
them, each at most once.

The forward pass runs the loop and stores the state at the start of every step (a
buffer of `max_steps` states). The backward pass walks the steps from the last to
the first and differentiates each as `jax.vjp` of one step at its stored state: the
step is recomputed and linearised inside the backward loop's body, next to its
transpose.

Equinox's checkpointed loop with as many checkpoints as steps runs the same
arithmetic; this one traces the solve's step fewer times (Equinox's also traces a
forward-mode derivative of the whole step, to find which of its outputs depend on
the inputs being differentiated), so the program is built in about half the time
(measured on the neural-ODE gradient: trace and lowering 0.53 to 0.62 s against
1.36 to 1.87 s).

The loop's buffers (the state's write-once output arrays, `buffers(state)`) are
passed to the body wrapped, supporting `buffer.at[i].set(x, pred=...)` as Equinox's
loops do, and are not stored per step: the backward pass differentiates the writes
with the final buffers standing in for the inputs (a write's derivative does not
depend on what it overwrites). The loop's predicate is reduced over a `jax.vmap`
batch (the loop runs while any member is going), so the body must hold the members
that have finished (as the solve's step does under `LoopSpec.mask_members`); the
solve uses Equinox's loop where it does not.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._transforms import batched_like


class WriteOnce(eqx.Module):
    """A write-once buffer inside the stored loop: `buffer.at[i].set(x, pred=p)`
    writes `x` at `i` where `p`, as Equinox's loop buffers do."""

    array: Any

    @property
    def at(self):
        return _At(self.array)

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def size(self):
        return self.array.size

    def __getitem__(self, item):
        return self.array[item]


class _At:
    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __getitem__(self, item):
        return _Item(self.array, item)


class _Item:
    __slots__ = ("array", "item")

    def __init__(self, array, item):
        self.array, self.item = array, item

    def set(self, x, *, pred=True, **kwargs):
        array, item = self.array, self.item
        if not isinstance(array, jax.Array):
            # Wrapped again by a loop inside the step (Equinox's), which takes the
            # predicate itself.
            return WriteOnce(array.at[item].set(x, pred=pred, **kwargs))
        if pred is True:
            return WriteOnce(array.at[item].set(x, **kwargs))
        if not kwargs and _is_integer_scalar(item):
            # A write to an out-of-range slot is dropped.
            index = jnp.where(pred, item, array.shape[0])
            return WriteOnce(array.at[index].set(x, mode="drop"))
        kept = jnp.where(pred, x, array.at[item].get(**kwargs))
        return WriteOnce(array.at[item].set(kept, **kwargs))


def _is_integer_scalar(item) -> bool:
    if isinstance(item, int) and not isinstance(item, bool):
        return True
    return (
        isinstance(item, jax.Array)
        and item.ndim == 0
        and jnp.issubdtype(item.dtype, jnp.integer)
    )


def _is_inexact(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)


class _Layout:
    """Which leaves of the loop state are buffers, and how to take a state apart
    (`parts`: the other leaves, then the buffers) and put it back together
    (`state`, with the buffers wrapped for the body)."""

    def __init__(self, init_val, buffers):
        leaves, self.treedef = jtu.tree_flatten(init_val)
        buffer_ids = {id(x) for x in jtu.tree_leaves(buffers(init_val))}
        self.is_buffer = tuple(id(x) in buffer_ids for x in leaves)
        if sum(self.is_buffer) != len(buffer_ids):
            raise ValueError(
                "The stored loop needs each buffer to appear once in its state."
            )

    def state(self, x, b):
        xs, bs = iter(x), iter(b)
        merged = [
            WriteOnce(next(bs)) if is_buffer else next(xs)
            for is_buffer in self.is_buffer
        ]
        return jtu.tree_unflatten(self.treedef, merged)

    def parts(self, state):
        leaves = jtu.tree_leaves(state, is_leaf=lambda z: isinstance(z, WriteOnce))
        if len(leaves) != len(self.is_buffer):
            raise AssertionError("the loop body changed the structure of its state")
        x, b = [], []
        for leaf, is_buffer in zip(leaves, self.is_buffer, strict=True):
            if is_buffer:
                b.append(
                    jnp.asarray(leaf.array if isinstance(leaf, WriteOnce) else leaf)
                )
            else:
                x.append(jnp.asarray(leaf))
        return x, b


def stored_while_loop(
    cond_fun: Callable,
    body_fun: Callable,
    init_val,
    *,
    max_steps: int,
    buffers: Callable,
    slots: int | None = None,
):
    """Runs `while cond_fun(val): val = body_fun(val)` for at most `max_steps`
    iterations, reverse-mode differentiable by storing every iteration's state (see
    the module docstring); with `slots` (an even number below `max_steps`), at most
    `slots` states at a time, thinned as the loop goes (see `_run_thinned`)."""
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int, got {max_steps!r}.")
    if slots is not None and (
        not isinstance(slots, int) or slots < 2 or slots % 2 or slots >= max_steps
    ):
        raise ValueError(
            f"`slots` must be an even int from 2 to max_steps - 1, got {slots!r}."
        )
    layout = _Layout(init_val, buffers)
    leaves = jtu.tree_leaves(init_val)
    x0 = [
        jnp.asarray(x) for x, b in zip(leaves, layout.is_buffer, strict=True) if not b
    ]
    b0 = [jnp.asarray(x) for x, b in zip(leaves, layout.is_buffer, strict=True) if b]
    # The body and condition with the values they close over (e.g. parameters being
    # differentiated) made explicit leaves, so the derivative rule can reach them.
    step = eqx.filter_closure_convert(
        lambda x, b: layout.parts(body_fun(layout.state(x, b))), x0, b0
    )
    going = eqx.filter_closure_convert(
        lambda x, b: cond_fun(layout.state(x, b)), x0, b0
    )
    x, b = _loop((step, going, x0, b0), max_steps, slots)
    xs, bs = iter(x), iter(b)
    merged = [next(bs) if is_buffer else next(xs) for is_buffer in layout.is_buffer]
    return jtu.tree_unflatten(layout.treedef, merged)


def _run(step, going, x, b, max_steps, states=None):
    """The forward loop; with `states` (buffers of `max_steps` states) it also stores
    the state at the start of every iteration."""

    def cond(carry):
        i, x, b = carry[:3]
        return (i < max_steps) & eqxi.unvmap_any(going(x, b))

    def body(carry):
        i, x, b, *stored = carry
        if stored:
            stored = [
                [
                    lax.dynamic_update_index_in_dim(s, v, i, 0)
                    for s, v in zip(stored[0], x, strict=True)
                ]
            ]
        x, b = step(x, b)
        return (i + 1, x, b, *stored)

    i0 = jnp.asarray(0, jnp.int32)
    init = (i0, x, b) if states is None else (i0, x, b, states)
    return lax.while_loop(cond, body, init)


def _longest_segment(max_steps: int, slots: int) -> int:
    """The largest stride `_run_thinned` reaches within `max_steps` iterations: the
    least power of two `s` with `slots * s >= max_steps`."""
    stride = 1
    while slots * stride < max_steps:
        stride *= 2
    return stride


def _run_thinned(step, going, x, b, max_steps, slots):
    """The forward loop, storing the state at the start of every `stride`-th
    iteration in `slots` slots (and one more, written by the other iterations):
    every iteration's while they last (stride 1); when they are full, every other
    stored state is dropped and the stride doubles. At the end slot `m` holds the
    state at the start of iteration `m * stride`, for every `m * stride < n` (the
    iterations run). Returns `(n, x, b, store, stride)`."""
    # One slot more, written where an iteration's state is not kept (a write
    # whose slot does not depend on the state, with no read of what it overwrites).
    store = [jnp.zeros((slots + 1,) + v.shape, v.dtype) for v in x]
    # Mapped from the start where the state is (`batched_like`).
    store = batched_like(store, x)

    def thin(store):
        # Slots 2k -> k; the upper half is written again before it is read.
        return [jnp.concatenate([s[:slots:2], s[slots // 2 :]]) for s in store]

    def cond(carry):
        i, x, b = carry[:3]
        return (i < max_steps) & eqxi.unvmap_any(going(x, b))

    def body(carry):
        i, x, b, store, stride = carry
        full = i == slots * stride
        store = lax.cond(full, thin, lambda store: store, store)
        stride = jnp.where(full, 2 * stride, stride)
        at = jnp.where(i % stride == 0, i // stride, slots)
        store = [
            lax.dynamic_update_index_in_dim(s, v, at, 0)
            for s, v in zip(store, x, strict=True)
        ]
        x, b = step(x, b)
        return i + 1, x, b, store, stride

    zero = jnp.asarray(0, jnp.int32)
    return lax.while_loop(cond, body, (zero, x, b, store, zero + 1))


def _perturbed_leaves(step_diff, step_static, x0, b, inexact, perturbed_x):
    """Which leaves of the loop's state depend on what is differentiated: the
    inexact leaves perturbed initially, and those a step computes from a perturbed
    leaf or from the differentiated values the step closes over (`step_diff`), to a
    fixed point. Found by following the step's program (`_depends`): the outputs of
    `stop_gradient`, and integer and boolean values, depend on nothing."""
    x0 = [jnp.asarray(v) for v in x0]
    floats = [v for v, i in zip(x0, inexact, strict=True) if i]
    others = [v for v, i in zip(x0, inexact, strict=True) if not i]

    def f(step_diff, x_float):
        x_float, x_other = iter(x_float), iter(others)
        x = [next(x_float) if i else next(x_other) for i in inexact]
        out, _ = eqx.combine(step_diff, step_static)(x, b)
        return [o for o, i in zip(out, inexact, strict=True) if i]

    closed = jax.make_jaxpr(f)(step_diff, floats)
    num_diff = len(jtu.tree_leaves(step_diff))
    perturbed = [bool(p) for p, i in zip(perturbed_x, inexact, strict=True) if i]
    for _ in range(len(floats) + 1):
        out = _depends(closed.jaxpr, [True] * num_diff + perturbed)
        grown = [p or o for p, o in zip(perturbed, out, strict=True)]
        if grown == perturbed:
            break
        perturbed = grown
    chosen = iter(perturbed)
    return [next(chosen) if i else False for i in inexact]


def _differentiable(var) -> bool:
    aval = getattr(var, "aval", None)
    return aval is not None and jnp.issubdtype(
        getattr(aval, "dtype", jnp.int32), jnp.inexact
    )


def _depends(jaxpr, inputs: list) -> list:
    """For each output of `jaxpr`, whether its value depends differentiably on an
    input marked in `inputs` (over-approximated where unsure: an equation this does
    not know makes each inexact output depend on each marked input)."""
    live = {id(v) for v, marked in zip(jaxpr.invars, inputs, strict=True) if marked}

    def marked(vars_):
        return [id(v) in live for v in vars_]

    for eqn in jaxpr.eqns:
        ins = marked(eqn.invars)
        if not any(ins) or eqn.primitive.name == "stop_gradient":
            continue
        outs = _depends_eqn(eqn, ins)
        live.update(
            id(v)
            for v, o in zip(eqn.outvars, outs, strict=True)
            if o and _differentiable(v)
        )
    return [id(v) in live and _differentiable(v) for v in jaxpr.outvars]


def _depends_eqn(eqn, ins: list) -> list:
    """`_depends` for one equation: into the programs of calls, branches and loops;
    any marked input marks every output of the others."""
    name, params = eqn.primitive.name, eqn.params
    if name in ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"):
        inner = params.get("jaxpr", params.get("call_jaxpr"))
        if inner is not None:
            return _depends(getattr(inner, "jaxpr", inner), ins)
    if name == "cond":
        outs = [False] * len(eqn.outvars)
        for branch in params["branches"]:
            got = _depends(branch.jaxpr, ins[1:])
            outs = [a or b for a, b in zip(outs, got, strict=True)]
        return outs
    if name == "while":
        c, n = params["cond_nconsts"], params["body_nconsts"]
        consts, carry = ins[c : c + n], ins[c + n :]
        for _ in range(len(carry) + 1):
            got = _depends(params["body_jaxpr"].jaxpr, consts + carry)
            grown = [a or b for a, b in zip(carry, got, strict=True)]
            if grown == carry:
                break
            carry = grown
        return carry
    if name == "scan":
        k, n = params["num_consts"], params["num_carry"]
        consts, carry, xs = ins[:k], ins[k : k + n], ins[k + n :]
        for _ in range(n + 1):
            got = _depends(params["jaxpr"].jaxpr, consts + carry + xs)
            grown = [a or b for a, b in zip(carry, got[:n], strict=True)]
            if grown == carry:
                return grown + got[n:]
            carry = grown
        return [True] * len(eqn.outvars)
    return [True] * len(eqn.outvars)


# The condition is part of the differentiated argument only because what it closes
# over may be (e.g. `t1`): its output is boolean, so its cotangent is zero.
@eqx.filter_custom_vjp
def _loop(vjp_arg, max_steps, slots):
    step, going, x, b = vjp_arg
    _, x, b = _run(step, going, x, b, max_steps)
    return x, b


@_loop.def_fwd
def _loop_fwd(perturbed, vjp_arg, max_steps, slots):
    del perturbed
    step, going, x, b = vjp_arg
    if slots is not None:
        n, x, b, store, stride = _run_thinned(step, going, x, b, max_steps, slots)
        return (x, b), (n, store, b, stride)
    states = [jnp.zeros((max_steps,) + v.shape, v.dtype) for v in x]
    # Mapped from the start where the state is (`batched_like`).
    states = batched_like(states, x)
    n, x, b, states = _run(step, going, x, b, max_steps, states)
    return (x, b), (n, states, b, None)


@_loop.def_bwd
def _loop_bwd(residuals, grad_obj, perturbed, vjp_arg, max_steps, slots):
    n, states, b_final, stride = residuals
    step, going, x0, _ = vjp_arg
    ct_x, ct_b = grad_obj
    perturbed_step, _, perturbed_x, perturbed_b = perturbed
    # Differentiated: the step's perturbed leaves (what it closes over), and every
    # inexact leaf of the state and the buffers (their cotangents run through the
    # steps whether or not the initial values are perturbed).
    step_diff, step_static = eqx.partition(step, perturbed_step)
    b_inexact = [_is_inexact(v) for v in b_final]
    carry_ct_b = any(perturbed_b)
    # The state's leaves whose cotangents run through the steps: the inexact ones
    # that depend on something differentiated (what the step closes over, or the
    # initial state). The others, e.g. the times and the controller's memory when
    # neither `t0` nor `t1` is differentiated (the controller's factor stops
    # gradients), carry none, as in Equinox's loop. Carried, their cotangents took
    # 40% of the run time of the gradient over a `jax.vmap` of 256 Lotka-Volterra
    # solves (`bench_core.py` row h: 15.1 ms, 9.4 ms without).
    x_inexact = [_is_inexact(v) for v in x0]
    if not carry_ct_b:
        x_inexact = _perturbed_leaves(
            step_diff, step_static, x0, b_final, x_inexact, perturbed_x
        )

    def pick(values, mask, keep=True):
        return [v for v, m in zip(values, mask, strict=True) if m == keep]

    def merge(mask, chosen, others):
        chosen, others = iter(chosen), iter(others)
        return [next(chosen) if m else next(others) for m in mask]

    def zeros_for_none(cts, like):
        return [
            jnp.zeros_like(v) if c is None else c
            for c, v in zip(cts, like, strict=True)
        ]

    ct_x = pick(zeros_for_none(ct_x, x0), x_inexact)
    ct_b = pick(zeros_for_none(ct_b, b_final), b_inexact)
    ct_step = jtu.tree_map(jnp.zeros_like, step_diff)
    b_float, b_other = pick(b_final, b_inexact), pick(b_final, b_inexact, False)

    # The buffers' cotangents need not run through the steps unless the initial
    # buffers are differentiated: each slot is written at most once and read only
    # where it was written before (the contract of Equinox's loop buffers, which the
    # solve's step keeps), so the cotangent of a slot's write is the final buffers'
    # cotangent there, whichever step wrote it. Carried, a whole buffer's cotangent
    # would be rebuilt (zeroing the slots written) and copied at every step (measured:
    # two copies of the 1.4 MB dense-save buffer of a 256-trajectory neural-ODE
    # gradient per step, 5% of its run time).
    ct_b_written = ct_b

    def linearise(x):
        """The step from state `x`: the next state, and a function taking the
        cotangents after the step to those before it (the step's transpose, its
        linearisation's values computed here)."""
        x_other = pick(x, x_inexact, False)

        def f(step_diff, x_float, b_float):
            s = eqx.combine(step_diff, step_static)
            x1, b1 = s(
                merge(x_inexact, x_float, x_other), merge(b_inexact, b_float, b_other)
            )
            return (pick(x1, x_inexact), pick(b1, b_inexact)), pick(
                x1, x_inexact, False
            )

        if carry_ct_b:
            (x1, _), vjp, x1_other = jax.vjp(
                f, step_diff, pick(x, x_inexact), b_float, has_aux=True
            )
        else:
            (x1, _), vjp, x1_other = jax.vjp(
                lambda step_diff, x_float: f(step_diff, x_float, b_float),
                step_diff,
                pick(x, x_inexact),
                has_aux=True,
            )

        def transpose(cts):
            ct_step, ct_x, ct_b_now = cts
            if carry_ct_b:
                d_step, d_x, d_b = vjp((ct_x, ct_b_now))
            else:
                (d_step, d_x), d_b = vjp((ct_x, ct_b_written)), ct_b_now
            return jtu.tree_map(jnp.add, ct_step, d_step), d_x, d_b

        return merge(x_inexact, x1, x1_other), transpose

    def read(states, j):
        # The state read once, into arrays of its own (a branch's outputs), before
        # the step reads it: under `jax.vmap` the stored states are laid out member
        # by member (`(batch, iterations, ...)`), and XLA fused that strided read
        # into each kernel of the step that uses the state (measured on CPU, the
        # gradient of a loss over a `vmap` of 256 Lotka-Volterra solves,
        # `bench_core.py` row h: 18.1 ms before, 14.6 ms after; XLA removes an
        # `optimization_barrier` before fusing, so that does not do it). The branch
        # not taken is never run (`j >= 0` in the loop).
        return lax.cond(
            j >= 0,
            lambda: [v[j] for v in states],
            lambda: [jnp.zeros(v.shape[1:], v.dtype) for v in states],
        )

    # The cotangents (and the segment below) mapped from the start where the stored
    # states are (`batched_like`): the steps linearised at mapped states give
    # mapped cotangents.
    init_cts = (ct_step, ct_x, ct_b if carry_ct_b else [])
    if states:
        leaves, treedef = jtu.tree_flatten(init_cts)
        leaves = batched_like(leaves, [states[0]] * len(leaves))
        init_cts = jtu.tree_unflatten(treedef, leaves)
    if slots is None:
        # The cotangents through the steps whose states are `states[:n]`, the
        # last first.
        def body(carry):
            j, cts = carry
            _, transpose = linearise(read(states, j))
            return j - 1, transpose(cts)

        _, cts = lax.while_loop(lambda carry: carry[0] >= 0, body, (n - 1, init_cts))
    else:
        # Segment by segment, the last first: the states of a segment's `length`
        # iterations recomputed from the state stored at its start (none with
        # stride 1), then differentiated from the last: `2 * length - 1` turns of
        # one loop, each linearising the step at one state and either keeping the
        # next state (recomputing) or transposing (differentiating). One copy of
        # the step in the program, not a second one to recompute with. Measured on
        # CPU against two loops (`bench_core.py` rows g, h and i): 14-16% fewer
        # optimised HLO lines, rows h and i compiled in 0.85x-0.92x the time, g as
        # before, the same run times (i recomputes); a 256-trajectory neural ODE
        # of 153 steps (stride 4) ran as fast. A recomputing turn also computes
        # the linearisation's values: with the store forced on a tiny state (2
        # values, 251 steps) the gradient ran 1.15x slower. The buffers stand in
        # at their final values, as in the backward pass (the writes do not matter
        # to the states).
        longest = _longest_segment(max_steps, slots)
        # One slot more, written by the turns that differentiate.
        segment0 = [jnp.zeros((longest + 1,) + v.shape, v.dtype) for v in x0]
        segment0 = batched_like(segment0, states)

        def body(carry):
            m, j, segment, cts = carry
            length = jnp.minimum(stride, n - m * stride)
            recomputing = j < length - 1
            k = jnp.where(recomputing, j, 2 * length - 2 - j)
            # Read into arrays of their own, as `read` does.
            x = lax.cond(
                k == 0,
                lambda: [v[m] for v in states],
                lambda: [v[k] for v in segment],
            )
            x1, transpose = linearise(x)
            at = jnp.where(recomputing, k + 1, longest)
            segment = [
                lax.dynamic_update_index_in_dim(s, v, at, 0)
                for s, v in zip(segment, x1, strict=True)
            ]
            cts = lax.cond(recomputing, lambda cts: cts, transpose, cts)
            last = j == 2 * length - 2
            return jnp.where(last, m - 1, m), jnp.where(last, 0, j + 1), segment, cts

        segments = (n + stride - 1) // stride
        zero = jnp.zeros_like(segments)
        _, _, _, cts = lax.while_loop(
            lambda carry: carry[0] >= 0, body, (segments - 1, zero, segment0, init_cts)
        )
    ct_step, ct_x, ct_b = cts
    if not carry_ct_b:
        ct_b = [None] * len(ct_b_written)
    nones_x, nones_b = [None] * len(x0), [None] * len(b_final)
    grad_x = merge(x_inexact, ct_x, nones_x)
    grad_b = merge(b_inexact, ct_b, nones_b)
    grad_x = [g if p else None for g, p in zip(grad_x, perturbed_x, strict=True)]
    grad_b = [g if p else None for g, p in zip(grad_b, perturbed_b, strict=True)]
    no_going = jtu.tree_map(lambda _: None, going)
    return ct_step, no_going, grad_x, grad_b
