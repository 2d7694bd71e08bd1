"""Interpolants over a single step, used for dense output and `SaveAt(ts=...)`.

Conventions shared by all of them: `k` values are increments over the step (vector
field times `t1 - t0`), and `evaluate(t0, t1)` returns an increment.
"""

from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._transforms import is_batched
from .base import AbstractPath


def _arrays(tree):
    """`tree` with Python numbers as (weakly typed) arrays: an interpolation built
    by hand may be given them, as Diffrax's accept."""
    return jtu.tree_map(jnp.asarray, tree)


def accumulation_dtype(dtype):
    """The dtype in which combinations of a state's values are computed: float32
    for states of a narrower float dtype (float16, bfloat16), whose own rounding of
    the weights and of every partial sum would dominate (Tsit5 in bfloat16 on
    `y' = -y`, one step of 0.4: 12 ULPs off rather than 1; its interpolant at the
    step's end 28 ULPs off); the state's own dtype otherwise. Results are rounded
    back to the state's dtype. (Brownian paths sample half-precision leaves in it,
    Langevin coefficients are computed in it at least, and the SDE solvers combine
    their stages and increments in it.)"""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.dtype("float32")
    return dtype


def _wide(*xs):
    """`xs` in their `accumulation_dtype`."""
    out = tuple(x.astype(accumulation_dtype(x.dtype)) for x in xs)
    return out if len(out) > 1 else out[0]


def _like(x, leaf):
    """`x` (a time-like real scalar) in the dtype of `leaf`: states may be wider
    than times (float64 states with float32 times), or complex. Exact. (A Python
    number for `leaf`, as an interpolation built by hand may hold, has the dtype
    JAX gives it.)"""
    return jnp.asarray(x).astype(jnp.result_type(leaf))


class AbstractLocalInterpolation(AbstractPath):
    """An interpolant over one step `[t0, t1]`."""

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree:
        if t1 is not None:
            start, end = self._at(t0), self._at(t1)
            return jtu.tree_map(lambda a, b: b - a, start, end)
        return self._at(t0)

    def _theta(self, t):
        """`(theta, dt)`: where `t` lies in the step, as a fraction of it, and the
        step's length, by which derivatives in `theta` are divided. On a step of
        zero length, as in Diffrax: `theta = 0` at every `t` (the interpolant is
        `y0`), and `dt = inf`, so that derivatives are zero; gradients with respect
        to the times are zero there too."""
        dt = self.t1 - self.t0
        degenerate = dt == 0
        theta = jnp.where(degenerate, 0, t - self.t0) / jnp.where(degenerate, 1, dt)
        return theta, jnp.where(degenerate, jnp.inf, dt)

    def _at(self, t) -> PyTree:
        raise NotImplementedError


@final
class LocalLinearInterpolation(AbstractLocalInterpolation):
    """Straight line from `y0` at `t0` to `y1` at `t1`."""

    t0: Any
    t1: Any
    y0: PyTree = eqx.field(converter=_arrays)
    y1: PyTree = eqx.field(converter=_arrays)

    def _at(self, t):
        theta, _ = self._theta(t)
        return jtu.tree_map(
            lambda a, b: a + (_like(theta, a) * (b - a)).astype(a.dtype),
            self.y0,
            self.y1,
        )

    def derivative(self, t, left: bool = True):
        _, dt = self._theta(t)
        return jtu.tree_map(
            lambda a, b: ((b - a) / _like(dt, a)).astype(a.dtype), self.y0, self.y1
        )


@final
class ThirdOrderHermitePolynomialInterpolation(AbstractLocalInterpolation):
    """Cubic Hermite interpolant matching values `y0`, `y1` and increments `k0`, `k1`
    (derivatives times `t1 - t0`) at both ends."""

    t0: Any
    t1: Any
    y0: PyTree
    y1: PyTree
    k0: PyTree
    k1: PyTree

    def __init__(self, *, t0, t1, y0, y1, k0, k1):
        self.t0, self.t1 = t0, t1
        self.y0, self.y1, self.k0, self.k1 = map(_arrays, (y0, y1, k0, k1))

    @classmethod
    def from_k(cls, *, t0, t1, y0, y1, k):
        """Builds the interpolant from a Runge–Kutta step's stage increments `k` (one
        leading stage axis per leaf), using the first and last stages as end slopes."""
        return cls(
            t0=t0,
            t1=t1,
            y0=y0,
            y1=y1,
            k0=jtu.tree_map(lambda x: x[0], k),
            k1=jtu.tree_map(lambda x: x[-1], k),
        )

    @staticmethod
    def _coefficients(y0, y1, k0, k1):
        # p(theta) = y0 + theta (k0 + theta (b + theta a)), with p(1) = y1 and
        # p'(1) = k1. The coefficients are formed from differences of the end values
        # rather than from the values themselves, so that rounding errors scale with
        # the change over the step, not with the size of the state: in float32 the
        # derivative in theta (which reaches the step's end times under `jax.grad`)
        # would otherwise lose about |y| / |y1 - y0| in relative accuracy.
        d = y1 - y0
        a = k0 + k1 - 2 * d
        b = 3 * d - 2 * k0 - k1
        return a, b

    def _at(self, t):
        theta, _ = self._theta(t)

        def _leaf(y0_, y1, k0, k1):
            y0, y1, k0, k1 = _wide(y0_, y1, k0, k1)
            a, b = self._coefficients(y0, y1, k0, k1)
            th = _like(theta, y0)
            return (y0 + th * (k0 + th * (b + th * a))).astype(y0_.dtype)

        return jtu.tree_map(_leaf, self.y0, self.y1, self.k0, self.k1)

    def derivative(self, t, left: bool = True):
        theta, dt = self._theta(t)

        def _leaf(y0_, y1, k0, k1):
            y0, y1, k0, k1 = _wide(y0_, y1, k0, k1)
            a, b = self._coefficients(y0, y1, k0, k1)
            th = _like(theta, y0)
            out = k0 + th * (2 * b + th * (3 * a))
            return (out / _like(dt, y0)).astype(y0_.dtype)

        return jtu.tree_map(_leaf, self.y0, self.y1, self.k0, self.k1)


class FourthOrderPolynomialInterpolation(AbstractLocalInterpolation):
    """Quartic interpolant through `y0`, `y1` and a midpoint value, with the end slopes
    of the step. Subclasses set `c_mid`: the weights such that the midpoint value is
    `y0 + sum_i c_mid[i] k[i]` for the step's stage increments `k`."""

    c_mid: eqx.AbstractClassVar[np.ndarray]
    t0: Any
    t1: Any
    y0: PyTree
    y1: PyTree
    k: PyTree

    def __init__(self, *, t0, t1, y0, y1, k):
        self.t0, self.t1 = t0, t1
        self.y0, self.y1, self.k = map(_arrays, (y0, y1, k))

    def _coefficients(self, y0, y1, k):
        # p(theta) = y0 + k0 theta + a theta^2 + b theta^3 + c theta^4 with p(1) = y1,
        # p'(1) = k_last and p(1/2) = y_mid.
        c_mid = jnp.asarray(self.c_mid, dtype=k.dtype)
        k0, k1 = k[0], k[-1]
        y_mid = y0 + jnp.tensordot(c_mid, k, axes=1)
        r1 = y1 - y0 - k0
        r2 = k1 - k0
        r3 = y_mid - y0 - 0.5 * k0
        c = 16 * r3 - 8 * r1 + 2 * r2
        b = r2 - 2 * r1 - 2 * c
        a = r1 - b - c
        return k0, a, b, c

    def _at(self, t):
        theta, _ = self._theta(t)

        def _leaf(y0_, y1, k):
            y0, y1, k = _wide(y0_, y1, k)
            k0, a, b, c = self._coefficients(y0, y1, k)
            th = _like(theta, y0)
            return (y0 + th * (k0 + th * (a + th * (b + th * c)))).astype(y0_.dtype)

        return jtu.tree_map(_leaf, self.y0, self.y1, self.k)

    def derivative(self, t, left: bool = True):
        theta, dt = self._theta(t)

        def _leaf(y0_, y1, k):
            y0, y1, k = _wide(y0_, y1, k)
            k0, a, b, c = self._coefficients(y0, y1, k)
            th = _like(theta, y0)
            out = k0 + th * (2 * a + th * (3 * b + th * 4 * c))
            return (out / _like(dt, y0)).astype(y0_.dtype)

        return jtu.tree_map(_leaf, self.y0, self.y1, self.k)


# Stage buffers with at most this many elements combine by elementwise products.
_SMALL_PRODUCT_SIZE = 1024


class PolynomialStageInterpolation(AbstractLocalInterpolation):
    """Continuous extension of a Runge–Kutta method given as a weight matrix:
    `y(t0 + theta dt) = y0 + sum_d theta^d sum_i weights[i, d - 1] k[i]`."""

    weights: ClassVar[np.ndarray]
    t0: Any
    t1: Any
    y0: PyTree
    k: PyTree

    def __init__(self, *, t0, t1, y0, k, y1=None):
        del y1
        self.t0, self.t1, self.y0, self.k = t0, t1, _arrays(y0), _arrays(k)

    def _stage_weights(self, theta, leaf, derivative: bool):
        """Each stage's weight at `theta`, `b_i(theta) = sum_d weights[i, d]
        theta^(d + 1)` (or its derivative in `theta`), as scalars in the dtype of
        `leaf`. The stages are combined after these are formed, as Diffrax does:
        near the step's end the polynomials' large coefficients cancel in the
        scalar weights rather than in whole states, which in float32 keeps the
        values, and their gradients, several times closer to the exact ones."""
        w = np.asarray(self.weights)
        if derivative:
            w = w * np.arange(1, w.shape[1] + 1)
        w = jnp.asarray(w, dtype=leaf.dtype)
        th = _like(theta, leaf)
        acc = w[:, -1]
        for d in range(w.shape[1] - 2, -1, -1):
            acc = w[:, d] + th * acc
        return acc if derivative else th * acc

    @staticmethod
    def _combine(b, k):
        """`sum_i b[i] k[i]`."""
        if k.size <= _SMALL_PRODUCT_SIZE and not is_batched():
            # A small product written out: XLA compiles it into the surrounding
            # kernel, where on CPU a matrix product is a library call (measured: a
            # 12-step Tsit5 solve of a 2-variable system saving at 100 times, 83 us
            # with the matrix product, 35 us without; measured when the stages were
            # combined into polynomial coefficients, before the weights). Under
            # `vmap` the matrix product was faster for those coefficients (a
            # 1,000-member batch ran 2x slower without it); not re-measured for the
            # weights.
            return jnp.sum(b.reshape(b.shape + (1,) * (k.ndim - 1)) * k, axis=0)
        return jnp.tensordot(b, k, axes=1)

    def _at(self, t):
        theta, _ = self._theta(t)

        def _leaf(y0_, k):
            y0, k = _wide(y0_, k)
            b = self._stage_weights(theta, y0, derivative=False)
            return (y0 + self._combine(b, k)).astype(y0_.dtype)

        return jtu.tree_map(_leaf, self.y0, self.k)

    def derivative(self, t, left: bool = True):
        theta, dt = self._theta(t)

        def _leaf(y0_, k):
            y0, k = _wide(y0_, k)
            b = self._stage_weights(theta, y0, derivative=True)
            return (self._combine(b, k) / _like(dt, y0)).astype(y0_.dtype)

        return jtu.tree_map(_leaf, self.y0, self.k)
