"""The result of a solve: `Solution` and the `RESULTS` enumeration."""

import warnings
from typing import Any, final

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
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

        # Each message opens with the first sentence of Diffrax's (so that text
        # matched against Diffrax's messages matches these too), then says what to
        # try. (`internal_error` names this library instead.)
        max_steps_reached = (
            "The maximum number of solver steps was reached. Try increasing "
            "`max_steps`. (Or pass `max_steps=None` with an adjoint that allows it; "
            "a solve taking many small steps may be stiff: try an implicit solver.)"
        )
        dt_min_reached = (
            "The minimum step size was reached in the differential equation solver. "
            "The step size controller wanted a step smaller than `dtmin`: decrease "
            "`dtmin`, pass `force_dtmin=True`, or loosen `rtol`/`atol`."
        )
        event_occurred = (
            "Terminating differential equation solve because an event occurred."
        )
        max_steps_rejected = (
            "Maximum number of rejected steps was reached. More steps were rejected "
            "than `ClipStepSizeController` can store: increase its "
            "`store_rejected_steps`."
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


# ---- results at trace time ---------------------------------------------------------
#
# Equinox evaluates an enumeration's `==`, `where` and `promote` eagerly when their
# operands are constants (`jax.ensure_compile_time_eval`), and every such operation
# compiles a small XLA program the first time it runs in a process: about 10 ms
# each, a dozen of them (0.12 s, 15% of the compile time) in a first implicit solve.
# Most results inside a step are constants (a dense linear solve cannot fail; an
# explicit step always succeeds), so these helpers decide them in Python, and stage
# the operation into the program otherwise. They rely on two facts about the
# enumerations, which tests/test_results.py checks: `successful` has the value 0 in
# each, and a parent's items keep their values in `RESULTS` (promotion relabels).


def _value(item):
    (value,) = jtu.tree_leaves(item)
    return value


def _constant(x) -> np.ndarray | None:
    """`x` as a NumPy scalar when it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer) or np.ndim(x) != 0:
        return None
    return np.asarray(x)


def succeeded(item) -> Any:
    """`item == successful` for an item of `RESULTS`, `optimistix.RESULTS` or
    `lineax.RESULTS`: a NumPy boolean when `item` is a constant, else traced."""
    value = _value(item)
    constant = _constant(value)
    if constant is not None:
        return np.bool_(constant == 0)
    return value == 0


def where_result(pred, a, b):
    """`where(pred, a, b)` for two items of one enumeration, chosen in Python when
    `pred` is a constant."""
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        raise ValueError("`where_result` needs two items of the same enumeration.")
    constant = _constant(pred)
    if constant is not None:
        return a if bool(constant) else b
    value_a, value_b = _value(a), _value(b)
    if value_a is value_b:
        return a
    return jtu.tree_unflatten(
        jtu.tree_structure(a), [jnp.where(pred, value_a, value_b)]
    )


def promote_result(item, enumeration=RESULTS):
    """`enumeration.promote(item)` for an item of a parent enumeration (Lineax's or
    Optimistix's results), which keeps its value."""
    return jtu.tree_unflatten(
        jtu.tree_structure(enumeration.successful), [_value(item)]
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
