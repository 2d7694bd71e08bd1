"""Low-order solvers written for SDEs `dy = f(t, y) dt + g(t, y) dW`: Euler–Heun,
Milstein's method (Itô and Stratonovich), the reversible Heun method, and
`HalfSolver`, which gives any solver an error estimate by step doubling.

Euler–Heun and Milstein take `terms=MultiTerm(drift, diffusion)`, the drift's control
being time (an `ODETerm`). They evaluate the diffusion at the start of the step only,
as the schemes are defined for it.
"""

import warnings
from typing import Any, ClassVar, final

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float

from .._path.local import LocalLinearInterpolation, accumulation_dtype
from .._solution import RESULTS, succeeded, where_result
from .._term import AbstractTerm, MultiTerm
from .base import (
    AbstractAdaptiveSolver,
    AbstractItoSolver,
    AbstractSolver,
    AbstractStratonovichSolver,
    AbstractWrappedSolver,
    _is_sde,
    refreshed_after_jump,
)

# A drift (whose control is time, a scalar) and a diffusion term.
_DRIFT_AND_DIFFUSION = MultiTerm[
    tuple[AbstractTerm[Any, Float[Array, ""]], AbstractTerm]
]


def _add(*trees):
    return jtu.tree_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def _combined(fn, y0, *trees):
    """`fn(y, *xs)` leafwise over `y0` and `trees`, computed in the state's
    `accumulation_dtype` (float32 for float16 and bfloat16 states, whose own
    rounding of every partial sum would add up) and rounded to its dtype once."""

    def leaf(y, *xs):
        dtype = accumulation_dtype(jnp.result_type(y))
        return fn(jnp.asarray(y).astype(dtype), *(x.astype(dtype) for x in xs)).astype(
            jnp.result_type(y)
        )

    return jtu.tree_map(leaf, y0, *trees)


class _DriftDiffusionSolver(AbstractSolver):
    """Shared by the solvers that take `MultiTerm(drift, diffusion)`."""

    term_structure: ClassVar[Any] = _DRIFT_AND_DIFFUSION
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        drift, diffusion = terms.terms
        return drift.vf(t0, y0, args), diffusion.vf(t0, y0, args)

    @staticmethod
    def _euler_parts(terms, t0, t1, y0, args, diffusion_product=True):
        """The diffusion term, the increments `dt`, `dW`, and the Euler–Maruyama
        parts `f(y0) dt`, `g(y0) dW` (None unless `diffusion_product`)."""
        drift, diffusion = terms.terms
        dt = drift.contr(t0, t1)
        dw = diffusion.contr(t0, t1)
        f0 = drift.vf_prod(t0, y0, args, dt)
        g0 = diffusion.vf_prod(t0, y0, args, dw) if diffusion_product else None
        return diffusion, dt, dw, f0, g0


class _Milstein(_DriftDiffusionSolver):
    """Milstein's method for commutative noise; `_ito` selects the calculus."""

    _ito: ClassVar[bool]

    def order(self, terms):
        raise ValueError(f"`{type(self).__name__}` is a method for SDEs, not for ODEs.")

    def strong_order(self, terms):
        return 1

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        if self._ito:
            diffusion, dt, dw, f0, _ = self._euler_parts(
                terms, t0, t1, y0, args, diffusion_product=False
            )
            g0, correction = _ito_milstein_parts(diffusion, t0, y0, args, dw, dt)
        else:
            diffusion, dt, dw, f0, g0 = self._euler_parts(terms, t0, t1, y0, args)
            # For commutative noise the Stratonovich double integrals J_jk + J_kj
            # are dW_j dW_k, so the correction is half the directional derivative
            # of the diffusion's product with dW along g(y0) dW.
            correction = _milstein_correction(diffusion, t0, y0, args, dw, g0)
        y1 = _combined(
            lambda y, f, g, c: y + f + g + jnp.asarray(0.5, y.dtype) * c,
            y0,
            f0,
            g0,
            correction,
        )
        return y1, None, dict(y0=y0, y1=y1), None, RESULTS.successful


@final
class EulerHeun(_DriftDiffusionSolver, AbstractStratonovichSolver):
    """The Euler–Heun method: Euler's method for the drift and Heun's for the
    diffusion. Converges to the Stratonovich solution with strong order 0.5 in
    general (`strong_order`), and 1 for commutative noise; first order on ODEs. Two
    diffusion evaluations and one drift evaluation per step; no error estimate;
    linear dense output.

    Call it with `terms=MultiTerm(ODETerm(drift), ControlTerm(diffusion, path))`.
    """

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 0.5

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        diffusion, _, dw, f0, g0 = self._euler_parts(terms, t0, t1, y0, args)
        y_predicted = _add(y0, g0)
        g1 = diffusion.vf_prod(t0, y_predicted, args, dw)
        y1 = _combined(
            lambda y, f, a, b: y + f + jnp.asarray(0.5, y.dtype) * (a + b),
            y0,
            f0,
            g0,
            g1,
        )
        return y1, None, dict(y0=y0, y1=y1), None, RESULTS.successful


def _milstein_correction(diffusion, t0, y0, args, dw, g0):
    """`Σ_jk (g_j · ∇) g_k dW_j dW_k`: the derivative of the diffusion's product with
    `dW` in the direction of `g0 = g(y0) dW`. One Jacobian-vector product."""
    _, correction = jax.jvp(lambda y: diffusion.vf_prod(t0, y, args, dw), (y0,), (g0,))
    return correction


@final
class StratonovichMilstein(_Milstein, AbstractStratonovichSolver):
    """Milstein's method, converging to the Stratonovich solution with strong order 1
    for commutative noise (scalar, diagonal, or noise whose vector fields commute:
    this is not checked). One drift and one diffusion evaluation and one
    Jacobian-vector product of the diffusion per step; no error estimate; linear
    dense output. Not for ODEs.

    Call it with `terms=MultiTerm(ODETerm(drift), ControlTerm(diffusion, path))`.
    """

    _ito: ClassVar[bool] = False


@final
class ItoMilstein(_Milstein, AbstractItoSolver):
    """Milstein's method, converging to the Itô solution with strong order 1 for
    commutative noise (not checked). As `StratonovichMilstein`, with the Itô
    correction: the double integrals are `(dW_j dW_k - δ_jk dt) / 2`, so the
    diffusion's derivative along each noise channel is used. Per step, one drift
    evaluation and two evaluations of the diffusion batched over the noise channels
    (its columns, and one Jacobian-vector product per channel); no error estimate.
    Linear dense output. Not for ODEs.

    Call it with `terms=MultiTerm(ODETerm(drift), ControlTerm(diffusion, path))`.
    """

    _ito: ClassVar[bool] = True


def _ito_milstein_parts(diffusion, t0, y0, args, dw, dt):
    """`g(y0) dW` and the Itô correction
    `Σ_jk (g_j · ∇) g_k (dW_j dW_k - δ_jk dt)`, `g_j` the diffusion's column for noise
    channel `j`, from two batched evaluations of the diffusion (as Diffrax's
    `ItoMilstein` makes): its columns at `y0`, and, for each channel `j`, the
    derivative along `g_j` of its product with the control `dW_j dW - dt e_j`
    (the product being linear in the control, these sum to the correction)."""
    leaves, structure = jtu.tree_flatten(dw)
    sizes = [jnp.size(x) for x in leaves]
    dtype = jnp.result_type(*leaves)
    flat_dw = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
    basis = jnp.eye(flat_dw.shape[0], dtype=dtype)

    def control(row):
        parts, start = [], 0
        for x, n in zip(leaves, sizes, strict=True):
            parts.append(row[start : start + n].reshape(jnp.shape(x)).astype(x.dtype))
            start += n
        return jtu.tree_unflatten(structure, parts)

    channels = jnp.arange(flat_dw.shape[0])
    columns = jax.vmap(lambda j: diffusion.vf_prod(t0, y0, args, control(basis[j])))(
        channels
    )
    g0 = jtu.tree_map(
        lambda c: jnp.tensordot(flat_dw.astype(c.dtype), c, axes=1), columns
    )
    step = jnp.asarray(dt, dtype)

    def along(j, g_j):
        c_j = control(flat_dw[j] * flat_dw - step * basis[j])
        return jax.jvp(lambda y: diffusion.vf_prod(t0, y, args, c_j), (y0,), (g_j,))[1]

    per_channel = jax.vmap(along)(channels, columns)
    return g0, jtu.tree_map(lambda x: jnp.sum(x, axis=0), per_channel)


@final
class ReversibleHeun(AbstractAdaptiveSolver, AbstractStratonovichSolver):
    """The reversible Heun method (Kidger et al. 2021): algebraically reversible,
    so the solve can be reconstructed backwards from its end. Converges to the
    Stratonovich solution with strong order 0.5 (order 1 for additive noise) and is
    second order on ODEs. One vector-field evaluation per step (the last one is kept
    in the solver state), with an error estimate for adaptive steps; linear dense
    output.

    Takes any term: `MultiTerm(ODETerm(drift), ControlTerm(diffusion, path))` for an
    SDE, or an `ODETerm`.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        # The auxiliary state ŷ starts at y0; its vector field is kept between steps.
        return y0, terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y_hat0, vf0 = solver_state
        # After a jump in the vector field the kept evaluation is stale: evaluate
        # afresh at the state.
        vf0 = refreshed_after_jump(made_jump, lambda: terms.vf(t0, y0, args), vf0)
        control = terms.contr(t0, t1)
        y_hat1 = _combined(
            lambda y, yh, dy: jnp.asarray(2.0, y.dtype) * y - yh + dy,
            y0,
            y_hat0,
            terms.prod(vf0, control),
        )
        vf1 = terms.vf(t1, y_hat1, args)
        increment = terms.prod(_add(vf0, vf1), control)
        y1 = jtu.tree_map(
            lambda y, dy: y + jnp.asarray(0.5, jnp.result_type(y)) * dy, y0, increment
        )
        # Trapezoidal against left-point increment: half the change in the vector
        # field, applied to the control.
        change = jtu.tree_map(lambda a, b: b - a, vf0, vf1)
        y_error = jtu.tree_map(
            lambda e: jnp.asarray(0.5, jnp.result_type(e)) * e,
            terms.prod(change, control),
        )
        return (
            y1,
            y_error,
            dict(y0=y0, y1=y1),
            (y_hat1, vf1),
            RESULTS.successful,
        )

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


@final
class HalfSolver(AbstractAdaptiveSolver, AbstractWrappedSolver):
    """Gives any solver an error estimate by step doubling: each step is taken once
    in full and once as two half steps, and their difference is the error estimate.
    The two half steps are the result. Each step costs three steps of the wrapped
    solver.

    Mostly useful for SDE solvers without an error estimate (e.g. `HalfSolver(Euler())`
    or `HalfSolver(EulerHeun())` with `PIDController`).

    **Arguments:**

    - `solver`: the solver to wrap.
    """

    solver: AbstractSolver

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(
                "`HalfSolver(solver)` wraps a solver instance (e.g. `Euler()`), but "
                f"got {self.solver!r}."
            )

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):
        return self.solver.interpolation_cls

    @property
    def minimal_levy_area(self):
        return getattr(self.solver, "minimal_levy_area", None)

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        # Step doubling estimates the local error of the full step: order p + 1 for
        # an ODE method of order p, strong order + 1/2 for an SDE.
        if _is_sde(terms):
            order = self.strong_order(terms)
            return None if order is None else order + 0.5
        order = self.order(terms)
        return None if order is None else order + 1

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        t_half = t0 + jnp.asarray(0.5, jnp.result_type(t0)) * (t1 - t0)
        y_half, _, _, state_half, result1 = self.solver.step(
            terms, t0, t_half, y0, args, solver_state, made_jump
        )
        y1, _, _, state1, result2 = self.solver.step(
            terms, t_half, t1, y_half, args, state_half, False
        )
        y_full, _, dense_info, _, result3 = self.solver.step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )
        y_error = jtu.tree_map(lambda a, b: jnp.abs(a - b), y1, y_full)
        result = where_result(succeeded(result1), result2, result1)
        result = where_result(succeeded(result), result3, result)
        return y1, y_error, dense_info, state1, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


def resolve_deprecated_tuple_terms(terms, solver):
    """`EulerHeun`, `ItoMilstein` and `StratonovichMilstein` used to take
    `terms=(drift, diffusion)`. As in Diffrax, that form is still accepted, with a
    `UserWarning`, and becomes `MultiTerm(drift, diffusion)`."""
    inner = solver
    while isinstance(inner, AbstractWrappedSolver):
        inner = inner.solver
    if (
        isinstance(inner, (EulerHeun, ItoMilstein, StratonovichMilstein))
        and isinstance(terms, tuple)
        and len(terms) == 2
        and all(isinstance(t, AbstractTerm) for t in terms)
    ):
        warnings.warn(
            f"Passing `terms=(drift, diffusion)` to `{type(inner).__name__}` is "
            "deprecated, as in Diffrax: pass `terms=MultiTerm(drift, diffusion)`.",
            UserWarning,
            stacklevel=3,
        )
        return MultiTerm(*terms)
    return terms
