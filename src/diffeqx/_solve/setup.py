"""Setting up a solve: the inputs' dtypes, and the loop's specification and initial
state."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._controller.clip import unwrap_controller
from .._controller.constant import ConstantStepSize, StepTo
from .._progress import NoProgressMeter
from .._solution import RESULTS, where_result
from .._solver.runge_kutta import AbstractERK
from .._term import forward_time_terms
from .._transforms import (
    TransformDetectionError,
    active_transforms,
    batched_as,
    batched_leaf,
)
from .event import EventSpec, EventState, init_event_state
from .loop import LoopSpec
from .save import (
    defer_ts,
    init_deferred,
    init_dense_state,
    init_save_state,
    may_defer,
)
from .state import DenseState, LoopState


def promote_inputs(t0, t1, dt0, y0, subs):
    """`(t0, t1, dt0, y0)` as arrays, in the dtypes Diffrax uses.

    Times take the type of `t0`, `t1`, `dt0` and every `SaveAt` `ts` together
    (Python numbers are weakly typed, so `t0=0` with float32 `ts` is float32);
    integer times become the default floating dtype. Each leaf of `y0` is promoted
    with the time dtype, so integer or boolean leaves become floating point. The
    dtypes are worked out with JAX's standard promotion rules, and every conversion
    is an explicit cast, so this also holds under `jax_numpy_dtype_promotion=strict`.
    """
    times = [t0, t1] + ([] if dt0 is None else [dt0])
    times += [sub.ts for sub in subs if sub.ts is not None]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*times)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                "Times (`t0`, `t1`, `dt0`, `SaveAt(ts=...)`) must be real, got the "
                f"complex dtype {dtype}."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        y0 = jtu.tree_map(
            lambda leaf: jnp.asarray(leaf, dtype=jnp.result_type(leaf, dtype)), y0
        )
    t0 = jnp.asarray(t0, dtype=dtype)
    t1 = jnp.asarray(t1, dtype=dtype)
    dt0 = None if dt0 is None else jnp.asarray(dt0, dtype=dtype)
    return t0, t1, dt0, y0


def initial_state(
    *,
    terms,
    solver,
    t0,
    t1,
    dt0,
    y0,
    args,
    saveat,
    subs,
    stepsize_controller,
    event,
    max_steps,
    progress_meter,
    solver_state,
    controller_state,
    made_jump,
    times_are_numbers: bool = False,
    forwards: bool = False,
    seeded: bool = True,
) -> tuple[LoopSpec, LoopState]:
    """The loop's specification (what stays fixed) and its initial state. The loop
    integrates forwards in `tau = direction * t`. `forwards=True` says that
    `t0 <= t1` is known at trace time: the terms then receive the loop's times as
    they are (no multiplications by a direction of 1, which XLA cannot drop when the
    direction is computed at run time). `seeded=False` leaves the initial values as they
    are, without `_runtime_zero` (for the fixed-step scan: see `_runtime_zero`)."""
    dtype = t0.dtype
    direction = jnp.where(t1 >= t0, 1, -1).astype(dtype)
    fwd_terms = forward_time_terms(terms, None if forwards else direction)
    tau0, tau1 = t0 * direction, t1 * direction
    dtau0 = None if dt0 is None else dt0 * direction
    controller = stepsize_controller.wrap(direction)
    error_order = solver.error_order(terms)

    tnext, init_controller_state = controller.init(
        fwd_terms, tau0, tau1, y0, dtau0, args, solver.func, error_order
    )
    tnext = jnp.minimum(jnp.asarray(tnext, dtype=dtype), tau1)
    if controller_state is None:
        controller_state = init_controller_state
    if solver_state is None:
        solver_state = solver.init(fwd_terms, tau0, tnext, y0, args)
    # A `made_jump` passed in (resuming a solve) reaches the first step even when
    # the controller never jumps, as in Diffrax: the loop then carries it.
    given_jump = made_jump is not None and made_jump is not False
    made_jump = jnp.asarray(False) if made_jump is None else jnp.asarray(made_jump)

    subs_ts = [
        None if sub.ts is None else sub.ts.astype(dtype) * direction for sub in subs
    ]
    save_state = [
        init_save_state(sub, tau0, y0, args, max_steps, direction) for sub in subs
    ]
    dense_state = DenseState(save_index=None, ts=None, infos=None)
    dense_info_shape = None
    if saveat.dense or event is not None or may_defer(subs):
        dense_info_shape = _dense_info_shape(
            solver, fwd_terms, tau0, tnext, y0, args, solver_state, made_jump
        )
    save_state = [
        dataclasses.replace(
            state,
            deferred=init_deferred(sub, tau0, dense_info_shape, max_steps),
            deferred_count=jnp.asarray(0),
        )
        if defer_ts(sub, max_steps, dense_info_shape)
        else state
        for sub, state in zip(subs, save_state, strict=True)
    ]
    if saveat.dense:
        dense_state = init_dense_state(tau0, dense_info_shape, max_steps)

    event_spec = None
    event_state = EventState(values=None, count=None, ts=None, ys=None, masks=None)
    event_mask = None
    event_start = None
    if event is not None:
        event_spec = EventSpec(
            event=event,
            terms=terms,
            solver=solver,
            stepsize_controller=stepsize_controller,
            t0=t0,
            t1=t1,
            dt0=dt0,
            saveat=saveat,
            max_steps=max_steps,
        )
        event_start = init_event_state(
            event_spec, t0, tau0, y0, args, dtype, dense_info_shape
        )
        event_state, event_mask = event_start.state, event_start.mask
    # The times the loop reads are seeded too (see `_runtime_zero`): computed from
    # array arguments (e.g. `t1=ts[-1]`), they would otherwise be ready at once.
    seed = _runtime_zero(y0) if seeded else None
    tau0_loop, tau1_loop = _seeded((tau0, tau1), seed)
    if seed is not None:
        subs_ts = [
            None if x is None else jnp.where(seed == 0, x, x + jnp.nan) for x in subs_ts
        ]
    spec = LoopSpec(
        terms=fwd_terms,
        solver=solver,
        controller=controller,
        args=args,
        t1=tau1_loop,
        direction=direction,
        subs=subs,
        subs_ts=subs_ts,
        error_order=error_order,
        max_steps=max_steps,
        dense=saveat.dense,
        always_accept=isinstance(
            unwrap_controller(controller), (ConstantStepSize, StepTo)
        ),
        may_jump=controller.may_jump or given_jump,
        event_spec=event_spec,
        t0=tau0_loop,
        progress_meter=(
            None if isinstance(progress_meter, NoProgressMeter) else progress_meter
        ),
        progress_scale=progress_scale(tau0, tau1, times_are_numbers),
    )
    zero = jnp.asarray(0)
    init_state = LoopState(
        y=y0,
        tprev=tau0_loop,
        tnext=_seeded(tnext, seed),
        made_jump=made_jump,
        solver_state=solver_state,
        controller_state=controller_state,
        result=_initial_result(t0, t1, dt0, event_start),
        num_steps=zero,
        num_accepted_steps=_seeded(zero, seed),
        save_state=_seeded(save_state, seed),
        dense_state=_seeded(dense_state, seed),
        event_state=_seeded(event_state, seed),
        event_mask=event_mask,
        progress_state=progress_meter.init(),
    )
    # Not for the fixed-step scan (`seeded=False`), whose steps are the same for
    # every member and whose times stay constants that XLA folds.
    mapped = (
        batched_leaf((y0, terms, args, t0, t1, dt0), through_derivatives=True)
        if seeded
        else None
    )
    if mapped is not None:
        # The loop's condition is then mapped too: through the step size with an
        # adaptive controller, through each member's finite-state check (and its
        # own times, where they are mapped) with constant steps. The step body
        # holds the members that have finished (`LoopSpec.mask_members`). Every
        # value of the loop ends up mapped; started mapped (`batched_as`), the step
        # is batched twice at trace time (with the loop's own predicate unmapped),
        # where started unmapped (e.g. only a Brownian path's key mapped) JAX would
        # batch it four times.
        spec = dataclasses.replace(spec, mask_members=True)
        init_state = batched_as(init_state, mapped)
    return spec, init_state


def _dense_info_shape(solver, terms, t0, t1, y0, args, solver_state, made_jump):
    """The shapes of the dense output information of `solver`'s steps: from the
    solver itself where it is an explicit Runge–Kutta method running the
    `AbstractERK` engine's own `step` (one trace of the vector field, where tracing
    the step would trace it once per stage), else from the step traced for its
    shapes."""
    if isinstance(solver, AbstractERK) and type(solver).step is AbstractERK.step:
        return solver._dense_info_shape(terms, t0, t1, y0, args)
    return eqx.filter_eval_shape(
        lambda: solver.step(terms, t0, t1, y0, args, solver_state, made_jump)[2]
    )


def _runtime_zero(y0):
    """An integer zero that XLA cannot fold into a constant: computed from the first
    non-empty leaf `x` of `y0` as `any(isnan(x)) >> 1` (zero whatever `x` holds);
    None (no seeding) if `y0` holds no elements or the transformations being
    applied cannot be read.

    The loop's initial counters and times are seeded with it (`_seeded`). As
    constants, each would be a separate copy that XLA's CPU runtime can start
    before anything else; with more than eight such copies ready at once it hands
    part of the program to another thread, and the solve then waits on that
    thread (measured on 2 CPU cores, a 12-step Tsit5 solve with `SaveAt(ts=...)`:
    80-140 us with constants, 83 us seeded, 35 us seeded and with the
    interpolation's small products written out). Seeded, they wait for `y0`.

    The fixed-step scan (`fixed.py`) starts unseeded (`initial_state(seeded=False)`):
    its loop carries few scalars, so it stays on one thread without, and each seeded
    value costs a compiled kernel of its own (six in a 10,000-step Euler or RK4 solve,
    a quarter to a third of XLA's compile time there; measured on 2 CPU cores, the
    same run time)."""
    try:
        active_transforms(strict=True)
    except TransformDetectionError:
        # Under a transformation diffeqx does not know (e.g. `jax.experimental.jet`)
        # the operations below may have no rule; the solve says so itself later.
        return None
    for leaf in jtu.tree_leaves(y0):
        if jnp.size(leaf) > 0:
            # A reduction, which XLA does not recompute inside each value seeded
            # with it (an elementwise zero would be, making them all ready at once
            # again).
            flag = jnp.any(jnp.isnan(leaf)).astype(jnp.asarray(0).dtype)
            return jax.lax.shift_right_logical(flag, jnp.ones_like(flag))
    return None


def _seeded(tree, seed):
    """`tree` with every integer or floating scalar selected by `seed == 0`: the
    same values, computed at run time (see `_runtime_zero`)."""

    if seed is None:
        return tree

    def _leaf(x):
        if not isinstance(x, jax.Array) or jnp.ndim(x) != 0:
            return x
        # Selects rather than sums keep a weakly typed value weakly typed.
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.where(seed == 0, x, x + 1)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.where(seed == 0, x, x + jnp.nan)
        return x

    return jtu.tree_map(_leaf, tree)


def _initial_result(t0, t1, dt0, event_start):
    # Traced arguments can only be checked at run time (concrete ones were checked
    # before tracing); a bad sign stops the solve before its first step. So does a
    # terminating event that fires at `t0`.
    result = RESULTS.successful
    if event_start is not None:
        result = where_result(event_start.stop, RESULTS.event_occurred, result)
    if dt0 is None:
        return result
    wrong_sign = (t1 - t0) * dt0 < 0
    return where_result(wrong_sign, RESULTS.dt0_wrong_sign, result)


def progress_scale(tau0, tau1, times_are_numbers):
    """`1 / (t1 - t0)`, by which the progress fraction is multiplied, when `t0` and
    `t1` were given as Python numbers; else None (the fraction is then a division).

    This is how Diffrax's progress comes out: it compiles Python-number times as
    constants, and XLA turns a division by a constant into a multiplication by its
    reciprocal, so progress meters print e.g. 2.00% rather than nothing for the
    first step of 0.1 on [0, 5]."""
    if not times_are_numbers:
        return None
    span = tau1 - tau0
    return jnp.where(span > 0, jnp.reciprocal(jnp.where(span > 0, span, 1)), 0)
