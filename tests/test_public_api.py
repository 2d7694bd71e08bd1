"""The public API: the names Diffrax users import exist, nothing private leaks, concrete
classes are final and abstract ones are not. (Signatures against Diffrax's are in
tests/compat/test_signatures.py.)"""

import inspect

import pytest

import diffeqx

PUBLIC_NAMES = [
    "diffeqsolve",
    "Solution",
    "RESULTS",
    "SaveAt",
    "SubSaveAt",
    "AbstractTerm",
    "ODETerm",
    "MultiTerm",
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "AbstractItoSolver",
    "AbstractStratonovichSolver",
    "AbstractImplicitSolver",
    "AbstractWrappedSolver",
    "AbstractRungeKutta",
    "AbstractERK",
    "ButcherTableau",
    "Euler",
    "Heun",
    "Midpoint",
    "SemiImplicitEuler",
    "LeapfrogMidpoint",
    "Ralston",
    "Bosh3",
    "Tsit5",
    "Dopri5",
    "Dopri8",
    "AbstractStepSizeController",
    "AbstractAdaptiveStepSizeController",
    "ConstantStepSize",
    "StepTo",
    "PIDController",
    "ClipStepSizeController",
    "AbstractAdjoint",
    "RecursiveCheckpointAdjoint",
    "DirectAdjoint",
    "ForwardMode",
    "AbstractPath",
    "DenseInterpolation",
    "LocalLinearInterpolation",
    "ThirdOrderHermitePolynomialInterpolation",
    "FourthOrderPolynomialInterpolation",
    "AbstractGlobalInterpolation",
    "LinearInterpolation",
    "CubicInterpolation",
    "backward_hermite_coefficients",
    "natural_cubic_spline_coefficients",
    "linear_interpolation",
    "rectilinear_interpolation",
    "ControlTerm",
    "WeaklyDiagonalControlTerm",
    "NoProgressMeter",
    "TextProgressMeter",
    "TqdmProgressMeter",
    "AbstractProgressMeter",
    "Event",
    "steady_state_event",
    "is_okay",
    "is_successful",
    "is_event",
]

CONCRETE_CLASSES = [
    "ODETerm",
    "Event",
    "NoProgressMeter",
    "TextProgressMeter",
    "TqdmProgressMeter",
    "MultiTerm",
    "Euler",
    "Heun",
    "Midpoint",
    "Ralston",
    "Bosh3",
    "Tsit5",
    "Dopri5",
    "Dopri8",
    "ConstantStepSize",
    "StepTo",
    "PIDController",
    "ClipStepSizeController",
    "ControlTerm",
    "WeaklyDiagonalControlTerm",
    "LinearInterpolation",
    "CubicInterpolation",
    "ButcherTableau",
    "LocalLinearInterpolation",
    "RESULTS",
]

ABSTRACT_CLASSES = [
    "AbstractTerm",
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "AbstractItoSolver",
    "AbstractStratonovichSolver",
    "AbstractImplicitSolver",
    "AbstractWrappedSolver",
    "FourthOrderPolynomialInterpolation",
    "AbstractRungeKutta",
    "AbstractERK",
    "AbstractStepSizeController",
    "AbstractAdaptiveStepSizeController",
    "AbstractAdjoint",
    "AbstractPath",
    "AbstractGlobalInterpolation",
]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_exists(name):
    assert hasattr(diffeqx, name), f"diffeqx.{name} is missing"


def test_no_private_names_are_exported():
    private = [
        name
        for name in dir(diffeqx)
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert private == [], f"private names visible on diffeqx: {private}"


@pytest.mark.parametrize("name", CONCRETE_CLASSES)
def test_concrete_class_is_final(name):
    cls = getattr(diffeqx, name)
    assert inspect.isclass(cls)
    assert getattr(cls, "__final__", False), f"diffeqx.{name} is not marked final"


@pytest.mark.parametrize("name", ABSTRACT_CLASSES)
def test_abstract_class_is_not_final(name):
    cls = getattr(diffeqx, name)
    assert inspect.isclass(cls)
    assert not getattr(cls, "__final__", False), f"diffeqx.{name} is marked final"


def _is_abstract(cls) -> bool:
    return any(
        getattr(cls, attribute, None)
        for attribute in (
            "__abstractmethods__",
            "__abstractvars__",
            "__abstractclassvars__",
        )
    )


_PUBLIC_CLASSES = sorted(
    name for name in dir(diffeqx) if inspect.isclass(getattr(diffeqx, name))
)


@pytest.mark.parametrize("name", _PUBLIC_CLASSES)
def test_every_public_class_is_final_exactly_when_it_is_concrete(name):
    # Walks the whole public API: users subclass the abstract bases (which have
    # abstract methods or attributes), never a concrete class.
    cls = getattr(diffeqx, name)
    is_final = getattr(cls, "__final__", False)
    assert is_final != _is_abstract(cls), (
        f"diffeqx.{name}: final={is_final}, abstract={_is_abstract(cls)}"
    )


def test_the_walk_covers_the_listed_classes():
    assert set(CONCRETE_CLASSES) | set(ABSTRACT_CLASSES) <= set(_PUBLIC_CLASSES)
