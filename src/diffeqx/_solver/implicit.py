"""Diagonally implicit Runge–Kutta methods: the explicit engine's tableaus with a
non-zero diagonal, each implicit stage a nonlinear solve by an `optimistix` root
finder.

Stage `i` has increment `k_i = vf_prod(t_i, z_i, control)` at the stage value
`z_i = y0 + sum_{j<i} a_ij k_j + a_ii k_i`. An explicit stage (`a_ii = 0`) is
evaluated directly; an implicit one solves

    z - (y0 + sum_{j<i} a_ij k_j) - a_ii vf_prod(t_i, z, control) = 0

for `z`, in the state's own scale (so that the controller's tolerances apply), and
takes `k_i = (z - base) / a_ii`, which does not amplify the root finder's residual by
the stiffness as a new evaluation of the vector field would. The solution and the
error estimate combine the stages as the explicit engine does. A root find that fails
makes the step's result that failure (`RESULTS.promote`), so that the solve loop
rejects the step and shrinks it; with constant steps the solve ends with that code.
"""

from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx

from .._path.local import (
    LocalLinearInterpolation,
    ThirdOrderHermitePolynomialInterpolation,
)
from .._root_finder import VeryChord, with_stepsize_controller_tols
from .._solution import RESULTS
from .._term import AbstractTerm
from . import implicit_coefficients as ico
from .base import AbstractAdaptiveSolver, AbstractImplicitSolver
from .runge_kutta import (
    AbstractRungeKutta,
    ButcherTableau,
    _add,
    _combine,
    node_time,
)


def _scale(weight, tree):
    return jtu.tree_map(lambda x: jnp.asarray(weight, x.dtype) * x, tree)


def _sub(a, b):
    return jtu.tree_map(lambda x, y: x - y, a, b)


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def implicit_stage(
    root_finder, max_steps, terms, t, base, diagonal, args, control, guess
):
    """The increment `k` of an implicit stage `z = base + diagonal * k`,
    `k = vf_prod(t, z, control)`, and the root find's result as a diffeqx result."""

    def residual(z, _):
        k = terms.vf_prod(t, z, args, control)
        return _sub(_sub(z, base), _scale(diagonal, k))

    solution = optx.root_find(
        residual, root_finder, guess, max_steps=max_steps, throw=False
    )
    z = solution.value
    k = _scale(1.0 / diagonal, _sub(z, base))
    result = RESULTS.promote(solution.result)
    # A root find that "succeeds" on a non-finite iterate has failed.
    result = RESULTS.where(
        (result == RESULTS.successful) & ~_all_finite(z),
        RESULTS.nonlinear_divergence,
        result,
    )
    return k, result


class AbstractDIRK(AbstractRungeKutta, AbstractImplicitSolver):
    """Diagonally implicit Runge–Kutta method: a `ButcherTableau` with `a_diagonal`.
    Every stage with a non-zero diagonal entry is a nonlinear solve by `root_finder`
    (at most `root_find_max_steps` iterations), started from the tableau's stage
    predictor (`a_predictor`) when it has one, else from the step's initial state.

    A concrete method sets `tableau`, `interpolation_cls` and `order`, and declares
    the fields `root_finder` and `root_find_max_steps` with their defaults.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    root_finder: eqx.AbstractVar[optx.AbstractRootFinder]
    root_find_max_steps: eqx.AbstractVar[int]

    def __check_init__(self):
        diagonal = self.tableau.a_diagonal
        if diagonal is None or not np.any(diagonal):
            raise ValueError(
                f"{type(self).__name__} is an `AbstractDIRK`, whose tableau needs a "
                "non-zero `a_diagonal`."
            )

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tableau = self.tableau
        s = tableau.num_stages
        a = tableau.a_matrix
        c = tableau.c_full
        control = terms.contr(t0, t1)

        def stage_time(i):
            return node_time(c[i], t0, t1)

        zeros = jtu.tree_map(
            lambda x: jnp.zeros((s,) + jnp.shape(x), jnp.result_type(x)), y0
        )
        ks = zeros
        result = RESULTS.successful
        for i in range(s):
            base = _add(y0, _combine(a[i], ks)) if i > 0 else y0
            diagonal = float(a[i, i])
            if diagonal == 0:
                k_i = terms.vf_prod(stage_time(i), base, args, control)
            else:
                k_i, stage_result = implicit_stage(
                    self.root_finder,
                    self.root_find_max_steps,
                    terms,
                    stage_time(i),
                    base,
                    diagonal,
                    args,
                    control,
                    self._guess(i, y0, ks, base),
                )
                result = RESULTS.where(
                    result == RESULTS.successful, stage_result, result
                )
            ks = jtu.tree_map(lambda buf, x, i=i: buf.at[i].set(x), ks, k_i)
        y1 = _add(y0, _combine(tableau.b_sol, ks))
        y_error = None if tableau.b_error is None else _combine(tableau.b_error, ks)
        dense_info = dict(y0=y0, y1=y1, k=ks)
        return y1, y_error, dense_info, None, result

    def _guess(self, i, y0, ks, base):
        predictor = self.tableau.a_predictor
        if predictor is None or i == 0:
            return base
        row = np.zeros(self.tableau.num_stages)
        row[:i] = predictor[i - 1]
        return _add(y0, _combine(row, ks))


class AbstractSDIRK(AbstractDIRK):
    """Singly diagonally implicit Runge–Kutta method: every diagonal entry equal."""


class AbstractESDIRK(AbstractDIRK):
    """Singly diagonally implicit Runge–Kutta method whose first stage is explicit
    (the vector field at the step's start)."""


def _default_root_finder():
    return with_stepsize_controller_tols(VeryChord)()


@final
class ImplicitEuler(AbstractImplicitSolver, AbstractAdaptiveSolver):
    """The implicit (backward) Euler method, `y1 = y0 + h f(t1, y1)`: first order,
    L-stable, for stiff problems at loose tolerances. Its error estimate is the
    difference from the trapezoidal rule, `(h f(t1, y1) - h f(t0, y0)) / 2`, so that
    `PIDController` can drive it. Linear interpolation for dense output.

    **Arguments:**

    - `root_finder`: the `optimistix` root finder of the step's equation. By default
      `optimistix.Chord` with the step-size controller's `rtol`, `atol` and `norm`
      (`with_stepsize_controller_tols(optimistix.Chord)()`), as in Diffrax; with a
      controller that has no tolerances (`ConstantStepSize`) pass one with its own,
      e.g. `VeryChord(rtol=1e-8, atol=1e-8)`.
    - `root_find_max_steps`: the most iterations per step (10 by default); a step
      whose equation has not converged by then fails, and an adaptive controller
      rejects it and retries with a smaller step.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    interpolation_cls: ClassVar[Callable[..., Any]] = LocalLinearInterpolation
    root_finder: optx.AbstractRootFinder = eqx.field(
        default_factory=lambda: with_stepsize_controller_tols(optx.Chord)()
    )
    root_find_max_steps: int = eqx.field(default=10, static=True)

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def error_order(self, terms):
        # The error estimate compares with the trapezoidal rule (second order), so
        # it is a local error of order 2.
        return 2

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        control = terms.contr(t0, t1)
        k0 = terms.vf_prod(t0, y0, args, control)
        # Started from the explicit Euler step.
        k1, result = implicit_stage(
            self.root_finder,
            self.root_find_max_steps,
            terms,
            t1,
            y0,
            1.0,
            args,
            control,
            _add(y0, k0),
        )
        y1 = _add(y0, k1)
        # y1 minus the trapezoidal rule's y0 + (k0 + k1) / 2.
        y_error = _scale(0.5, _sub(k1, k0))
        return y1, y_error, dict(y0=y0, y1=y1), None, result


class _AbstractKvaerno(AbstractESDIRK, AbstractAdaptiveSolver):
    """Kværnø's ESDIRK methods (A. Kværnø, BIT Numerical Mathematics 44 (2004)
    489–502): stiffly accurate and L-stable, with an embedded error estimate for
    adaptive steps and third-order Hermite dense output. For stiff problems.

    **Arguments:**

    - `scan_kind`: accepted for compatibility with Diffrax; it does not change the
      computation.
    - `root_finder`: the `optimistix` root finder of the stage equations. By default
      `VeryChord` with the step-size controller's `rtol`, `atol` and `norm`
      (`with_stepsize_controller_tols(VeryChord)()`); with a controller that has no
      tolerances (`ConstantStepSize`) pass one with its own, e.g.
      `VeryChord(rtol=1e-8, atol=1e-8)`.
    - `root_find_max_steps`: the most iterations per stage (10 by default); a stage
      that has not converged by then fails the step, and an adaptive controller
      rejects it and retries with a smaller step.
    """

    interpolation_cls: ClassVar[Callable[..., Any]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )
    root_finder: optx.AbstractRootFinder = eqx.field(
        default_factory=_default_root_finder
    )
    root_find_max_steps: int = eqx.field(default=10, static=True)


@final
class Kvaerno3(_AbstractKvaerno):
    __doc__ = (
        "Kværnø's third-order method, with a second-order embedded one: 4 stages, "
        "3 of them implicit.\n\n" + _AbstractKvaerno.__doc__
    )
    tableau: ClassVar[ButcherTableau] = ico.KVAERNO_TABLEAUS["Kvaerno3"]

    def order(self, terms):
        return 3


@final
class Kvaerno4(_AbstractKvaerno):
    __doc__ = (
        "Kværnø's fourth-order method, with a third-order embedded one: 5 stages, "
        "4 of them implicit.\n\n" + _AbstractKvaerno.__doc__
    )
    tableau: ClassVar[ButcherTableau] = ico.KVAERNO_TABLEAUS["Kvaerno4"]

    def order(self, terms):
        return 4


@final
class Kvaerno5(_AbstractKvaerno):
    __doc__ = (
        "Kværnø's fifth-order method, with a fourth-order embedded one: 7 stages, "
        "6 of them implicit.\n\n" + _AbstractKvaerno.__doc__
    )
    tableau: ClassVar[ButcherTableau] = ico.KVAERNO_TABLEAUS["Kvaerno5"]

    def order(self, terms):
        return 5
