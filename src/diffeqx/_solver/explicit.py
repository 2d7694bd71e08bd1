"""Explicit Runge–Kutta solvers: each is a tableau, an interpolant and an order."""

from typing import ClassVar, final

import numpy as np

from .._path.local import (
    FourthOrderPolynomialInterpolation,
    LocalLinearInterpolation,
    PolynomialStageInterpolation,
    ThirdOrderHermitePolynomialInterpolation,
)
from . import coefficients as co
from .runge_kutta import AbstractERK, ButcherTableau


@final
class Euler(AbstractERK):
    """Explicit Euler method: first order, one stage, no error estimate (so it is
    used with fixed steps). Linear interpolation for dense output."""

    tableau: ClassVar[ButcherTableau] = co.EULER_TABLEAU
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def order(self, terms):
        return 1


@final
class Heun(AbstractERK):
    """Heun's method: second order, two stages, embedded Euler error estimate.
    Cubic Hermite dense output."""

    tableau: ClassVar[ButcherTableau] = co.HEUN_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2


@final
class Midpoint(AbstractERK):
    """Explicit midpoint method: second order, two stages, embedded Euler error
    estimate. Cubic Hermite dense output."""

    tableau: ClassVar[ButcherTableau] = co.MIDPOINT_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2


@final
class Ralston(AbstractERK):
    """Ralston's method: the second-order two-stage method with minimal truncation
    error; embedded Euler error estimate. Cubic Hermite dense output."""

    tableau: ClassVar[ButcherTableau] = co.RALSTON_TABLEAU
    interpolation_cls: ClassVar = ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 2


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
    scan_stages: ClassVar[bool] = True

    def order(self, terms):
        return 8
