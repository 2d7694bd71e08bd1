"""Events: conditions that stop a solve, or that are recorded as it runs."""

import abc
from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import PyTree

from ._controller.clip import unwrap_controller


def _is_direction_leaf(x) -> bool:
    return x is None or isinstance(x, bool)


def _broadcast_direction(cond_fn, direction):
    """`direction` as a PyTree of `None | bool` with the structure of `cond_fn`."""
    if direction is None or isinstance(direction, bool):
        return jtu.tree_map(lambda _: direction, cond_fn, is_leaf=callable)
    leaves, structure = jtu.tree_flatten(direction, is_leaf=_is_direction_leaf)
    if not all(_is_direction_leaf(x) for x in leaves):
        raise ValueError(
            "`Event(direction=...)` must be None, a bool, or a PyTree of `None | bool` "
            f"with the structure of `cond_fn`; got {direction!r}."
        )
    expected = jtu.tree_structure(cond_fn, is_leaf=callable)
    if structure != expected:
        raise ValueError(
            "`Event(direction=...)` must have the structure of `cond_fn` (one direction "
            f"per condition): `cond_fn` has structure {expected}, `direction` has "
            f"{structure}."
        )
    return direction


@final
class Event(eqx.Module):
    """A condition checked at the start of the solve and after every accepted step.

    **Arguments:**

    - `cond_fn`: a function `cond_fn(t, y, args, **kwargs)`, or a PyTree of them,
      each returning a scalar: a boolean or a floating-point number. A boolean
      condition fires when it is `True` (at `t0`, or at the end of a step); a
      real-valued one fires when its sign changes over a step (from or to zero
      included). The keyword arguments `terms`, `solver`, `t0`, `t1`, `dt0`,
      `saveat`, `stepsize_controller` and `max_steps` (those given to
      `diffeqsolve`) are passed as well: accept `**kwargs`.
    - `root_finder`: an `optimistix` root finder (e.g. `optx.Newton(rtol, atol)`).
      If given, the time at which a real-valued condition that fired crosses zero is
      located on the step's interpolant, started from the step's end, and the solve
      stops exactly there. Otherwise (and for a boolean condition) it stops at the end
      of the step in which the condition fired.
    - `direction`: `None` (the default: fire on a sign change either way), `True`
      (only upward: from negative or zero to positive) or `False` (only downward:
      from positive to zero or negative); or a PyTree of these with the structure of
      `cond_fn`, one per condition. Boolean conditions ignore it.
    - `terminate` (an extension over Diffrax): `True` (the default) stops the solve at
      the first event, with `RESULTS.event_occurred`. `False` lets the solve run on and
      records events instead, in `Solution.event_ts`, `Solution.event_ys` and
      `Solution.event_mask`: at most one per step, up to `max_events`.
    - `max_events` (an extension): how many events a non-terminating `Event` records.

    If several conditions fire at once, the first of them in the order of
    `jax.tree_util.tree_leaves(cond_fn)` is the event. `Solution.event_mask` has the
    structure of `cond_fn` and says which condition it was.
    """

    cond_fn: PyTree[Callable[..., Any]]
    root_finder: Any
    direction: PyTree[bool | None]
    terminate: bool = eqx.field(static=True)
    max_events: int = eqx.field(static=True)

    def __init__(
        self,
        cond_fn: PyTree[Callable[..., Any]],
        root_finder: optx.AbstractRootFinder | None = None,
        direction: bool | None | PyTree[bool | None] = None,
        terminate: bool = True,
        max_events: int = 16,
    ):
        leaves = jtu.tree_leaves(cond_fn, is_leaf=callable)
        if not leaves or not all(callable(fn) for fn in leaves):
            raise TypeError(
                "`Event(cond_fn=...)` must be a function `cond_fn(t, y, args, **kwargs)` "
                f"or a PyTree of them, got {cond_fn!r}."
            )
        if not isinstance(max_events, int) or max_events < 1:
            raise ValueError(
                f"`Event(max_events=...)` must be a positive int, got {max_events!r}."
            )
        self.cond_fn = cond_fn
        self.root_finder = root_finder
        self.direction = _broadcast_direction(cond_fn, direction)
        self.terminate = terminate
        self.max_events = max_events

    def directions(self) -> list[bool | None]:
        """One direction per condition, in the order of `tree_leaves(cond_fn)`."""
        return jtu.tree_leaves(self.direction, is_leaf=_is_direction_leaf)


def steady_state_event(
    rtol: float | None = None,
    atol: float | None = None,
    norm: Callable[[PyTree], Any] | None = None,
) -> Callable[..., Any]:
    """A boolean event condition that fires when the solution is at steady state:
    `norm(dy/dt) < atol + rtol * norm(y)`.

    `rtol`, `atol` and `norm` default to those of the step-size controller (which
    must then be adaptive, e.g. `PIDController`); `norm` falls back to the RMS norm.
    A solve that starts at steady state stops at `t0`, without taking a step.

    **Example:**

    ```python
    event = diffeqx.Event(diffeqx.steady_state_event())
    ```
    """

    def cond_fn(t, y, args, *, terms, solver, stepsize_controller, **kwargs):
        controller = unwrap_controller(stepsize_controller)
        tolerances = []
        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is None:
                value = getattr(controller, name, None)
                if value is None:
                    raise ValueError(
                        f"`steady_state_event` needs `{name}`: pass it explicitly or use "
                        "an adaptive step-size controller such as `PIDController`."
                    )
            tolerances.append(value)
        _rtol, _atol = tolerances
        _norm = norm if norm is not None else getattr(controller, "norm", optx.rms_norm)
        vf = solver.func(terms, t, y, args)
        return _norm(vf) < _atol + _rtol * _norm(y)

    return cond_fn


# ---- the deprecated discrete terminating events ----------------------------------
#
# Before `Event`, a solve could be stopped by a callable of the loop's state passed as
# `diffeqsolve(..., discrete_terminating_event=...)`. Diffrax deprecates that argument
# and these classes but still provides them; they are here so that code written
# against them runs unchanged. Each receives a state with `tprev` (the time reached)
# and `y` (the state there), and the keyword arguments an `Event` condition receives.


class AbstractDiscreteTerminatingEvent(eqx.Module):
    """Deprecated (as in Diffrax): use `Event` with a boolean condition instead.

    A condition of the state reached after each accepted step, passed as
    `diffeqsolve(..., discrete_terminating_event=...)`. Subclasses define
    `__call__(self, state, *, args, **kwargs) -> bool`, where `state.tprev` is the
    time reached and `state.y` the state there; the solve stops after the first step
    where it returns True, with `RESULTS.event_occurred`."""

    @abc.abstractmethod
    def __call__(self, state, **kwargs):
        """Whether to stop after the step that reached `state`."""


@final
class DiscreteTerminatingEvent(AbstractDiscreteTerminatingEvent):
    """Deprecated (as in Diffrax): use `Event(cond_fn)` with a boolean
    `cond_fn(t, y, args, **kwargs)` instead.

    Wraps `cond_fn(state, *, args, **kwargs) -> bool`, which reads `state.tprev` and
    `state.y`."""

    cond_fn: Callable[..., Any]

    def __call__(self, state, **kwargs):
        return self.cond_fn(state, **kwargs)


@final
class SteadyStateEvent(AbstractDiscreteTerminatingEvent):
    """Deprecated (as in Diffrax): use `Event(steady_state_event(rtol, atol, norm))`,
    which this calls.

    Stops the solve once `norm(dy/dt) < atol + rtol * norm(y)`; `rtol` and `atol`
    left as None are taken from the step-size controller."""

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Any] = optx.rms_norm

    def __call__(self, state, *, args, **kwargs):
        condition = steady_state_event(self.rtol, self.atol, self.norm)
        return condition(state.tprev, state.y, args, **kwargs)
