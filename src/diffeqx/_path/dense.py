"""`DenseInterpolation`: the piecewise dense output of a whole solve."""

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._eager import compiled_query
from .base import AbstractPath


@final
class DenseInterpolation(AbstractPath):
    """Dense output of a solve: one local interpolant per accepted step.

    Built by `diffeqsolve` when `SaveAt(dense=True)`; read it through
    `Solution.evaluate` and `Solution.derivative`. Outside the solved interval (from
    `t0` to `t1`, or to the event that stopped the solve) both return NaN.

    **Fields:**

    - `ts`: step boundaries in integration time (`direction * t`), padded with `inf`.
    - `ts_size`: number of valid entries of `ts` (accepted steps + 1).
    - `infos`: the solver's dense information for each step (leading step axis).
    - `interpolation_cls`: builds a step's local interpolant from its dense info.
    - `direction`: `1` for a forward solve, `-1` for a backward one.
    - `t0_if_trivial`, `y0_if_trivial`: returned when the solve took no steps.
    """

    ts: Array
    ts_size: Any
    infos: PyTree
    interpolation_cls: Callable = eqx.field(static=True)
    direction: Any
    t0_if_trivial: Any
    y0_if_trivial: PyTree

    @property
    def t0(self):
        return self.ts[0] * self.direction

    @property
    def t1(self):
        return self.ts[jnp.maximum(self.ts_size - 1, 0)] * self.direction

    def _local(self, tau, left):
        num_steps = jnp.maximum(self.ts_size - 1, 1)
        # `left` refers to the user's time `t`; for a backward solve the left limit in
        # `t` is the right limit in integration time.
        # The count of step ends below `tau`: the count of all times below it, less
        # one (searched in `ts` itself, not a slice of it, which XLA builds again at
        # every query in a loop; see `AbstractGlobalInterpolation._interpret_t`).
        index_left = jnp.searchsorted(self.ts, tau, side="left") - 1
        index_right = jnp.searchsorted(self.ts, tau, side="right") - 1
        use_left = (self.direction > 0) == left
        index = jnp.where(use_left, index_left, index_right)
        index = jnp.clip(index, 0, num_steps - 1)
        info = jtu.tree_map(lambda x: x[index], self.infos)
        return self.interpolation_cls(t0=self.ts[index], t1=self.ts[index + 1], **info)

    def _integration_time(self, t):
        # A time of another dtype (a float64 `t` on a solve whose times are float32)
        # is cast to the solve's time dtype rather than promoted: the interpolation is
        # no more precise than the times it was built on, and this also works under
        # strict dtype promotion.
        return jnp.asarray(t).astype(self.ts.dtype) * self.direction

    def _trivial(self, out, value):
        return jtu.tree_map(lambda o, v: jnp.where(self.ts_size <= 1, v, o), out, value)

    def _nan_outside(self, tau, out):
        """NaN outside the solved interval `[t0, t1]` (which ends at a terminating
        event if one stopped the solve), as Diffrax: no silent extrapolation."""
        last = self.ts[jnp.maximum(self.ts_size - 1, 0)]
        inside = (tau >= self.ts[0]) & (tau <= last)
        return jtu.tree_map(
            lambda o: jnp.where(inside, o, jnp.nan).astype(o.dtype), out
        )

    @compiled_query
    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree:
        if t1 is not None:
            start = self.evaluate(t0, left=left)
            end = self.evaluate(t1, left=left)
            return jtu.tree_map(lambda a, b: b - a, start, end)
        tau = self._integration_time(t0)
        out = self._local(tau, left).evaluate(tau)
        return self._nan_outside(tau, self._trivial(out, self.y0_if_trivial))

    @compiled_query
    def derivative(self, t, left: bool = True) -> PyTree:
        tau = self._integration_time(t)
        out = self._local(tau, left).derivative(tau)
        # `direction` (+-1, in the times' dtype) is cast to each leaf's dtype: exact,
        # also for a state wider than the times or complex.
        out = jtu.tree_map(lambda x: x * jnp.asarray(self.direction, x.dtype), out)
        zeros = jtu.tree_map(jnp.zeros_like, self.y0_if_trivial)
        return self._nan_outside(tau, self._trivial(out, zeros))
