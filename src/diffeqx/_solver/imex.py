"""Implicit–explicit (IMEX) additive Runge–Kutta methods: `KenCarp3`, `KenCarp4`,
`KenCarp5` and `Sil3`.

Each is a `MultiButcherTableau` of an explicit and a diagonally implicit tableau, run
by the diagonally implicit engine (`AbstractDIRK`) on
`terms=MultiTerm(explicit_term, implicit_term)`: the non-stiff part is evaluated
explicitly and only the stiff part enters the stage equations. Coefficients and their
sources: `imex_coefficients.py`.
"""

from collections.abc import Callable
from typing import Any, ClassVar, final

import equinox as eqx
import numpy as np
import optimistix as optx

from .._path.local import (
    PolynomialStageInterpolation,
    ThirdOrderHermitePolynomialInterpolation,
)
from .._term import AbstractTerm, MultiTerm
from . import imex_coefficients as imco
from .base import AbstractAdaptiveSolver
from .implicit import (
    DIRK_ARGUMENTS,
    REUSE_JACOBIAN_ARGUMENT,
    AbstractDIRK,
    _default_root_finder,
)
from .runge_kutta import CalculateJacobian, MultiButcherTableau

_ARGUMENTS = (
    """

    Call it with `terms=MultiTerm(explicit_term, implicit_term)`: the first term is
    treated explicitly (the non-stiff part), the second implicitly (the stiff part)."""
    + DIRK_ARGUMENTS
)


class _AbstractIMEX(AbstractDIRK, AbstractAdaptiveSolver):
    term_structure: ClassVar[Any] = MultiTerm[tuple[AbstractTerm, AbstractTerm]]
    root_finder: optx.AbstractRootFinder = eqx.field(
        default_factory=_default_root_finder
    )
    root_find_max_steps: int = eqx.field(default=10, static=True)


class _KenCarp3Interpolation(PolynomialStageInterpolation):
    weights: ClassVar[np.ndarray] = imco.KENCARP_DENSE["KenCarp3"]


class _KenCarp4Interpolation(PolynomialStageInterpolation):
    weights: ClassVar[np.ndarray] = imco.KENCARP_DENSE["KenCarp4"]


class _KenCarp5Interpolation(PolynomialStageInterpolation):
    weights: ClassVar[np.ndarray] = imco.KENCARP_DENSE["KenCarp5"]


class _AbstractKenCarp(_AbstractIMEX):
    """Kennedy and Carpenter's additive Runge–Kutta methods (C. A. Kennedy and M. H.
    Carpenter, Applied Numerical Mathematics 44 (2003) 139–181): an explicit method
    paired with an L-stable, stiffly accurate ESDIRK, both of the method's order on
    their own and together, with a shared embedded method one order lower for
    adaptive steps and the paper's continuous extension for dense output. One
    Jacobian factorisation per step serves every implicit stage."""

    calculate_jacobian: ClassVar[CalculateJacobian] = CalculateJacobian.second_stage
    reuse_jacobian: bool = eqx.field(default=False, static=True)


@final
class KenCarp3(_AbstractKenCarp):
    __doc__ = (
        "Kennedy–Carpenter's third-order IMEX method ARK3(2)4L[2]SA, with a "
        "second-order embedded one: 4 stages, 3 of them implicit; second-order dense "
        "output.\n\n" + _AbstractKenCarp.__doc__ + _ARGUMENTS + REUSE_JACOBIAN_ARGUMENT
    )
    tableau: ClassVar[MultiButcherTableau] = MultiButcherTableau(
        *imco.IMEX_TABLEAUS["KenCarp3"]
    )
    interpolation_cls: ClassVar[Callable[..., Any]] = _KenCarp3Interpolation

    def order(self, terms):
        return 3


@final
class KenCarp4(_AbstractKenCarp):
    __doc__ = (
        "Kennedy–Carpenter's fourth-order IMEX method ARK4(3)6L[2]SA, with a "
        "third-order embedded one: 6 stages, 5 of them implicit; third-order dense "
        "output.\n\n" + _AbstractKenCarp.__doc__ + _ARGUMENTS + REUSE_JACOBIAN_ARGUMENT
    )
    tableau: ClassVar[MultiButcherTableau] = MultiButcherTableau(
        *imco.IMEX_TABLEAUS["KenCarp4"]
    )
    interpolation_cls: ClassVar[Callable[..., Any]] = _KenCarp4Interpolation

    def order(self, terms):
        return 4


@final
class KenCarp5(_AbstractKenCarp):
    __doc__ = (
        "Kennedy–Carpenter's fifth-order IMEX method ARK5(4)8L[2]SA, with a "
        "fourth-order embedded one: 8 stages, 7 of them implicit; third-order dense "
        "output.\n\n" + _AbstractKenCarp.__doc__ + _ARGUMENTS + REUSE_JACOBIAN_ARGUMENT
    )
    tableau: ClassVar[MultiButcherTableau] = MultiButcherTableau(
        *imco.IMEX_TABLEAUS["KenCarp5"]
    )
    interpolation_cls: ClassVar[Callable[..., Any]] = _KenCarp5Interpolation

    def order(self, terms):
        return 5


@final
class Sil3(_AbstractIMEX):
    __doc__ = (
        "Whitaker and Kar's four-stage IMEX method (J. S. Whitaker and S. K. Kar, "
        "Monthly Weather Review 141 (2013) 3426–3434), for problems with fast and "
        "slow waves. Second order for nonlinear problems (its explicit half is third "
        "order only for linear ones; checked against the order conditions), with an "
        "embedded error estimate for adaptive steps and third-order Hermite dense "
        "output. Its implicit diagonal entries differ, so the stage Jacobian is "
        "factorised at every implicit stage." + _ARGUMENTS
    )
    calculate_jacobian: ClassVar[CalculateJacobian] = CalculateJacobian.every_stage
    tableau: ClassVar[MultiButcherTableau] = MultiButcherTableau(
        *imco.IMEX_TABLEAUS["Sil3"]
    )
    interpolation_cls: ClassVar[Callable[..., Any]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        return 2
