"""diffeqx: JAX-native solvers for differential equations, with Diffrax's API."""

from ._adjoint.backsolve import (
    BacksolveAdjoint as BacksolveAdjoint,
    adjoint_rms_seminorm as adjoint_rms_seminorm,
)
from ._adjoint.base import AbstractAdjoint as AbstractAdjoint
from ._adjoint.checkpoint import (
    RecursiveCheckpointAdjoint as RecursiveCheckpointAdjoint,
)
from ._adjoint.direct import DirectAdjoint as DirectAdjoint
from ._adjoint.forward import ForwardMode as ForwardMode
from ._adjoint.implicit import ImplicitAdjoint as ImplicitAdjoint
from ._brownian.base import AbstractBrownianPath as AbstractBrownianPath
from ._brownian.levy import (
    AbstractBrownianIncrement as AbstractBrownianIncrement,
    AbstractSpaceTimeLevyArea as AbstractSpaceTimeLevyArea,
    AbstractSpaceTimeTimeLevyArea as AbstractSpaceTimeTimeLevyArea,
    BrownianIncrement as BrownianIncrement,
    SpaceTimeLevyArea as SpaceTimeLevyArea,
    SpaceTimeTimeLevyArea as SpaceTimeTimeLevyArea,
)
from ._brownian.tree import VirtualBrownianTree as VirtualBrownianTree
from ._brownian.unsafe import UnsafeBrownianPath as UnsafeBrownianPath
from ._citation import citation as citation, citation_rules as citation_rules
from ._control_term import (
    ControlTerm as ControlTerm,
    WeaklyDiagonalControlTerm as WeaklyDiagonalControlTerm,
)
from ._controller.base import (
    AbstractAdaptiveStepSizeController as AbstractAdaptiveStepSizeController,
    AbstractStepSizeController as AbstractStepSizeController,
)
from ._controller.clip import ClipStepSizeController as ClipStepSizeController
from ._controller.constant import ConstantStepSize as ConstantStepSize, StepTo as StepTo
from ._controller.pid import PIDController as PIDController
from ._event import (
    AbstractDiscreteTerminatingEvent as AbstractDiscreteTerminatingEvent,
    DiscreteTerminatingEvent as DiscreteTerminatingEvent,
    Event as Event,
    SteadyStateEvent as SteadyStateEvent,
    steady_state_event as steady_state_event,
)
from ._langevin import (
    UnderdampedLangevinDiffusionTerm as UnderdampedLangevinDiffusionTerm,
    UnderdampedLangevinDriftTerm as UnderdampedLangevinDriftTerm,
)
from ._path.base import AbstractPath as AbstractPath
from ._path.cubic import CubicInterpolation as CubicInterpolation
from ._path.dense import DenseInterpolation as DenseInterpolation
from ._path.global_ import AbstractGlobalInterpolation as AbstractGlobalInterpolation
from ._path.linear import LinearInterpolation as LinearInterpolation
from ._path.local import (
    AbstractLocalInterpolation as AbstractLocalInterpolation,
    FourthOrderPolynomialInterpolation as FourthOrderPolynomialInterpolation,
    LocalLinearInterpolation as LocalLinearInterpolation,
    ThirdOrderHermitePolynomialInterpolation as ThirdOrderHermitePolynomialInterpolation,
)
from ._path.missing import (
    linear_interpolation as linear_interpolation,
    rectilinear_interpolation as rectilinear_interpolation,
)
from ._path.spline import (
    backward_hermite_coefficients as backward_hermite_coefficients,
    natural_cubic_spline_coefficients as natural_cubic_spline_coefficients,
)
from ._progress import (
    AbstractProgressMeter as AbstractProgressMeter,
    NoProgressMeter as NoProgressMeter,
    TextProgressMeter as TextProgressMeter,
    TqdmProgressMeter as TqdmProgressMeter,
)
from ._root_finder import (
    VeryChord as VeryChord,
    with_stepsize_controller_tols as with_stepsize_controller_tols,
)
from ._saveat import SaveAt as SaveAt, SubSaveAt as SubSaveAt
from ._solution import (
    RESULTS as RESULTS,
    Solution as Solution,
    is_event as is_event,
    is_okay as is_okay,
    is_successful as is_successful,
)
from ._solve.diffeqsolve import diffeqsolve as diffeqsolve
from ._solver.base import (
    AbstractAdaptiveSolver as AbstractAdaptiveSolver,
    AbstractImplicitSolver as AbstractImplicitSolver,
    AbstractItoSolver as AbstractItoSolver,
    AbstractSolver as AbstractSolver,
    AbstractStratonovichSolver as AbstractStratonovichSolver,
    AbstractWrappedSolver as AbstractWrappedSolver,
)
from ._solver.explicit import (
    Bosh3 as Bosh3,
    Dopri5 as Dopri5,
    Dopri8 as Dopri8,
    Euler as Euler,
    Heun as Heun,
    Midpoint as Midpoint,
    Ralston as Ralston,
    Tsit5 as Tsit5,
)
from ._solver.imex import (
    KenCarp3 as KenCarp3,
    KenCarp4 as KenCarp4,
    KenCarp5 as KenCarp5,
    Sil3 as Sil3,
)
from ._solver.implicit import (
    AbstractDIRK as AbstractDIRK,
    AbstractESDIRK as AbstractESDIRK,
    AbstractSDIRK as AbstractSDIRK,
    ImplicitEuler as ImplicitEuler,
    Kvaerno3 as Kvaerno3,
    Kvaerno4 as Kvaerno4,
    Kvaerno5 as Kvaerno5,
)
from ._solver.langevin import (
    ALIGN as ALIGN,
    QUICSORT as QUICSORT,
    AbstractFosterLangevinSRK as AbstractFosterLangevinSRK,
    ShOULD as ShOULD,
)
from ._solver.partitioned import (
    LeapfrogMidpoint as LeapfrogMidpoint,
    SemiImplicitEuler as SemiImplicitEuler,
)
from ._solver.rosenbrock import (
    Rodas4 as Rodas4,
    Rodas5P as Rodas5P,
    Rosenbrock23 as Rosenbrock23,
)
from ._solver.runge_kutta import (
    AbstractERK as AbstractERK,
    AbstractRungeKutta as AbstractRungeKutta,
    ButcherTableau as ButcherTableau,
    CalculateJacobian as CalculateJacobian,
    MultiButcherTableau as MultiButcherTableau,
)
from ._solver.sde import (
    EulerHeun as EulerHeun,
    HalfSolver as HalfSolver,
    ItoMilstein as ItoMilstein,
    ReversibleHeun as ReversibleHeun,
    StratonovichMilstein as StratonovichMilstein,
)
from ._solver.srk import (
    SEA as SEA,
    SRA1 as SRA1,
    AbstractSRK as AbstractSRK,
    GeneralShARK as GeneralShARK,
    ShARK as ShARK,
    SlowRK as SlowRK,
    SPaRK as SPaRK,
    StochasticButcherTableau as StochasticButcherTableau,
)
from ._term import (
    AbstractTerm as AbstractTerm,
    MultiTerm as MultiTerm,
    ODETerm as ODETerm,
)

__version__ = "0.1.0"


_PUBLIC_NAMES = sorted(name for name in dir() if not name.startswith("_"))


def __dir__():
    # Only the public API: submodules imported above are implementation details.
    return _PUBLIC_NAMES + ["__version__"]
