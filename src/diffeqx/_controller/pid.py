"""Adaptive step sizes: `PIDController`."""

from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from .._solution import RESULTS
from .._term import unwrap_is_ode
from .base import AbstractAdaptiveStepSizeController


def _scaled(x, y, rtol, atol):
    """`x / (atol + rtol * |y|)`, leaf by leaf."""
    return jtu.tree_map(lambda xi, yi: xi / (atol + rtol * jnp.abs(yi)), x, y)


def initial_step_size(terms, t0, y0, args, func, error_order, rtol, atol, norm):
    """The first step size, by the error-based algorithm of Hairer, Nørsett & Wanner
    (Solving ODEs I, §II.4): a trial explicit Euler step sized from the magnitudes of
    `y0` and `f(t0, y0)`, then a step sized from the estimated second derivative."""
    if not unwrap_is_ode(terms):
        return jnp.asarray(0.01, dtype=jnp.result_type(t0))
    f0 = func(terms, t0, y0, args)
    d0 = norm(_scaled(y0, y0, rtol, atol))
    d1 = norm(_scaled(f0, y0, rtol, atol))
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1, d1))
    h0 = h0.astype(jnp.result_type(t0))
    y1 = jtu.tree_map(lambda y, f: (y + h0 * f).astype(y.dtype), y0, f0)
    f1 = func(terms, t0 + h0, y1, args)
    df = jtu.tree_map(lambda a, b: b - a, f0, f1)
    d2 = norm(_scaled(df, y0, rtol, atol)) / h0
    max_d = jnp.maximum(d1, d2)
    h1 = jnp.where(
        max_d <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.where(max_d <= 1e-15, 1, max_d)) ** (1 / error_order),
    )
    return lax.stop_gradient(jnp.minimum(100 * h0, h1).astype(jnp.result_type(t0)))


class _PIDMeta(type(eqx.Module)):
    # `PIDController(..., step_ts=..., jump_ts=...)` returns the clipped wrapper, as
    # older code expects.
    def __call__(cls, *args, step_ts=None, jump_ts=None, **kwargs):
        controller = super().__call__(*args, **kwargs)
        if step_ts is None and jump_ts is None:
            return controller
        from .clip import ClipStepSizeController

        return ClipStepSizeController(controller, step_ts=step_ts, jump_ts=jump_ts)


@final
class PIDController(AbstractAdaptiveStepSizeController, metaclass=_PIDMeta):
    """Adapts the step size to keep the local error estimate within tolerance.

    A step is accepted when the RMS norm of `y_error / (atol + rtol * max(|y0|, |y1|))`
    is at most 1. The next step is the last one times
    `safety * e_n^(-b1) * e_{n-1}^(-b2) * e_{n-2}^(-b3)`, clipped to
    `[factormin, factormax]`, with `b1 = (pcoeff + icoeff + dcoeff) / k`,
    `b2 = -(pcoeff + 2 dcoeff) / k`, `b3 = dcoeff / k` and `k` the solver's
    `error_order`. The defaults (`icoeff=1`, others 0) give the classical integral
    controller; `pcoeff=0.4, icoeff=0.3` is a good PI choice.

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerances.
    - `pcoeff`, `icoeff`, `dcoeff`: proportional, integral and derivative gains.
    - `dtmin`, `dtmax`: bounds on the step size. Below `dtmin` the solve fails with
      `RESULTS.dt_min_reached`, unless `force_dtmin=True`, when steps of size `dtmin`
      are accepted regardless of their error.
    - `factormin`, `factormax`: bounds on the change of step size per step.
    - `norm`: the norm of the scaled error (RMS by default).
    - `safety`: the safety factor.
    - `error_order`: overrides the solver's `error_order`.
    - `step_ts`, `jump_ts`: if given, returns
      `ClipStepSizeController(PIDController(...), step_ts, jump_ts)`.

    With `dt0=None`, the first step is chosen by the algorithm of Hairer, Nørsett &
    Wanner from the tolerances and two evaluations of the vector field.
    """

    rtol: Any
    atol: Any
    pcoeff: Any = 0.0
    icoeff: Any = 1.0
    dcoeff: Any = 0.0
    dtmin: Any = None
    dtmax: Any = None
    force_dtmin: bool = eqx.field(static=True, default=True)
    factormin: Any = 0.2
    factormax: Any = 10.0
    norm: Callable = optx.rms_norm
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

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        if dt0 is None:
            dt0 = initial_step_size(
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
        dt0 = jnp.asarray(dt0, dtype=jnp.result_type(t0))
        if self.dtmax is not None:
            dt0 = jnp.minimum(dt0, self.dtmax)
        if self.dtmin is not None:
            dt0 = jnp.maximum(dt0, self.dtmin)
        one = jnp.ones((), dtype=jnp.result_type(float))
        at_dtmin = jnp.asarray(False) if self.dtmin is None else dt0 <= self.dtmin
        return t0 + dt0, (one, one, at_dtmin)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        prev_inv_error, prev_prev_inv_error, at_dtmin = controller_state
        order = self._error_order(error_order)

        def _scale(y0_i, y1_i, err_i):
            # A NaN candidate is compared against y0 only, so that it yields an infinite
            # (not NaN) error and the step is rejected and shrunk.
            y1_i = jnp.where(jnp.isnan(y1_i), y0_i, y1_i)
            magnitude = jnp.maximum(jnp.abs(y0_i), jnp.abs(y1_i))
            return err_i / (self.atol + self.rtol * magnitude)

        scaled = jtu.tree_map(_scale, y0, y1_candidate, y_error)
        scaled_error = self.norm(scaled)
        scaled_error = jnp.where(jnp.isnan(scaled_error), jnp.inf, scaled_error)
        keep_step = scaled_error <= 1
        if self.dtmin is not None and self.force_dtmin:
            keep_step = keep_step | at_dtmin
        inv_error = lax.stop_gradient(1 / scaled_error)

        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / order
        b3 = self.dcoeff / order
        factor = self.safety * inv_error**b1
        if not (isinstance(b2, (int, float)) and b2 == 0):
            factor = factor * prev_inv_error**b2
        if not (isinstance(b3, (int, float)) and b3 == 0):
            factor = factor * prev_prev_inv_error**b3
        factormin = jnp.where(keep_step, 1, self.factormin)
        factormax = jnp.where(keep_step, self.factormax, self.safety)
        factor = lax.stop_gradient(jnp.clip(factor, factormin, factormax))
        dt = (t1 - t0) * factor.astype(jnp.result_type(t1))

        result = RESULTS.successful
        if self.dtmax is not None:
            dt = jnp.minimum(dt, self.dtmax)
        if self.dtmin is not None:
            if not self.force_dtmin:
                result = RESULTS.where(dt < self.dtmin, RESULTS.dt_min_reached, result)
            at_dtmin = dt <= self.dtmin
            dt = jnp.maximum(dt, self.dtmin)

        next_t0 = jnp.where(keep_step, t1, t0)
        next_t1 = next_t0 + dt
        # Zero or infinite errors carry no information for the next step's history.
        usable = jnp.isfinite(inv_error) & (inv_error > 0)
        inv_error = jnp.where(usable, inv_error, 1)
        new_prev = jnp.where(keep_step, inv_error, prev_inv_error)
        new_prev_prev = jnp.where(keep_step, prev_inv_error, prev_prev_inv_error)
        state = (new_prev, new_prev_prev, at_dtmin)
        return keep_step, next_t0, next_t1, False, state, result
