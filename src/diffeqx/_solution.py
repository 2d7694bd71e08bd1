"""The result of a solve: `Solution` and the `RESULTS` enumeration."""

import warnings
from typing import Any, final

import optimistix as optx
from jaxtyping import Array, PyTree

from ._path.base import AbstractPath

# `max_steps_reached` exists in Optimistix's enumeration too, with a shorter message;
# diffeqx gives it a message that says what to try. Equinox warns about a redefined
# message when the class is created; the redefinition is deliberate, so that one
# warning is silenced.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Enumeration has duplicate")

    @final
    class RESULTS(optx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
        """How a solve ended. Travels through jitted code as a value; `throw=True`
        turns a failure into a runtime error carrying the message below.

        It extends `optimistix.RESULTS` (and so `lineax.RESULTS`): the failure code of
        a nonlinear or linear solve inside a step (`nonlinear_divergence`,
        `nonlinear_max_steps_reached`, `singular`, ...) becomes a diffeqx result with
        `RESULTS.promote(optx_result)`.
        """

        max_steps_reached = (
            "The maximum number of solver steps was reached before `t1`. Increase "
            "`max_steps` (or pass `max_steps=None` with an adjoint that allows it), "
            "or check whether the problem is stiff."
        )
        dt_min_reached = (
            "The step size controller wanted a step smaller than `dtmin`. Decrease "
            "`dtmin`, pass `force_dtmin=True`, or loosen `rtol`/`atol`."
        )
        event_occurred = "Terminating solve because an event occurred."
        max_steps_rejected = (
            "More steps were rejected than `ClipStepSizeController` can store: "
            "increase its `store_rejected_steps`."
        )
        internal_error = (
            "An internal error occurred in diffeqx. This is a bug: please report it "
            "with a short example that reproduces it."
        )
        non_finite_state = (
            "The solution became non-finite (NaN or infinity): the solution may blow "
            "up, or the vector field may be undefined there."
        )
        dt0_wrong_sign = (
            "`dt0` has the opposite sign to `t1 - t0`. Pass a positive `dt0` when "
            "t1 > t0 and a negative one when t1 < t0."
        )
        implicit_divergence = "Implicit method diverged."
        implicit_nonconvergence = (
            "Implicit method did not converge within the required number of iterations."
        )


def is_okay(result: RESULTS) -> Any:
    """True if the solve succeeded or stopped at an event."""
    return is_successful(result) | is_event(result)


def is_successful(result: RESULTS) -> Any:
    """True if the solve reached `t1` without failing."""
    return result == RESULTS.successful


def is_event(result: RESULTS) -> Any:
    """True if the solve stopped because an event occurred."""
    return result == RESULTS.event_occurred


@final
class Solution(AbstractPath):
    """What `diffeqsolve` returns.

    **Attributes:**

    - `t0`, `t1`: the start and end of the integration interval.
    - `ts`: the times at which the solution was saved; shape `(num_saves,)` (or a
      PyTree of such, following `SaveAt(subs=...)`). Unfilled slots are `inf`.
    - `ys`: the saved values: each leaf of `y0` gains a leading time axis.
    - `interpolation`: a `DenseInterpolation` when `SaveAt(dense=True)`, else `None`.
    - `stats`: a dict with `num_steps`, `num_accepted_steps`, `num_rejected_steps`
      and `max_steps`.
    - `result`: a `RESULTS` value saying how the solve ended.
    - `solver_state`, `controller_state`, `made_jump`: the final internal states, if
      `SaveAt(solver_state=True, controller_state=True, made_jump=True)`.
    - `event_mask`: which conditions of the `Event` fired (the structure of its
      `cond_fn`); for a non-terminating event, one row per recorded event.
    - `event_ts`, `event_ys`: for a non-terminating event, the times and states of the
      recorded events (padded with `inf`).
    """

    t0: Any
    t1: Any
    ts: PyTree[Array] | None
    ys: PyTree[Array] | None
    interpolation: Any
    stats: dict[str, Any]
    result: RESULTS
    solver_state: PyTree | None
    controller_state: PyTree | None
    made_jump: Any
    event_mask: PyTree | None
    event_ts: Any = None
    event_ys: PyTree | None = None

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        """The dense solution at `t0`, or its increment from `t0` to `t1` when `t1`
        is given. `left` picks the left or right limit at a step boundary. Requires
        `SaveAt(dense=True)`."""
        if self.interpolation is None:
            raise ValueError(
                "`Solution.evaluate` needs dense output: pass "
                "`saveat=SaveAt(dense=True)` to `diffeqsolve`."
            )
        return self.interpolation.evaluate(t0, t1, left)

    def derivative(self, t, left: bool = True) -> PyTree[Array]:
        """The time derivative of the dense solution at `t`. Requires
        `SaveAt(dense=True)`."""
        if self.interpolation is None:
            raise ValueError(
                "`Solution.derivative` needs dense output: pass "
                "`saveat=SaveAt(dense=True)` to `diffeqsolve`."
            )
        return self.interpolation.derivative(t, left)
