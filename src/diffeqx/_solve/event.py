"""Events inside the solve: evaluating the conditions, deciding which one fired
(`check_events`, used by every kind of event), locating the event time on a step's
interpolant (`locate_event`), and recording events that do not stop the solve.

Conditions are handled as a flat list, in the order of
`jax.tree_util.tree_leaves(cond_fn, is_leaf=callable)`; masks are given back in the
structure of `cond_fn`.
"""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._event import Event
from .._solution import RESULTS, promote_result, succeeded, where_result
from .save import fill_like


class EventSpec(eqx.Module):
    """What the solve needs to evaluate an `Event`'s conditions: the event, and the
    keyword arguments every condition receives (those given to `diffeqsolve`)."""

    event: Event
    terms: Any  # the user's terms, in the user's time
    solver: Any
    stepsize_controller: Any
    t0: Any = None
    t1: Any = None
    dt0: Any = None
    saveat: Any = None
    max_steps: Any = None

    def call(self, fn, t, y, args):
        """`fn(t, y, args, **kwargs)` with the keyword arguments Diffrax passes to an
        event condition."""
        return fn(
            t,
            y,
            args,
            terms=self.terms,
            solver=self.solver,
            t0=self.t0,
            t1=self.t1,
            dt0=self.dt0,
            saveat=self.saveat,
            stepsize_controller=self.stepsize_controller,
            max_steps=self.max_steps,
        )

    def functions(self) -> list:
        return jtu.tree_leaves(self.event.cond_fn, is_leaf=callable)

    def values(self, t, y, args) -> list:
        """Every condition at `(t, y)` (user time), checked to be a boolean or
        floating-point scalar."""
        out = []
        for fn in self.functions():
            value = jnp.asarray(self.call(fn, t, y, args))
            if value.shape != ():
                raise ValueError(
                    "An event condition must return a scalar, but returned shape "
                    f"{value.shape}."
                )
            if not (
                jnp.issubdtype(value.dtype, jnp.bool_)
                or jnp.issubdtype(value.dtype, jnp.floating)
            ):
                raise ValueError(
                    "An event condition must return a boolean or a floating-point "
                    f"number, but returned dtype {value.dtype}."
                )
            out.append(value)
        return out

    @property
    def structure(self):
        """The PyTree structure of `cond_fn`, a condition per leaf."""
        return jtu.tree_structure(self.event.cond_fn, is_leaf=callable)

    def tree(self, leaves: list):
        """A list with one entry per condition, in the structure of `cond_fn`."""
        return jtu.tree_unflatten(self.structure, leaves)


def _is_bool(value) -> bool:
    return jnp.issubdtype(value.dtype, jnp.bool_)


def _first_only(fired: list) -> tuple[list, Any]:
    """Keeps only the first condition that fired; also returns whether any did."""
    mask, seen = [], jnp.asarray(False)
    for f in fired:
        mask.append(f & ~seen)
        seen = seen | f
    return mask, seen


class EventCheck(eqx.Module):
    """The conditions at the end of a step, and which one fired in it."""

    values: list  # condition values to compare the next step with
    mask: list  # bool per condition: true for the one that fired (at most one)
    fired: Any  # bool: whether one fired


def _crossed(old, new, direction):
    """Whether a real-valued condition changed sign from `old` to `new` in the
    given direction: `None` any change of sign, `True` from `<= 0` to `> 0`, `False`
    from `> 0` to `<= 0`. A zero counts as a sign of its own, so a condition that
    starts at zero fires on the first step that leaves zero."""
    old_sign, new_sign = jnp.sign(old), jnp.sign(new)
    if direction is None:
        return old_sign != new_sign
    if direction:
        return (old_sign <= 0) & (new_sign > 0)
    return (old_sign > 0) & (new_sign <= 0)


def check_events(spec: EventSpec, old_values: list, t, y, args, live) -> EventCheck:
    """Evaluates the conditions at `(t, y)`, the end of a step (user time), and says
    which fired: a boolean one that became `True`, a real-valued one whose sign
    changed in its `direction`. Only a `live` step can fire; elsewhere the previous
    values are kept."""
    new_values = spec.values(t, y, args)
    fired = []
    for old, new, direction in zip(
        old_values, new_values, spec.event.directions(), strict=True
    ):
        if new.dtype != old.dtype:
            raise ValueError(
                "An event condition must return the same dtype every time; it "
                f"returned {old.dtype} at `t0` and then {new.dtype}."
            )
        fired.append(
            (new & ~old if _is_bool(new) else _crossed(old, new, direction)) & live
        )
    mask, any_fired = _first_only(fired)
    values = [
        jnp.where(live, n, o) for n, o in zip(new_values, old_values, strict=True)
    ]
    return EventCheck(values=values, mask=mask, fired=any_fired)


class EventStep(eqx.Module):
    """A step in which an event fired, as needed to locate the event in it."""

    tprev: Any  # integration time
    tnext: Any
    dense_info: Any
    mask: list  # which condition fired (see `EventCheck.mask`)


class EventLocation(eqx.Module):
    """Where an event lies in its step."""

    t: Any  # integration time
    y: Any
    result: Any  # the root finder's failure, promoted; else successful


def locate_event(
    spec: EventSpec, step: EventStep, y_end, interpolation_cls, args, sign
) -> EventLocation:
    """The time and state of the event in `step` (`y_end` is the state at its end).

    Without a root finder, or for a boolean condition, the event is at the step's end.
    With one, the zero of the real-valued condition that fired is found on the step's
    interpolant, starting from the step's end, and the state there is interpolated.
    The root finder runs only if some member of a batch needs it."""
    t_end = step.tnext
    root_finder = spec.event.root_finder
    if root_finder is None:
        return EventLocation(t=t_end, y=y_end, result=RESULTS.successful)
    interpolant = interpolation_cls(t0=step.tprev, t1=step.tnext, **step.dense_info)
    functions = spec.functions()
    real = [
        jnp.issubdtype(value.dtype, jnp.floating)
        for value in jax.eval_shape(spec.values, sign * t_end, y_end, args)
    ]
    if not any(real):
        # Boolean conditions only: no root to find, so none is traced. (A root
        # find behind a predicate XLA finds constant, with requested times saved,
        # aborted the process when the solve was compiled as one kernel on CPU:
        # an XLA check failure, see tests/test_one_kernel.py.)
        return EventLocation(
            t=t_end, y=interpolant.evaluate(t_end), result=RESULTS.successful
        )
    needs_root = jnp.asarray(False)
    for is_real, m in zip(real, step.mask, strict=True):
        if is_real:
            needs_root = needs_root | m
    dtype = t_end.dtype

    def residual(tau, _):
        y = interpolant.evaluate(tau)
        value = tau - jnp.asarray(0.5, dtype)
        for fn, is_real, m in zip(functions, real, step.mask, strict=True):
            if is_real:
                this = jnp.asarray(spec.call(fn, sign * tau, y, args), dtype=dtype)
                value = jnp.where(m, this, value)
        return value

    def find_root():
        # Where no root is needed (a batch member without an event, a boolean
        # condition) the problem is replaced by a harmless one on [0, 1], so that a
        # bracketing root finder such as `optx.Bisection` always has a valid bracket.
        lower = jnp.where(needs_root, step.tprev, jnp.zeros((), dtype))
        upper = jnp.where(needs_root, step.tnext, jnp.ones((), dtype))
        sol = optx.root_find(
            residual,
            root_finder,
            upper,
            options=dict(lower=lower, upper=upper),
            throw=False,
        )
        failed = needs_root & ~succeeded(sol.result)
        result = where_result(failed, promote_result(sol.result), RESULTS.successful)
        return jnp.where(needs_root, sol.value, t_end), result

    def skip():
        return t_end, RESULTS.successful

    t_event, result = jax.lax.cond(eqxi.unvmap_any(needs_root), find_root, skip)
    return EventLocation(t=t_event, y=interpolant.evaluate(t_event), result=result)


class EventState(eqx.Module):
    """Carried through the loop: the condition values at the start of the current
    step, and for a terminating event the step in which it fired (`last`), or for a
    non-terminating one the record so far (`count` events in write-once buffers)."""

    values: Any
    count: Any
    ts: Any
    ys: Any
    masks: Any
    last: Any = None


class EventStart(eqx.Module):
    """The events at `t0`: the initial `EventState`, and whether a terminating event
    fires there (a boolean condition already `True`), with its mask."""

    state: EventState
    stop: Any
    mask: Any


def init_event_state(
    spec: EventSpec, t0_user, tau0, y0, args, tdtype, dense_info_shape
) -> EventStart:
    """Evaluates the conditions at `t0`. A boolean condition that is already `True`
    fires there (a terminating event then stops the solve before its first step)."""
    values = spec.values(t0_user, y0, args)
    fired_at_t0 = [v if _is_bool(v) else jnp.asarray(False) for v in values]
    mask, fired = _first_only(fired_at_t0)
    if spec.event.terminate:
        last = EventStep(
            tprev=tau0,
            tnext=tau0,
            dense_info=jtu.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), dense_info_shape
            ),
            mask=mask,
        )
        state = EventState(
            values=values, count=None, ts=None, ys=None, masks=None, last=last
        )
        return EventStart(state=state, stop=fired, mask=spec.tree(mask))
    n = spec.event.max_events
    state = EventState(
        values=values,
        count=jnp.asarray(0),
        ts=jnp.full((n,), jnp.inf, dtype=tdtype),
        ys=jtu.tree_map(lambda y: fill_like(jnp.asarray(y), n), y0),
        masks=spec.tree([jnp.zeros((n,), bool) for _ in values]),
    )
    # A boolean condition already true at `t0` is the first event recorded.
    at_t0 = EventLocation(t=t0_user, y=y0, result=RESULTS.successful)
    state = record_event(spec, state, EventCheck(values, mask, fired), at_t0, 1)
    return EventStart(state=state, stop=jnp.asarray(False), mask=None)


def _write_row(buffer, index, value, pred):
    if isinstance(buffer, jax.Array):
        # A plain array (at `t0`, or in a loop without write-once buffers): a write
        # to an out-of-range row is dropped.
        index = jnp.where(pred, index, buffer.shape[0])
        return buffer.at[index].set(value, mode="drop")
    # A loop's write-once buffer, which takes the predicate itself.
    return buffer.at[index].set(value, pred=pred)


def record_event(
    spec: EventSpec,
    state: EventState,
    check: EventCheck,
    location: EventLocation,
    sign,
) -> EventState:
    """Appends the event of a step (if one fired) to a non-terminating `Event`'s
    record, while there is room."""
    n = state.ts.shape[0]
    write = check.fired & (state.count < n)
    index = jnp.minimum(state.count, n - 1)
    ts = _write_row(state.ts, index, sign * location.t, write)
    ys = jtu.tree_map(lambda v, b: _write_row(b, index, v, write), location.y, state.ys)
    # The buffers in the loop are wrapped, so the mask record is split by the
    # structure of `cond_fn` rather than into its leaves.
    masks = [
        _write_row(b, index, m, write)
        for m, b in zip(
            check.mask, spec.structure.flatten_up_to(state.masks), strict=True
        )
    ]
    return EventState(
        values=check.values,
        count=state.count + jnp.where(write, 1, 0),
        ts=ts,
        ys=ys,
        masks=spec.tree(masks),
    )
