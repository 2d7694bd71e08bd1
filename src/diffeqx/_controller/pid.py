"""Adaptive step sizes: `PIDController`.

The controller is a digital filter on the sequence of scaled local errors
(Söderlind, "Digital filters in adaptive time-stepping", ACM TOMS 29, 2003; and
"Automatic control and adaptive time-stepping", Numer. Algorithms 31, 2002). With
`e_n` the scaled error of the step just taken and `k` the order of the error
estimate, the ratio of the next step to the current one is

    rho = safety * (1/e_n)^(b1/k) * (1/e_{n-1})^(b2/k) * (1/e_{n-2})^(b3/k),

the classical PID gains in filter form:

    b1 = kP + kI + kD,    b2 = -(kP + 2 kD),    b3 = kD.

`kI = 1` alone is the elementary integral controller `h * (1/e)^(1/k)`. The ratio is
then limited. Where this departs from the textbook controller it is to take the same
steps as Diffrax 0.7.2; each such choice is marked "As Diffrax" below.
"""

from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._solution import RESULTS
from .base import AbstractAdaptiveStepSizeController
from .initial_step import first_step


def error_dtype(y0):
    """The real floating dtype in which errors and step ratios are computed: that of
    the state (as Diffrax), so that a float32 problem makes float32 decisions. A
    complex leaf counts as its real part's dtype (its error is measured by magnitude);
    leaves of several widths give the widest, as standard promotion would (worked out
    here, so that strict promotion is never needed)."""
    dtypes = set()
    for leaf in jtu.tree_leaves(y0):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.inexact):
            dtypes.add(jnp.finfo(dtype).dtype)
    if not dtypes:
        return jnp.result_type(float)
    widest = max(jnp.finfo(d).bits for d in dtypes)
    candidates = [d for d in dtypes if jnp.finfo(d).bits == widest]
    # Two different formats of one width (float16 and bfloat16) promote to float32.
    return candidates[0] if len(candidates) == 1 else jnp.dtype(jnp.float32)


def _as(value, dtype):
    # Python numbers stay weakly typed (they take the dtype of what they meet, as in
    # Diffrax); arrays are cast explicitly.
    return value if isinstance(value, (int, float)) else jnp.asarray(value, dtype)


def scaled_error_norm(controller, y0, y1_candidate, y_error):
    """`norm(y_error / (atol + rtol * max(|y0|, |y1|)))`. As Diffrax, a leaf of the
    candidate containing NaN is replaced by the same leaf of `y0`."""

    def scale(y0_leaf, y1_leaf, error_leaf):
        # Python numbers too (a controller stepped by hand, outside `diffeqsolve`).
        y0_leaf, y1_leaf, error_leaf = map(jnp.asarray, (y0_leaf, y1_leaf, error_leaf))
        y1_leaf = jnp.where(jnp.any(jnp.isnan(y1_leaf)), y0_leaf, y1_leaf)
        dtype = error_leaf.real.dtype
        magnitude = jnp.maximum(jnp.abs(y0_leaf), jnp.abs(y1_leaf))
        tolerance = _as(controller.atol, dtype) + _as(controller.rtol, dtype) * (
            magnitude
        )
        # A complex error divided by its real tolerance: the cast to the error's
        # dtype is exact, and the norm then measures the error by magnitude.
        return error_leaf / tolerance.astype(error_leaf.dtype)

    scaled = jtu.tree_map(scale, y0, y1_candidate, y_error)
    real = error_dtype(y0)
    leaves = jtu.tree_leaves(scaled)
    if len({leaf.dtype for leaf in leaves}) > 1:
        # Leaves of several dtypes: the norm sums across them, so bring them to one
        # (the widest; complex if any leaf is, which keeps each magnitude exact).
        if any(jnp.issubdtype(leaf.dtype, jnp.complexfloating) for leaf in leaves):
            common = jnp.complex128 if real == jnp.float64 else jnp.complex64
        else:
            common = real
        scaled = jtu.tree_map(lambda leaf: leaf.astype(common), scaled)
    # A norm returning another dtype must not change the controller's state dtype.
    return jnp.asarray(controller.norm(scaled)).astype(real)


class _PIDMeta(type(eqx.Module)):
    # `PIDController(..., step_ts=..., jump_ts=...)` returns the clipped wrapper, as
    # in Diffrax (which does so silently).
    def __call__(cls, *args, step_ts=None, jump_ts=None, **kwargs):
        controller = super().__call__(*args, **kwargs)
        if step_ts is None and jump_ts is None:
            return controller
        from .clip import ClipStepSizeController

        return ClipStepSizeController(controller, step_ts=step_ts, jump_ts=jump_ts)


@final
class PIDController(AbstractAdaptiveStepSizeController, metaclass=_PIDMeta):
    """Adapts the step size to keep the local error estimate within tolerance.

    A step is accepted when the norm of `y_error / (atol + rtol * max(|y0|, |y1|))`
    is below 1. The next step is the current one times
    `safety * e_n^(-b1/k) * e_{n-1}^(-b2/k) * e_{n-2}^(-b3/k)` (the e's being the
    scaled errors of the last three accepted steps, `k` the solver's `error_order`,
    `b1 = pcoeff + icoeff + dcoeff`, `b2 = -(pcoeff + 2 dcoeff)`, `b3 = dcoeff`):
    Söderlind's digital-filter form of PID control. After an accepted step the
    factor lies in `[1, factormax]`; after a rejected one in `[factormin, safety]`.
    The defaults (`icoeff=1`, others 0) give the classical integral controller;
    `pcoeff=0.4, icoeff=0.3` is a good PI choice.

    The error norm and the step ratio are computed in the dtype of the state, so a
    float32 problem makes float32 decisions (as Diffrax).

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerances.
    - `norm`: the norm of the scaled error (RMS by default).
    - `pcoeff`, `icoeff`, `dcoeff`: proportional, integral and derivative gains.
    - `dtmin`, `dtmax`: bounds on the step size. Below `dtmin` the solve fails with
      `RESULTS.dt_min_reached`, unless `force_dtmin=True` (the default), when the
      step of size `dtmin` that follows is accepted regardless of its error.
    - `factormin`, `factormax`: bounds on the change of step size per step.
    - `safety`: the safety factor.
    - `error_order`: overrides the solver's `error_order`.
    - `step_ts`, `jump_ts`: if given, returns
      `ClipStepSizeController(PIDController(...), step_ts, jump_ts)`.

    With `dt0=None` inside `diffeqsolve` the first step is 0.01, as in Diffrax 0.7.2
    (whose Hairer–Nørsett–Wanner rule only applies when `init` is called directly
    with a bare `ODETerm`; so does ours).
    """

    rtol: Any
    atol: Any
    norm: Callable = optx.rms_norm
    pcoeff: Any = 0
    icoeff: Any = 1
    dcoeff: Any = 0
    dtmin: Any = None
    dtmax: Any = None
    force_dtmin: bool = eqx.field(static=True, default=True)
    factormin: Any = 0.2
    factormax: Any = 10.0
    safety: Any = 0.9
    error_order: Any = None
    may_jump: ClassVar[bool] = False

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not isinstance(value, (jax.Array, jax.core.Tracer)) and (
                not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(
                    f"`PIDController({name}=...)` must be a non-negative number, got "
                    f"{value!r}."
                )

    def _error_order(self, error_order):
        order = error_order if self.error_order is None else self.error_order
        if order is None:
            raise ValueError(
                "`PIDController` needs the solver's error order, but the solver's "
                "`error_order(terms)` returned None. Pass "
                "`PIDController(..., error_order=...)`."
            )
        return order

    def _filter_exponents(self, error_order):
        """`(b1/k, b2/k, b3/k)`: the exponents of the last three inverse errors."""
        k = self._error_order(error_order)
        p, i, d = self.pcoeff, self.icoeff, self.dcoeff
        return (p + i + d) / k, -(p + 2 * d) / k, d / k

    def _limit_dt(self, dt):
        if self.dtmax is not None:
            dt = jnp.minimum(dt, _as(self.dtmax, dt.dtype))
        if self.dtmin is not None:
            dt = jnp.maximum(dt, _as(self.dtmin, dt.dtype))
        return dt

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        time_dtype = jnp.result_type(t0)
        if dt0 is None:
            dt0 = first_step(
                terms,
                t0,
                y0,
                args,
                func,
                self._error_order(error_order),
                self.rtol,
                self.atol,
                self.norm,
            )
        dt0 = self._limit_dt(jnp.asarray(dt0, dtype=time_dtype))
        one = jnp.ones((), error_dtype(y0))
        # As Diffrax, the first step is never marked as taken at `dtmin`.
        return t0 + dt0, (one, one, jnp.asarray(False))

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        empty = not jtu.tree_leaves(y0)
        if y_error is None and not empty:
            raise RuntimeError(
                "`PIDController` needs an error estimate, but the solver's `step` "
                "returned `y_error=None`. Use a solver that estimates its error."
            )
        inverse_errors, at_dtmin = controller_state[:2], controller_state[2]
        if empty:
            # An empty state: no error, so every step is accepted and grows the
            # next by the largest factor (as Diffrax's norm of an empty tree, 0).
            scaled_error = jnp.zeros((), error_dtype(y0))
        else:
            scaled_error = scaled_error_norm(self, y0, y1_candidate, y_error)
        dtype = scaled_error.dtype
        # As Diffrax: strictly below 1 (the textbook test is `<= 1`), and with a
        # `dtmin`, a step taken at `dtmin` is always kept.
        keep_step = scaled_error < 1
        if self.dtmin is not None:
            keep_step = keep_step | at_dtmin
        inverse_error = lax.stop_gradient(1 / scaled_error)
        ratio = self._ratio(inverse_error, inverse_errors, error_order, keep_step)
        dt = (t1 - t0) * ratio.astype(jnp.result_type(t1))
        dt, at_dtmin, result = self._apply_dt_bounds(dt, ratio, at_dtmin)
        next_t0 = jnp.where(keep_step, t1, t0)
        # A zero or infinite error says nothing about the next step, so the
        # filter remembers a neutral 1 instead.
        neutral = (inverse_error == 0) | jnp.isinf(inverse_error)
        remembered = jnp.where(neutral, jnp.ones((), dtype), inverse_error)
        previous, before_previous = inverse_errors
        state = (
            jnp.where(keep_step, remembered, previous),
            jnp.where(keep_step, previous, before_previous),
            at_dtmin,
        )
        next_t1 = next_t0 + dt.astype(jnp.result_type(next_t0))
        return keep_step, next_t0, next_t1, False, state, result

    def _ratio(self, inverse_error, inverse_errors, error_order, keep_step):
        """The step-size ratio from the filter, then limited: to `[1, factormax]`
        after an accepted step (as Diffrax: a kept step never shrinks the next one)
        and to `[factormin, safety]` after a rejected one."""
        dtype = inverse_error.dtype
        exponents = self._filter_exponents(error_order)
        ratio = _as(self.safety, dtype) * inverse_error ** _as(exponents[0], dtype)
        for history, exponent in zip(inverse_errors, exponents[1:], strict=True):
            if not (isinstance(exponent, (int, float)) and exponent == 0):
                ratio = ratio * history ** _as(exponent, dtype)
        lower = jnp.where(keep_step, 1, _as(self.factormin, dtype)).astype(dtype)
        upper = jnp.where(keep_step, self.factormax, self.safety).astype(dtype)
        return lax.stop_gradient(jnp.minimum(upper, jnp.maximum(lower, ratio)))

    def _apply_dt_bounds(self, dt, ratio, at_dtmin):
        result = RESULTS.successful
        if self.dtmax is not None:
            dt = jnp.minimum(dt, _as(self.dtmax, dt.dtype))
        if self.dtmin is None:
            return dt, at_dtmin, result
        dtmin = _as(self.dtmin, dt.dtype)
        if not self.force_dtmin:
            result = RESULTS.where(dt < dtmin, RESULTS.dt_min_reached, result)
        # As Diffrax: once at `dtmin`, a ratio limited to exactly 1 keeps `dtmin`.
        dt = jnp.where(at_dtmin & (ratio == 1), dtmin, dt)
        return jnp.maximum(dt, dtmin), dt <= dtmin, result
