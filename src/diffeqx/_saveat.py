"""What a solve keeps: `SaveAt` and `SubSaveAt`."""

from collections.abc import Callable, Sequence
from typing import Any, final

import equinox as eqx
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._times import as_times


def save_y(t, y, args):
    """The default `fn`: save the state itself."""
    return y


def _convert_ts(ts):
    return None if ts is None else as_times(ts, "`SaveAt(ts=...)`")


def _check_steps(steps):
    # `bool` is an `int`: `steps=True` means every step, `steps=n` every n-th step.
    if isinstance(steps, (bool, int, np.integer)) and steps >= 0:
        return steps
    raise ValueError(
        "`SaveAt(steps=...)` must be a bool (save every accepted step) or a "
        f"non-negative int n (save every n-th accepted step), got {steps!r}."
    )


@final
class SubSaveAt(eqx.Module):
    """One output of a solve. Several can be combined with `SaveAt(subs=...)`.

    **Arguments:**

    - `t0`: save the initial time and state.
    - `t1`: save the final time and state. A solve that stops early (with
      `throw=False`) saves where it stopped instead.
    - `ts`: save at these times (1-D, monotonic in the direction of integration,
      inside `[t0, t1]`).
    - `steps`: `True` saves after every accepted step; an int `n` saves after every
      `n`-th accepted step.
    - `fn`: `fn(t, y, args)` is saved instead of `y`.

    Within one output the order is chronological, as the solve reaches each time:
    `t0`, then the `ts` and the step ends merged in time order (a time in `ts` equal
    to a step's end comes first), then `t1` unless the last step was already saved.
    Unused slots at the end are `inf`.
    """

    t0: bool = eqx.field(static=True, default=False)
    t1: bool = eqx.field(static=True, default=False)
    ts: Any = eqx.field(default=None, converter=_convert_ts)
    steps: bool | int = eqx.field(static=True, default=0, converter=_check_steps)
    fn: Callable = save_y

    def __init__(self, *, t0=False, t1=False, ts=None, steps=0, fn=save_y):
        self.t0 = t0
        self.t1 = t1
        self.ts = ts
        self.steps = steps
        self.fn = fn

    def __check_init__(self):
        if not (self.t0 or self.t1 or self.ts is not None or self.steps):
            raise ValueError(
                "A `SubSaveAt` must save something: pass at least one of `t0=True`, "
                "`t1=True`, `ts=...` or `steps=True`."
            )


def _is_subsaveat(x):
    return isinstance(x, SubSaveAt)


@final
class SaveAt(eqx.Module):
    """What `diffeqsolve` saves.

    **Arguments:**

    - `t0`, `t1`, `ts`, `steps`, `fn`: as for `SubSaveAt`; a shorthand for
      `subs=SubSaveAt(t0=..., t1=..., ts=..., steps=..., fn=...)`.
    - `subs`: a PyTree of `SubSaveAt`, for several outputs at once; `Solution.ts` and
      `Solution.ys` then have the same PyTree structure.
    - `dense`: keep a dense interpolant, for `Solution.evaluate`/`derivative`.
    - `solver_state`, `controller_state`, `made_jump`: return the final internal
      states, so that a later solve can resume from them.

    **Example:**

    ```python
    saveat = diffeqx.SaveAt(ts=jnp.linspace(0, 1, 11), dense=True)
    ```
    """

    subs: PyTree[SubSaveAt] = None
    dense: bool = eqx.field(static=True, default=False)
    solver_state: bool = eqx.field(static=True, default=False)
    controller_state: bool = eqx.field(static=True, default=False)
    made_jump: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        *,
        t0: bool = False,
        t1: bool = False,
        ts: Sequence[float] | Any = None,
        steps: bool | int = False,
        fn: Callable = save_y,
        subs: PyTree[SubSaveAt] = None,
        dense: bool = False,
        solver_state: bool = False,
        controller_state: bool = False,
        made_jump: bool = False,
    ):
        if t0 or t1 or (ts is not None) or steps:
            if subs is not None:
                raise ValueError(
                    "Pass either `subs` or `t0`/`t1`/`ts`/`steps` to `SaveAt`, not both."
                )
            subs = SubSaveAt(t0=t0, t1=t1, ts=ts, steps=steps, fn=fn)
        # With nothing asked (`SaveAt()`), nothing is saved: `Solution.ts` and `ys`
        # are None, as in Diffrax. Useful when only an event or a final solver state
        # matters.
        if subs is not None:
            for leaf in jtu.tree_leaves(subs, is_leaf=_is_subsaveat):
                if not isinstance(leaf, SubSaveAt):
                    raise TypeError(
                        "`SaveAt(subs=...)` must be a PyTree of `SubSaveAt`, but it "
                        f"contains {leaf!r}."
                    )
        self.subs = subs
        self.dense = dense
        self.solver_state = solver_state
        self.controller_state = controller_state
        self.made_jump = made_jump


def is_subsaveat(x) -> bool:
    return _is_subsaveat(x)
