"""`diffeqsolve`: arguments -> checks -> initial state -> adjoint loop -> Solution."""

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._adjoint.base import AbstractAdjoint, AbstractCustomGradientAdjoint
from .._adjoint.checkpoint import RecursiveCheckpointAdjoint
from .._controller.base import AbstractStepSizeController
from .._controller.clip import unwrap_controller
from .._controller.constant import ConstantStepSize, StepTo
from .._event import Event
from .._path.dense import DenseInterpolation
from .._progress import AbstractProgressMeter, NoProgressMeter
from .._saveat import SaveAt, is_subsaveat
from .._solution import RESULTS, Solution, is_event, is_okay
from .._solver.base import AbstractSolver
from .._term import forward_time_terms
from . import checks
from .event import EventSpec, EventState, init_event_state, locate_terminal_event
from .fixed import fixed_step_plan, run_fixed_steps
from .loop import LoopSpec, clip_to_end, run_loop
from .save import (
    finish_save_state,
    init_dense_state,
    init_save_state,
    save_final_step,
)
from .state import DenseState, LoopState


def _time_dtype(t0, t1, dt0):
    values = [t0, t1] + ([] if dt0 is None else [dt0])
    dtype = jnp.result_type(*values)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return dtype


def _to_array(x):
    return jnp.asarray(x) if isinstance(x, (int, float, complex)) else x


def diffeqsolve(
    terms: PyTree,
    solver: AbstractSolver,
    t0,
    t1,
    dt0,
    y0: PyTree,
    args: PyTree = None,
    *,
    saveat: SaveAt = SaveAt(t1=True),
    stepsize_controller: AbstractStepSizeController = ConstantStepSize(),
    adjoint: AbstractAdjoint = RecursiveCheckpointAdjoint(),
    event: Any = None,
    max_steps: int | None = 4096,
    throw: bool = True,
    progress_meter: AbstractProgressMeter = NoProgressMeter(),
    solver_state: PyTree = None,
    controller_state: PyTree = None,
    made_jump: Any = None,
    discrete_terminating_event: Any = None,
) -> Solution:
    """Solves a differential equation from `t0` to `t1`.

    **Arguments:**

    - `terms`: the equation, as a PyTree of terms matching `solver.term_structure`
      (e.g. `ODETerm(f)` for `dy/dt = f(t, y, args)`).
    - `solver`: the solver instance, e.g. `Tsit5()`.
    - `t0`, `t1`: start and end times. `t1 < t0` integrates backwards in time;
      `t0 == t1` returns `y0`.
    - `dt0`: the first step size (same sign as `t1 - t0`). With an adaptive
      controller, `None` chooses it automatically (Hairer–Nørsett–Wanner).
    - `y0`: the initial state: any PyTree of floating-point arrays.
    - `args`: any PyTree passed to the vector field.
    - `saveat`: what to save (`SaveAt`); by default the state at `t1`.
    - `stepsize_controller`: `ConstantStepSize()` (default), `PIDController(...)`,
      `StepTo(ts)` or `ClipStepSizeController(...)`.
    - `adjoint`: how to differentiate; `RecursiveCheckpointAdjoint()` by default.
    - `event`: an `Event`: stop the solve when a condition is met (or record each
      time it is met, with `Event(..., terminate=False)`).
    - `max_steps`: the most steps to take (accepted or rejected).
    - `throw`: raise a runtime error if the solve fails. With `throw=False` the
      failure is reported in `Solution.result` and everything saved before it is
      kept; unfilled outputs are `inf`.
    - `progress_meter`: reports progress; `NoProgressMeter()` by default.
    - `solver_state`, `controller_state`, `made_jump`: resume from a previous solve's
      final states (save them with `SaveAt(solver_state=True, ...)`).
    - `discrete_terminating_event`: deprecated, as in Diffrax (use `event`); accepted
      with a `UserWarning`.

    **Returns:** a `Solution`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import diffeqx

    term = diffeqx.ODETerm(lambda t, y, args: -args * y)
    sol = diffeqx.diffeqsolve(
        term, diffeqx.Tsit5(), t0=0.0, t1=1.0, dt0=0.1, y0=jnp.array([1.0, 2.0]),
        args=0.5, saveat=diffeqx.SaveAt(ts=jnp.linspace(0, 1, 5)),
        stepsize_controller=diffeqx.PIDController(rtol=1e-6, atol=1e-8),
    )
    ```
    """
    checks.check_solver(solver)
    checks.check_terms(terms, solver)
    checks.check_y0(y0)
    checks.check_times(t0, t1)
    checks.check_max_steps(max_steps)
    checks.check_controller(stepsize_controller, solver, dt0, t0, t1)
    event = checks.resolve_deprecated_event(event, discrete_terminating_event)
    if event is not None and not isinstance(event, Event):
        raise TypeError(
            "`event` must be an `Event(cond_fn, ...)` or None, got "
            f"{checks._describe(event)}."
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be an AbstractAdjoint instance such as "
            f"`RecursiveCheckpointAdjoint()`, got {checks._describe(adjoint)}."
        )
    if not isinstance(progress_meter, AbstractProgressMeter):
        raise TypeError(
            "`progress_meter` must be an AbstractProgressMeter instance such as "
            f"`NoProgressMeter()`, got {checks._describe(progress_meter)}."
        )
    subs = (
        []
        if saveat.subs is None
        else jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    )
    checks.check_saveat(saveat, t0, t1, max_steps, subs)
    y0 = jtu.tree_map(_to_array, y0)
    dtype = _time_dtype(t0, t1, dt0)
    # The values as given: under `jax.jit` even a constant becomes a tracer once
    # converted, and the fixed-step plan needs to read them at trace time.
    given_times = (t0, t1, dt0)
    t0 = jnp.asarray(t0, dtype=dtype)
    t1 = jnp.asarray(t1, dtype=dtype)
    if dt0 is not None:
        dt0 = jnp.asarray(dt0, dtype=dtype)
    checks.check_step_protocol(terms, solver, stepsize_controller, t0, t1, y0, args)
    if isinstance(adjoint, AbstractCustomGradientAdjoint):
        # The adjoint wraps a whole solve in its own derivative rule.
        return adjoint.custom_solve(
            diffeqsolve,
            dict(
                terms=terms,
                solver=solver,
                t0=t0,
                t1=t1,
                dt0=dt0,
                y0=y0,
                args=args,
                saveat=saveat,
                stepsize_controller=stepsize_controller,
                event=event,
                max_steps=max_steps,
                throw=throw,
                progress_meter=progress_meter,
                solver_state=solver_state,
                controller_state=controller_state,
                made_jump=made_jump,
            ),
        )

    # Integrate forwards in tau = direction * t.
    direction = jnp.where(t1 >= t0, 1, -1).astype(dtype)
    tau0, tau1 = t0 * direction, t1 * direction
    dtau0 = None if dt0 is None else dt0 * direction
    fwd_terms = forward_time_terms(terms, direction)
    controller = stepsize_controller.wrap(direction)
    error_order = solver.error_order(terms)

    tnext, init_controller_state = controller.init(
        fwd_terms, tau0, tau1, y0, dtau0, args, solver.func, error_order
    )
    tnext = clip_to_end(tau0, jnp.asarray(tnext, dtype=dtype), tau1)
    if controller_state is None:
        controller_state = init_controller_state
    if solver_state is None:
        solver_state = solver.init(fwd_terms, tau0, tnext, y0, args)
    made_jump = jnp.asarray(False) if made_jump is None else jnp.asarray(made_jump)

    subs_ts = [
        None if sub.ts is None else sub.ts.astype(dtype) * direction for sub in subs
    ]
    save_state = [
        init_save_state(sub, tau0, y0, args, max_steps, direction) for sub in subs
    ]
    dense_state = DenseState(save_index=None, ts=None, infos=None)
    dense_info_shape = None
    if saveat.dense or event is not None:
        if max_steps is None:
            raise ValueError(
                "`SaveAt(dense=True)` needs a finite `max_steps` to size its output; "
                "got `max_steps=None`."
            )
        dense_info_shape = eqx.filter_eval_shape(
            lambda: solver.step(
                fwd_terms, tau0, tnext, y0, args, solver_state, made_jump
            )[2]
        )
    if saveat.dense:
        dense_state = init_dense_state(tau0, dense_info_shape, max_steps)

    inner = unwrap_controller(controller)
    event_spec = None
    event_state = EventState(values=None, count=None, ts=None, ys=None, masks=None)
    event_mask = None
    if event is not None:
        event_spec = EventSpec(
            event=event,
            terms=terms,
            solver=solver,
            stepsize_controller=stepsize_controller,
        )
        event_state = init_event_state(
            event_spec, t0, tau0, y0, args, dtype, dense_info_shape
        )
        event_mask = jtu.tree_map(lambda v: jnp.zeros((), bool), event_state.values)
    spec = LoopSpec(
        terms=fwd_terms,
        solver=solver,
        controller=controller,
        args=args,
        t1=tau1,
        direction=direction,
        subs=subs,
        subs_ts=subs_ts,
        error_order=error_order,
        max_steps=max_steps,
        dense=saveat.dense,
        always_accept=isinstance(inner, (ConstantStepSize, StepTo)),
        may_jump=controller.may_jump,
        event_spec=event_spec,
        t0=tau0,
        progress_meter=(
            None if isinstance(progress_meter, NoProgressMeter) else progress_meter
        ),
    )
    zero = jnp.asarray(0)
    init_state = LoopState(
        y=y0,
        tprev=tau0,
        tnext=tnext,
        made_jump=made_jump,
        solver_state=solver_state,
        controller_state=controller_state,
        result=_initial_result(t0, t1, dt0),
        num_steps=zero,
        num_accepted_steps=zero,
        num_rejected_steps=zero,
        save_state=save_state,
        dense_state=dense_state,
        event_state=event_state,
        event_mask=event_mask,
        progress_state=progress_meter.init(),
    )
    fixed = None
    if event is None and spec.progress_meter is None:
        fixed = fixed_step_plan(
            stepsize_controller, saveat, subs, adjoint, *given_times, max_steps, dtype
        )
    if fixed is not None:
        num_fixed_steps, block = fixed
        final = run_fixed_steps(spec, init_state, num_fixed_steps, block)
    else:
        final = adjoint.loop(
            run_loop=lambda state, outer, inner_loop: run_loop(
                spec, state, outer, inner_loop
            ),
            init_state=init_state,
            max_steps=max_steps,
        )
    if event is not None and event.terminate:
        final = _finish_terminal_event(spec, final)
    progress_meter.close(final.progress_state)
    return _build_solution(
        spec, saveat, subs, final, t0, t1, y0, args, throw, max_steps, event
    )


def _finish_terminal_event(spec, final):
    """Moves the end of a solve stopped by a terminating event onto the event, and
    makes the saves that fall between the last step's start and the event."""
    fired = is_event(final.result)
    t_event, y_event, mask, interpolant = locate_terminal_event(
        spec.event_spec,
        final.event_state,
        final.y,
        spec.args,
        spec.direction,
        spec.solver.interpolation_cls,
    )
    t_end = jnp.where(fired, t_event, final.tprev)
    y_end = jtu.tree_map(lambda a, b: jnp.where(fired, a, b), y_event, final.y)
    save_state = [
        save_final_step(
            state,
            sub,
            ts_tau,
            interpolant,
            t_end,
            y_end,
            fired,
            spec.args,
            spec.direction,
        )
        for state, sub, ts_tau in zip(
            final.save_state, spec.subs, spec.subs_ts, strict=True
        )
    ]
    event_mask = jtu.tree_map(
        lambda m, old: jnp.where(fired, m, old), mask, final.event_mask
    )
    return dataclasses.replace(
        final, tprev=t_end, y=y_end, save_state=save_state, event_mask=event_mask
    )


def _initial_result(t0, t1, dt0):
    # Traced arguments can only be checked at run time (concrete ones were checked
    # before tracing); a bad sign stops the solve before its first step.
    if dt0 is None:
        return RESULTS.successful
    wrong_sign = (t1 - t0) * dt0 < 0
    return RESULTS.where(wrong_sign, RESULTS.dt0_wrong_sign, RESULTS.successful)


def _build_solution(
    spec, saveat, subs, final, t0, t1, y0, args, throw, max_steps, event
):
    okay = is_okay(final.result)
    outputs = [
        finish_save_state(
            state, sub, ts_tau, final.tprev, final.y, okay, args, spec.direction
        )
        for state, sub, ts_tau in zip(final.save_state, subs, spec.subs_ts, strict=True)
    ]
    if saveat.subs is None:
        ts = ys = None
    else:
        treedef = jtu.tree_structure(saveat.subs, is_leaf=is_subsaveat)
        ts = jtu.tree_unflatten(treedef, [out[0] for out in outputs])
        ys = jtu.tree_unflatten(treedef, [out[1] for out in outputs])
        if isinstance(saveat.subs, type(subs[0])):
            ts, ys = outputs[0]
    interpolation = None
    if saveat.dense:
        dense = final.dense_state
        interpolation = DenseInterpolation(
            ts=dense.ts,
            ts_size=dense.save_index + 1,
            infos=dense.infos,
            interpolation_cls=spec.solver.interpolation_cls,
            direction=spec.direction,
            t0_if_trivial=t0,
            y0_if_trivial=y0,
        )
    stats = dict(
        num_steps=final.num_steps,
        num_accepted_steps=final.num_accepted_steps,
        num_rejected_steps=final.num_rejected_steps,
        max_steps=max_steps,
    )
    result = final.result
    event_mask = event_ts = event_ys = None
    if event is not None:
        if event.terminate:
            event_mask = final.event_mask
            t1 = jnp.where(is_event(result), final.tprev * spec.direction, t1)
        else:
            event_mask = final.event_state.masks
            event_ts = final.event_state.ts
            event_ys = final.event_state.ys
    if throw:
        failed = ~is_okay(result)
        # The error is threaded through every output, so that it is raised whenever
        # any of them is used. (A host callback in the program costs some run time on
        # CPU; `throw=False` avoids it.)
        ts, ys, interpolation, stats = result.error_if(
            (ts, ys, interpolation, stats), failed
        )
    return Solution(
        t0=t0,
        t1=t1,
        ts=ts,
        ys=ys,
        interpolation=interpolation,
        stats=stats,
        result=result,
        solver_state=final.solver_state if saveat.solver_state else None,
        controller_state=final.controller_state if saveat.controller_state else None,
        made_jump=final.made_jump if saveat.made_jump else None,
        event_mask=event_mask,
        event_ts=event_ts,
        event_ys=event_ys,
    )
