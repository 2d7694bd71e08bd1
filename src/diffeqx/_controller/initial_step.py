"""The automatic first step of an adaptive solve (`dt0=None`)."""

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._term import ODETerm

# Diffrax 0.7.2 computes the first step by the rule below only when the controller
# is handed a bare `ODETerm`. `diffeqsolve` (theirs and ours) hands it the terms
# wrapped for the direction of time, so inside a solve the first step is always
# this fallback, in the time dtype. We keep that, so that the same call takes the
# same steps.
FALLBACK_FIRST_STEP = 0.01


def _weighted(x, scale):
    return jtu.tree_map(lambda xi, si: xi / si, x, scale)


def hairer_first_step(terms, t0, y0, args, func, error_order, rtol, atol, norm):
    """The starting step of Hairer, Nørsett & Wanner (Solving ODEs I, §II.4,
    "Starting step size"), in the dtype of `y0`:

    1. With weights `w = atol + rtol |y0|`, `d0 = ‖y0/w‖` and `d1 = ‖f(t0, y0)/w‖`,
       a trial step `h0 = 0.01 d0/d1` (or `1e-6` when either norm is below `1e-5`).
    2. One explicit Euler step of size `h0` estimates the second derivative,
       `d2 = ‖(f(t0 + h0, y0 + h0 f0) - f0)/w‖ / h0`.
    3. `h1 = (0.01 / max(d1, d2))^(1/k)` for an error estimate of order `k` (or
       `max(1e-6, 1e-3 h0)` when `max(d1, d2) <= 1e-15`), and the step is
       `min(100 h0, h1)`.

    The constants are the book's; the weights use `|y0|` only, as there is no
    second point yet."""
    weights = jtu.tree_map(lambda y: atol + rtol * jnp.abs(y), y0)
    f0 = func(terms, t0, y0, args)
    d0 = norm(_weighted(y0, weights))
    d1 = norm(_weighted(f0, weights))
    too_small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(too_small, 1e-6, 0.01 * (d0 / jnp.where(too_small, 1, d1)))
    h0 = h0.astype(d0.dtype)
    t_trial = t0 + h0.astype(jnp.result_type(t0))
    y_trial = jtu.tree_map(lambda y, f: y + (h0 * f).astype(y.dtype), y0, f0)
    f1 = func(terms, t_trial, y_trial, args)
    d2 = norm(_weighted(jtu.tree_map(lambda a, b: b - a, f0, f1), weights)) / h0
    largest = jnp.maximum(d1, d2)
    degenerate = largest <= 1e-15
    h1 = jnp.where(
        degenerate,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.where(degenerate, 1, largest)) ** (1 / error_order),
    ).astype(h0.dtype)
    return lax.stop_gradient(jnp.minimum(100 * h0, h1))


def first_step(terms, t0, y0, args, func, error_order, rtol, atol, norm):
    """The first step size for `dt0=None`, in the dtype of `t0` (see
    `FALLBACK_FIRST_STEP` for when the Hairer–Nørsett–Wanner rule applies)."""
    time_dtype = jnp.result_type(t0)
    if not isinstance(terms, ODETerm):
        return jnp.asarray(FALLBACK_FIRST_STEP, dtype=time_dtype)
    dt0 = hairer_first_step(terms, t0, y0, args, func, error_order, rtol, atol, norm)
    return dt0.astype(time_dtype)
