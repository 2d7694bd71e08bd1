"""Events: conditions that stop a solve, or that are recorded as it runs."""

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import PyTree

from ._controller.clip import unwrap_controller


@final
class Event(eqx.Module):
    """A condition checked after every accepted step.

    **Arguments:**

    - `cond_fn`: a function `cond_fn(t, y, args, **kwargs)`, or a PyTree of them,
      returning a scalar. A boolean condition fires when it changes from `False` to
      `True`; a real-valued one fires when it crosses zero. The keyword arguments
      `terms`, `solver` and `stepsize_controller` are passed as well (accept
      `**kwargs`).
    - `root_finder`: an `optimistix` root finder (e.g. `optx.Newton(rtol, atol)` or
      `optx.Bisection(rtol, atol)`). If given, the time at which a real-valued
      condition crosses zero is located on the step's dense interpolant to the root
      finder's tolerance, and the solve stops exactly there. Otherwise it stops at the
      end of the step in which the condition fired.
    - `direction`: for real-valued conditions: `None` fires on any crossing, `True`
      only on upward crossings (negative to positive), `False` only on downward ones.
    - `terminate`: `True` (the default) stops the solve at the first event, with
      `RESULTS.event_occurred`. `False` lets the solve run on and records up to
      `max_events` events instead, in `Solution.event_ts`, `Solution.event_ys` and
      `Solution.event_mask` (one row per recorded event).
    - `max_events`: how many events a non-terminating `Event` records (at most one per
      step: the earliest).

    After a terminating event, `Solution.event_mask` has the structure of `cond_fn`
    and says which conditions fired.
    """

    cond_fn: PyTree[Callable[..., Any]]
    root_finder: Any = None
    direction: bool | None = eqx.field(static=True, default=None)
    terminate: bool = eqx.field(static=True, default=True)
    max_events: int = eqx.field(static=True, default=16)

    def __check_init__(self):
        leaves = jtu.tree_leaves(self.cond_fn)
        if not leaves or not all(callable(fn) for fn in leaves):
            raise TypeError(
                "`Event(cond_fn=...)` must be a function `cond_fn(t, y, args, **kwargs)` "
                f"or a PyTree of them, got {self.cond_fn!r}."
            )
        if not isinstance(self.max_events, int) or self.max_events < 1:
            raise ValueError(
                f"`Event(max_events=...)` must be a positive int, got {self.max_events!r}."
            )


def steady_state_event(
    rtol: float | None = None,
    atol: float | None = None,
    norm: Callable[[PyTree], Any] | None = None,
) -> Callable[..., Any]:
    """A boolean event condition that fires when the solution is at steady state:
    `norm(dy/dt) < atol + rtol * norm(y)`.

    `rtol`, `atol` and `norm` default to those of the step-size controller (which
    must then be adaptive, e.g. `PIDController`); `norm` falls back to the RMS norm.

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


del jnp
