"""What a solve keeps: `SaveAt` and `SubSaveAt`."""

from collections.abc import Callable, Sequence
from typing import Any, final

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._times import as_times


def save_y(t, y, args):
    """The default `fn`: save the state itself."""
    return y


def _convert_ts(ts):
    return None if ts is None else as_times(ts, "`SaveAt(ts=...)`")


@final
class SubSaveAt(eqx.Module):
    """One output of a solve. Several can be combined with `SaveAt(subs=...)`.

    **Arguments:**

    - `t0`: save the initial time and state.
    - `t1`: save the final time and state.
    - `ts`: save at these times (1-D, monotonic in the direction of integration,
      inside `[t0, t1]`).
    - `steps`: save after every accepted step.
    - `fn`: `fn(t, y, args)` is saved instead of `y`.

    Within one output the order is: `t0`, then `ts`, then `steps`, then `t1`.
    """

    t0: bool = eqx.field(static=True, default=False)
    t1: bool = eqx.field(static=True, default=False)
    ts: Any = eqx.field(default=None, converter=_convert_ts)
    steps: bool = eqx.field(static=True, default=False)
    fn: Callable = save_y

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
        steps: bool = False,
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
        elif subs is None and not dense:
            # Saving nothing at all is allowed only with dense output or internal
            # states; otherwise the user almost certainly meant `t1=True`.
            if not (solver_state or controller_state or made_jump):
                raise ValueError(
                    "`SaveAt` was asked to save nothing. Pass e.g. `t1=True`, "
                    "`ts=...`, `steps=True` or `dense=True`."
                )
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
