"""Explicit solvers: Euler, and Runge–Kutta methods that are each a tableau, an
interpolant and an order."""

from typing import Any, ClassVar, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._path.local import (
    FourthOrderPolynomialInterpolation,
    LocalLinearInterpolation,
    PolynomialStageInterpolation,
    ThirdOrderHermitePolynomialInterpolation,
)
from .._solution import RESULTS
from .._term import AbstractTerm
from . import coefficients as co
from .base import AbstractItoSolver, AbstractStratonovichSolver
from .runge_kutta import AbstractERK, ButcherTableau


@final
class Euler(AbstractItoSolver):
    """Explicit Euler method: `y1 = y0 + vf(t0, y0) · control(t0, t1)`. First order
    for ODEs. Driven by Brownian motion it is the Euler–Maruyama method, which
    converges to the Itô solution with strong order 0.5 (`strong_order`). No error
    estimate, so it is used with fixed steps. Linear interpolation for dense output.

    As in Diffrax, it is an `AbstractItoSolver` and neither an `AbstractRungeKutta` nor
    an `AbstractAdaptiveSolver`.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        increment = terms.vf_prod(t0, y0, args, terms.contr(t0, t1))
        # The increment is cast to the state's dtype before adding: no implicit
        # promotion (the state's dtype is the solve's).
        y1 = jtu.tree_map(
            lambda y, dy: y + jnp.asarray(dy, dtype=jnp.result_type(y)), y0, increment
        )
        return y1, None, dict(y0=y0, y1=y1), None, RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


@final
class Heun(AbstractERK, AbstractStratonovichSolver):
    """Heun's method: second order, two stages, embedded Euler error estimate.
    Cubic Hermite dense output. Driven by Brownian motion it converges to the
    Stratonovich solution, with strong order 0.5 (`strong_order`) in general."""

    tableau: ClassVar[ButcherTableau] = co.HEUN_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5


@final
class Midpoint(AbstractERK, AbstractStratonovichSolver):
    """Explicit midpoint method: second order, two stages, embedded Euler error
    estimate. Cubic Hermite dense output. Driven by Brownian motion it converges to
    the Stratonovich solution, with strong order 0.5 (`strong_order`) in general."""

    tableau: ClassVar[ButcherTableau] = co.MIDPOINT_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5


@final
class Ralston(AbstractERK, AbstractStratonovichSolver):
    """Ralston's method: the second-order two-stage method with minimal truncation
    error; embedded Euler error estimate. Cubic Hermite dense output. Driven by
    Brownian motion it converges to the Stratonovich solution, with strong order 0.5
    (`strong_order`) in general."""

    tableau: ClassVar[ButcherTableau] = co.RALSTON_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5


@final
class Bosh3(AbstractERK):
    """Bogacki–Shampine 3(2) method: third order, four stages with first-same-as-last
    (three evaluations per step). Cubic Hermite dense output."""

    tableau: ClassVar[ButcherTableau] = co.BOSH3_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 3


class _Tsit5Interpolation(PolynomialStageInterpolation):
    weights: ClassVar[np.ndarray] = np.array(co.TSIT5_DENSE)


@final
class Tsit5(AbstractERK):
    """Tsitouras' 5(4) method: fifth order, seven stages with first-same-as-last (six
    evaluations per step), embedded fourth-order error estimate and its own
    fourth-degree continuous extension. A good default for non-stiff problems."""

    tableau: ClassVar[ButcherTableau] = co.TSIT5_TABLEAU
    interpolation_cls: ClassVar = _Tsit5Interpolation

    def order(self, terms):
        return 5


class _Dopri5Interpolation(FourthOrderPolynomialInterpolation):
    c_mid: ClassVar[np.ndarray] = np.array(co.DOPRI5_C_MID)


@final
class Dopri5(AbstractERK):
    """Dormand–Prince 5(4) method: fifth order, seven stages with first-same-as-last,
    embedded fourth-order error estimate, Shampine's quartic dense output."""

    tableau: ClassVar[ButcherTableau] = co.DOPRI5_TABLEAU
    interpolation_cls: ClassVar = _Dopri5Interpolation

    def order(self, terms):
        return 5


class _Dopri8Interpolation(PolynomialStageInterpolation):
    weights: ClassVar[np.ndarray] = np.array(co.DOPRI8_DENSE)


@final
class Dopri8(AbstractERK):
    """Prince–Dormand 8(7) method (RK8(7)13M): eighth order, thirteen stages plus a
    first-same-as-last stage, embedded seventh-order error estimate, and a
    continuous extension from its own stages. For tight tolerances."""

    tableau: ClassVar[ButcherTableau] = co.DOPRI8_TABLEAU
    interpolation_cls: ClassVar = _Dopri8Interpolation
    # Thirteen stages: a loop by default.
    scan_stages: bool | None = eqx.field(default=True, static=True, kw_only=True)

    def order(self, terms):
        return 8
