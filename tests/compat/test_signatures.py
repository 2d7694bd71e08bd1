"""Every public name that both diffeqx and Diffrax export has Diffrax's signature:
the same parameters, in the same order, of the same kinds, with the same defaults, so
that a call written for Diffrax binds the same way. diffeqx may add parameters after
Diffrax's, each listed below with the extension it documents."""

import dataclasses
import inspect
import sys

import numpy as np
import pytest

import diffeqx

diffrax = pytest.importorskip("diffrax")


# (name, parameter) -> why diffeqx has it. Each comes after Diffrax's parameters and
# has a default, so no Diffrax call binds differently.
EXTENSIONS = {
    ("Event", "terminate"): (
        "non-terminating events that record crossings, at most one per step (docs/events.md)"
    ),
    ("Event", "max_events"): "how many crossings a non-terminating event records",
    ("Solution", "event_ts"): "times of the crossings a non-terminating event records",
    ("Solution", "event_ys"): "states at those crossings",
    (
        "VeryChord",
        "tags",
    ): "lineax structure tags of the stage Jacobian (docs/stiff.md)",
    **{
        (name, "reuse_jacobian"): (
            "one factorised stage matrix kept across steps (docs/stiff.md)"
        )
        for name in (
            "Kvaerno3",
            "Kvaerno4",
            "Kvaerno5",
            "KenCarp3",
            "KenCarp4",
            "KenCarp5",
        )
    },
    **{
        (name, "scan_stages"): (
            "stages in a loop or unrolled (docs/performance.md, docs/migration.md)"
        )
        for name in (
            "AbstractERK",
            "Bosh3",
            "Dopri5",
            "Dopri8",
            "Heun",
            "Midpoint",
            "Ralston",
            "Tsit5",
        )
    },
    **{
        (name, "scan_stages"): (
            "the two gradient evaluations of a step in a loop (docs/migration.md)"
        )
        for name in ("ShOULD", "QUICSORT")
    },
}


def _public(module) -> set[str]:
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    }


COMMON = sorted(_public(diffrax) & _public(diffeqx))


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _factory_default(owner, name):
    """The value a dataclass field's `default_factory` makes (shown by `inspect` as
    `<factory>`)."""
    if dataclasses.is_dataclass(owner):
        for field in dataclasses.fields(owner):
            if field.name == name and field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
    return inspect.Parameter.empty


def _same_value(ours, theirs, depth=0) -> bool:
    if isinstance(theirs, (type(None), bool, int, float, complex, str)):
        return type(ours) in (type(None), bool, int, float, complex, str) and (
            ours == theirs
        )
    if isinstance(theirs, (tuple, list, frozenset, set)):
        return type(ours) is type(theirs) and (
            len(ours) == len(theirs)
            and all(
                _same_value(a, b, depth + 1)
                for a, b in zip(
                    sorted(ours, key=repr), sorted(theirs, key=repr), strict=True
                )
            )
        )
    if "stepsize_controller" in repr(theirs):
        # A root finder's tolerance taken from the step-size controller
        # (`with_stepsize_controller_tols`): each library has its own marker.
        return "stepsize_controller" in repr(ours)
    if isinstance(theirs, type):
        # A default class (e.g. `levy_area=BrownianIncrement`): the same class name.
        return isinstance(ours, type) and ours.__name__ == theirs.__name__
    if inspect.isfunction(theirs) or inspect.isbuiltin(theirs):
        # A default function (e.g. `rms_norm`, `save_y`): the same function by name.
        return callable(ours) and ours.__name__ == theirs.__name__
    # An object default (e.g. `SaveAt(t1=True)`, `ConstantStepSize()`): the same class
    # name, and the same values of the fields both have.
    if type(ours).__name__ != type(theirs).__name__ or depth > 4:
        return type(ours).__name__ == type(theirs).__name__
    if dataclasses.is_dataclass(theirs) and dataclasses.is_dataclass(ours):
        ours_fields = {f.name for f in dataclasses.fields(ours)}
        return all(
            _same_value(getattr(ours, f.name), getattr(theirs, f.name), depth + 1)
            for f in dataclasses.fields(theirs)
            if f.name in ours_fields and not f.name.startswith("_")
        )
    return True


def _describe(param) -> str:
    default = "" if param.default is inspect.Parameter.empty else f"={param.default!r}"
    return f"{param.name} ({param.kind.description}){default}"


def signature_differences(name, ours_obj, theirs_obj) -> list[str]:
    ours_sig, theirs_sig = _signature(ours_obj), _signature(theirs_obj)
    if theirs_sig is None:
        return [] if ours_sig is None else [f"Diffrax's {name} has no signature"]
    if ours_sig is None:
        return [f"diffeqx's {name} has no signature, Diffrax's is {theirs_sig}"]
    # Diffrax's private parameters (e.g. `_callback_on_reject`) are not API.
    theirs = [p for p in theirs_sig.parameters.values() if not p.name.startswith("_")]
    ours = list(ours_sig.parameters.values())
    problems = []
    for i, param in enumerate(theirs):
        if i >= len(ours):
            problems.append(f"missing {_describe(param)}")
            continue
        mine = ours[i]
        if mine.name != param.name or mine.kind != param.kind:
            problems.append(
                f"parameter {i}: diffeqx has {_describe(mine)}, Diffrax has "
                f"{_describe(param)}"
            )
            continue
        theirs_default = param.default
        if theirs_default is dataclasses._HAS_DEFAULT_FACTORY:  # type: ignore[attr-defined]
            theirs_default = _factory_default(theirs_obj, param.name)
        ours_default = mine.default
        if ours_default is dataclasses._HAS_DEFAULT_FACTORY:  # type: ignore[attr-defined]
            ours_default = _factory_default(ours_obj, mine.name)
        empty = inspect.Parameter.empty
        if (ours_default is empty) != (theirs_default is empty) or (
            theirs_default is not empty
            and not _same_value(ours_default, theirs_default)
        ):
            problems.append(
                f"default of {param.name}: diffeqx {ours_default!r}, Diffrax "
                f"{theirs_default!r}"
            )
    for param in ours[len(theirs) :]:
        if (name, param.name) not in EXTENSIONS:
            problems.append(f"undocumented extra parameter {_describe(param)}")
        elif param.default is inspect.Parameter.empty and param.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            problems.append(f"extension {param.name} has no default")
    return problems


def test_there_are_common_names_to_compare():
    assert len(COMMON) >= 57, COMMON


@pytest.mark.parametrize("name", COMMON)
def test_signature_matches_diffrax(name):
    problems = signature_differences(
        name, getattr(diffeqx, name), getattr(diffrax, name)
    )
    assert not problems, f"{name}: " + "; ".join(problems)


def test_every_extension_is_a_real_parameter():
    for name, parameter in EXTENSIONS:
        assert parameter in inspect.signature(getattr(diffeqx, name)).parameters


def test_names_diffrax_exports_are_exported_wherever_diffeqx_defines_them():
    wanted = _public(diffrax)
    defined = {
        name
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("diffeqx.")
        for name, obj in vars(module).items()
        if name in wanted
        and getattr(obj, "__module__", None) == module_name
        and (inspect.isclass(obj) or inspect.isfunction(obj))
    }
    missing = sorted(name for name in defined if not hasattr(diffeqx, name))
    assert not missing, f"defined in diffeqx but not exported: {missing}"


# Diffrax's public names that diffeqx does not export (docs/migration.md, "Not
# provided").
NOT_PROVIDED_NAMES: set[str] = set()


def test_every_name_diffrax_exports_is_exported_or_listed_as_not_provided():
    # The deprecated discrete terminating events were missing: code importing them
    # failed on the switch.
    assert _public(diffrax) - _public(diffeqx) == NOT_PROVIDED_NAMES


def test_the_comparison_reports_order_kind_default_and_extra_parameters():
    def theirs(rtol, atol, norm=None, pcoeff=0.0, *, dtmin=None, _private=None):
        pass

    def same(rtol, atol, norm=None, pcoeff=0, *, dtmin=None):
        pass

    def reordered(rtol, atol, pcoeff=0.0, norm=None, *, dtmin=None):
        pass

    def keyword_only(rtol, atol, *, norm=None, pcoeff=0.0, dtmin=None):
        pass

    def other_default(rtol, atol, norm=None, pcoeff=0.5, *, dtmin=None):
        pass

    def extra(rtol, atol, norm=None, pcoeff=0.0, *, dtmin=None, more=1):
        pass

    assert signature_differences("f", same, theirs) == []
    for variant in (reordered, keyword_only, other_default, extra):
        assert signature_differences("f", variant, theirs), variant.__name__


# Diffrax attributes that diffeqx does not provide (docs/migration.md, "Not
# provided").
NOT_PROVIDED_ATTRIBUTES = {
    "term_compatible_contr_kwargs",
    "discrete_terminating_event_occurred",
    # Set by Diffrax's private `_callback_on_reject=` (a testing hook).
    "callback_on_reject",
    # The polynomial coefficients Diffrax's local interpolations store; diffeqx's
    # keep the step's values and slopes instead.
    "coeffs",
}


def _attributes(cls) -> set[str]:
    names = {name for name in dir(cls) if not name.startswith("_")}
    if dataclasses.is_dataclass(cls):
        names |= {
            field.name
            for field in dataclasses.fields(cls)
            if not field.name.startswith("_")
        }
    return names


def test_classes_have_diffrax_public_attributes():
    # Methods, properties and fields: e.g. `ClipStepSizeController.norm` and
    # `LinearInterpolation.ts_size` were missing.
    missing = {}
    for name in sorted(_public(diffrax) & set(dir(diffeqx))):
        theirs, ours = getattr(diffrax, name), getattr(diffeqx, name)
        if not (inspect.isclass(theirs) and inspect.isclass(ours)):
            continue
        ours_attributes = _attributes(ours)
        # Plain classes, whose attributes are set in `__init__`:
        if name == "ButcherTableau":
            ours_attributes |= set(vars(_explicit_tableau(diffeqx)))
        if name == "MultiButcherTableau":
            tableau = _explicit_tableau(diffeqx)
            ours_attributes |= set(vars(diffeqx.MultiButcherTableau(tableau, tableau)))
        gap = _attributes(theirs) - ours_attributes - NOT_PROVIDED_ATTRIBUTES
        if gap:
            missing[name] = sorted(gap)
    assert not missing


def _explicit_tableau(lib):
    return lib.ButcherTableau(
        c=np.asarray([1.0]),
        b_sol=np.asarray([0.5, 0.5]),
        b_error=np.asarray([0.5, -0.5]),
        a_lower=(np.asarray([1.0]),),
    )


def test_butcher_tableaus_report_diffrax_properties():
    # `implicit`, `fsal`, `ssal`, `num_stages` of every solver's tableau (diffeqx
    # had no `ssal`, and called no implicit tableau first-same-as-last).
    def properties(lib):
        out = {}
        for name in sorted(_public(diffrax) & set(dir(diffeqx))):
            solver = getattr(lib, name)
            if not isinstance(
                getattr(solver, "tableau", None), lib.ButcherTableau
            ) and (
                not isinstance(
                    getattr(solver, "tableau", None), lib.MultiButcherTableau
                )
            ):
                continue
            tableau = solver.tableau
            tableaus = getattr(tableau, "tableaus", (tableau,))
            out[name] = [
                (t.implicit, t.fsal, t.ssal, t.num_stages, type(t.fsal))
                for t in tableaus
            ]
        return out

    ours, theirs = properties(diffeqx), properties(diffrax)
    assert len(ours) >= 14 and ours == theirs
    assert _explicit_tableau(diffeqx).ssal == _explicit_tableau(diffrax).ssal
