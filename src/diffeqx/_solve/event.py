"""Events inside the solve loop: evaluating conditions, detecting that one fired
during a step, and locating the event time."""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._event import Event


class EventStep(eqx.Module):
    """The step in which a terminating event fired, kept so that the event can be
    located on its interpolant after the loop."""

    tprev: Any
    tnext: Any
    dense_info: Any
    old_values: Any  # condition values at `tprev`
    fired: Any  # which conditions fired in the step


class EventState(eqx.Module):
    """Condition values at the start of the current step; for a terminating event,
    the step in which it fired; for a non-terminating one, the record of events so
    far (write-once buffers)."""

    values: Any
    count: Any
    ts: Any
    ys: Any
    masks: Any
    last: Any = None


class EventSpec(eqx.Module):
    """What the loop needs to evaluate an `Event`'s conditions."""

    event: Event
    terms: Any  # the user's terms, in the user's time
    solver: Any
    stepsize_controller: Any

    def values(self, t, y, args):
        def _one(fn):
            value = fn(
                t,
                y,
                args,
                terms=self.terms,
                solver=self.solver,
                stepsize_controller=self.stepsize_controller,
            )
            value = jnp.asarray(value)
            if value.shape != ():
                raise ValueError(
                    "An event condition must return a scalar, but returned shape "
                    f"{value.shape}."
                )
            return value

        return jtu.tree_map(_one, self.event.cond_fn)


def _fill(x, size):
    fill = jnp.inf if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    return jnp.full((size,) + x.shape, fill, dtype=x.dtype)


def init_event_state(
    spec: EventSpec, t0_user, tau0, y0, args, tdtype, dense_info_shape
) -> EventState:
    values = spec.values(t0_user, y0, args)
    if spec.event.terminate:
        last = EventStep(
            tprev=tau0,
            tnext=tau0,
            dense_info=jtu.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), dense_info_shape
            ),
            old_values=values,
            fired=jtu.tree_map(lambda v: jnp.zeros((), bool), values),
        )
        return EventState(
            values=values, count=None, ts=None, ys=None, masks=None, last=last
        )
    n = spec.event.max_events
    masks = jtu.tree_map(lambda _: jnp.zeros((n,), bool), values)
    return EventState(
        values=values,
        count=jnp.asarray(0),
        ts=jnp.full((n,), jnp.inf, dtype=tdtype),
        ys=jtu.tree_map(lambda y: _fill(jnp.asarray(y), n), y0),
        masks=masks,
    )


def _fired(old, new, direction):
    if jnp.issubdtype(new.dtype, jnp.bool_):
        return new & ~old
    up = (old < 0) & (new >= 0)
    down = (old > 0) & (new <= 0)
    if direction is None:
        return up | down
    return up if direction else down


def _locate(spec: EventSpec, fn, old, new, tprev, tnext, interpolant, args, sign):
    """The time in `[tprev, tnext]` (integration time) at which `fn` crosses zero."""
    dt = tnext - tprev
    # Start from the secant through the two end values.
    fraction = jnp.clip(old / jnp.where(old == new, 1, old - new), 0, 1)
    guess = (tprev + fraction.astype(dt.dtype) * dt).astype(dt.dtype)

    def residual(tau, _):
        value = fn(
            sign * tau,
            interpolant.evaluate(tau),
            args,
            terms=spec.terms,
            solver=spec.solver,
            stepsize_controller=spec.stepsize_controller,
        )
        return jnp.asarray(value, dtype=dt.dtype)

    sol = optx.root_find(
        residual,
        spec.event.root_finder,
        guess,
        options=dict(lower=tprev, upper=tnext),
        throw=False,
    )
    return jnp.clip(sol.value, tprev, tnext)


def detect_events(spec: EventSpec, state: EventState, tnext, y1, live, args, sign):
    """Evaluates the conditions at the end of a step: `(values, fired_any, fired)`.
    Only steps with `live` true can fire; the values are kept from before otherwise."""
    new = spec.values(sign * tnext, y1, args)
    fired = jtu.tree_map(
        lambda o, n: _fired(o, n, spec.event.direction) & live, state.values, new
    )
    fired_any = jnp.any(jnp.stack([jnp.asarray(f) for f in jtu.tree_leaves(fired)]))
    new = jtu.tree_map(lambda n, o: jnp.where(live, n, o), new, state.values)
    return new, fired_any, fired


def locate_terminal_event(
    spec: EventSpec, state: EventState, y_end, args, sign, interpolation_cls
):
    """After the loop: the time, state and mask of a terminating event, from the step
    in which it fired. Returns `(t_event, y_event, mask, interpolant)`."""
    last = state.last
    interpolant = interpolation_cls(t0=last.tprev, t1=last.tnext, **last.dense_info)
    if spec.event.root_finder is None:
        return last.tnext, y_end, last.fired, interpolant

    def _time(fn, old, new, did_fire):
        if jnp.issubdtype(new.dtype, jnp.bool_):
            t = last.tnext
        else:
            t = _locate(
                spec, fn, old, new, last.tprev, last.tnext, interpolant, args, sign
            )
        return jnp.where(did_fire, t, jnp.inf)

    times = jtu.tree_map(
        _time, spec.event.cond_fn, last.old_values, state.values, last.fired
    )
    t_event = jnp.min(jnp.stack(jtu.tree_leaves(times)))
    t_event = jnp.where(jnp.isfinite(t_event), t_event, last.tnext)
    mask = jtu.tree_map(lambda t, f: f & (t <= t_event), times, last.fired)
    return t_event, interpolant.evaluate(t_event), mask, interpolant


def check_events(
    spec: EventSpec, state: EventState, tprev, tnext, y1, interpolant, keep, args, sign
):
    """Evaluates the conditions at the end of an accepted step and reports whether an
    event fired in it: `(values, fired_any, t_event, y_event, mask)`."""
    new = spec.values(sign * tnext, y1, args)
    fired = jtu.tree_map(
        lambda o, n: _fired(o, n, spec.event.direction) & keep, state.values, new
    )
    fired_any = jnp.any(jnp.stack([jnp.asarray(f) for f in jtu.tree_leaves(fired)]))
    new = jtu.tree_map(lambda n, o: jnp.where(keep, n, o), new, state.values)
    if spec.event.root_finder is None:
        return new, fired_any, tnext, y1, fired

    def locate_all(_):
        def _time(fn, old, value, did_fire):
            if jnp.issubdtype(value.dtype, jnp.bool_):
                t = tnext
            else:
                t = _locate(spec, fn, old, value, tprev, tnext, interpolant, args, sign)
            return jnp.where(did_fire, t, jnp.inf)

        return jtu.tree_map(_time, spec.event.cond_fn, state.values, new, fired)

    def not_needed(_):
        return jtu.tree_map(lambda f: jnp.full((), jnp.inf, tnext.dtype), fired)

    times = lax.cond(eqxi.unvmap_any(fired_any), locate_all, not_needed, None)
    t_event = jnp.min(jnp.stack(jtu.tree_leaves(times)))
    t_event = jnp.where(fired_any, t_event, tnext)
    mask = jtu.tree_map(lambda t, f: f & (t <= t_event), times, fired)
    y_event = interpolant.evaluate(t_event)
    return new, fired_any, t_event, y_event, mask


def record_event(
    state: EventState, new_values, fired_any, t_event, y_event, mask, sign
):
    """Appends an event to a non-terminating `Event`'s record."""
    n = state.ts.shape[0]
    write = fired_any & (state.count < n)
    index = jnp.minimum(state.count, n - 1)
    ts = state.ts.at[index].set(sign * t_event, pred=write)
    ys = jtu.tree_map(lambda v, b: b.at[index].set(v, pred=write), y_event, state.ys)
    masks = jtu.tree_map(lambda m, b: b.at[index].set(m, pred=write), mask, state.masks)
    return EventState(
        values=new_values,
        count=state.count + jnp.where(write, 1, 0),
        ts=ts,
        ys=ys,
        masks=masks,
    )


del jax
