"""The solver protocol against Diffrax's: the same class relationships, result codes,
term structures (and the same refusals), the same deprecation warnings, and user
solvers that give the same steps in both libraries."""

import typing
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from jaxtyping import Array, Float

import diffeqx
from _user_solvers import heun_euler

diffrax = pytest.importorskip("diffrax")

LIBS = {"diffeqx": diffeqx, "diffrax": diffrax}

BASES = [
    "AbstractSolver",
    "AbstractAdaptiveSolver",
    "AbstractItoSolver",
    "AbstractStratonovichSolver",
    "AbstractImplicitSolver",
    "AbstractWrappedSolver",
    "AbstractRungeKutta",
    "AbstractERK",
]
SOLVERS = ["Euler", "Heun", "Midpoint", "Ralston", "Bosh3", "Tsit5", "Dopri5", "Dopri8"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_has_diffrax_class_relationships(solver):
    ours = {b: issubclass(getattr(diffeqx, solver), getattr(diffeqx, b)) for b in BASES}
    theirs = {
        b: issubclass(getattr(diffrax, solver), getattr(diffrax, b)) for b in BASES
    }
    assert ours == theirs


def test_euler_is_an_ito_solver_and_not_adaptive():
    assert isinstance(diffeqx.Euler(), diffeqx.AbstractItoSolver)
    assert not isinstance(diffeqx.Euler(), diffeqx.AbstractAdaptiveSolver)
    assert diffeqx.Euler().strong_order(None) == diffrax.Euler().strong_order(None)


def _user_wrapper(lib):
    class Wrapper(lib.AbstractWrappedSolver):
        solver: Any

        @property
        def term_structure(self):
            return self.solver.term_structure

        @property
        def interpolation_cls(self):
            return self.solver.interpolation_cls

        def order(self, terms):
            return self.solver.order(terms)

        def init(self, terms, t0, t1, y0, args):
            return self.solver.init(terms, t0, t1, y0, args)

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            return self.solver.step(terms, t0, t1, y0, args, solver_state, made_jump)

        def func(self, terms, t0, y0, args):
            return self.solver.func(terms, t0, y0, args)

    return Wrapper


WRAPPED = {
    "HalfSolver(Euler)": lambda lib: lib.HalfSolver(lib.Euler()),
    "HalfSolver(Tsit5)": lambda lib: lib.HalfSolver(lib.Tsit5()),
    "HalfSolver(HalfSolver(Euler))": lambda lib: lib.HalfSolver(
        lib.HalfSolver(lib.Euler())
    ),
    "HalfSolver(EulerHeun)": lambda lib: lib.HalfSolver(lib.EulerHeun()),
    "HalfSolver(Kvaerno3)": lambda lib: lib.HalfSolver(lib.Kvaerno3()),
    "user wrapper of Heun": lambda lib: _user_wrapper(lib)(lib.Heun()),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_a_wrapped_solver_is_an_instance_of_what_it_wraps_as_in_diffrax(name):
    # Diffrax counts a wrapped solver as an instance of the wrapped solver's classes
    # (one level deep): code testing `isinstance(solver, AbstractItoSolver)` on a
    # `HalfSolver` gets the same answer in both libraries.
    classes = BASES + SOLVERS + ["EulerHeun", "Kvaerno3", "HalfSolver"]
    answers = {}
    for lib_name, lib in LIBS.items():
        solver = WRAPPED[name](lib)
        answers[lib_name] = {c: isinstance(solver, getattr(lib, c)) for c in classes}
        assert not issubclass(type(solver), lib.Euler)
    assert answers["diffeqx"] == answers["diffrax"]


def test_wrapped_euler_still_solves_an_sde_adaptively():
    # diffeqx refuses adaptive steps for `Euler` on an SDE; `HalfSolver(Euler())`,
    # which counts as an instance of `Euler`, is not refused.
    path = diffeqx.VirtualBrownianTree(0.0, 1.0, 1e-3, (), jax.random.key(0))
    terms = diffeqx.MultiTerm(
        diffeqx.ODETerm(lambda t, y, args: -y),
        diffeqx.ControlTerm(lambda t, y, args: 0.1 * y, path),
    )
    sol = diffeqx.diffeqsolve(
        terms,
        diffeqx.HalfSolver(diffeqx.Euler()),
        0.0,
        1.0,
        0.1,
        jnp.array(1.0),
        stepsize_controller=diffeqx.PIDController(rtol=1e-2, atol=1e-2),
    )
    assert diffeqx.is_successful(sol.result)
    assert int(sol.stats["num_steps"]) > 1


def _names(enum) -> list[str]:
    return list(enum._name_to_item)


def test_results_has_every_diffrax_code_at_the_same_index():
    ours, theirs = _names(diffeqx.RESULTS), _names(diffrax.RESULTS)
    assert ours[: len(theirs)] == theirs
    assert {"non_finite_state", "dt0_wrong_sign"} <= set(ours)


@pytest.mark.parametrize(
    "name",
    ["max_steps_reached", "dt_min_reached", "event_occurred", "max_steps_rejected"],
)
def test_results_messages_open_with_diffrax_s_first_sentence(name):
    # Error text matched against Diffrax's messages (`pytest.raises(match=...)`,
    # string checks on `throw=True` errors) matches diffeqx's, which then go on to
    # say what to try. (`internal_error` names the library it occurred in.)
    theirs = diffrax.RESULTS[getattr(diffrax.RESULTS, name)]
    ours = diffeqx.RESULTS[getattr(diffeqx.RESULTS, name)]
    first_sentence = theirs.split(". ")[0]
    assert ours.startswith(first_sentence), (ours, theirs)


@pytest.mark.parametrize("name", _names(optx.RESULTS))
def test_optimistix_result_promotes_into_results(name):
    promoted = diffeqx.RESULTS.promote(getattr(optx.RESULTS, name))
    assert bool(promoted == getattr(diffeqx.RESULTS, name))
    jitted = jax.jit(diffeqx.RESULTS.promote)(getattr(optx.RESULTS, name))
    assert bool(jitted == getattr(diffeqx.RESULTS, name))


def _failing_solver(lib):
    class FailsAfterHalf(lib.AbstractSolver):
        """Euler whose steps past t = 0.5 report a diverged nonlinear solve."""

        term_structure: ClassVar = lib.AbstractTerm
        interpolation_cls: ClassVar = lib.LocalLinearInterpolation

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            y1 = y0 + (t1 - t0) * terms.vf(t0, y0, args)
            failed = lib.RESULTS.promote(optx.RESULTS.nonlinear_divergence)
            result = lib.RESULTS.where(t1 > 0.55, failed, lib.RESULTS.successful)
            return y1, None, dict(y0=y0, y1=y1), None, result

        def func(self, terms, t0, y0, args):
            return terms.vf(t0, y0, args)

    return FailsAfterHalf()


@pytest.mark.parametrize("lib", ["diffeqx", "diffrax"])
def test_promoted_solver_failure_ends_the_solve_with_its_code(lib):
    dfx = LIBS[lib]
    term = dfx.ODETerm(lambda t, y, args: -y)
    sol = dfx.diffeqsolve(
        term, _failing_solver(dfx), 0.0, 1.0, 0.1, jnp.array(1.0), throw=False
    )
    assert bool(sol.result == dfx.RESULTS.nonlinear_divergence)
    with pytest.raises(Exception, match="Nonlinear solve diverged"):
        dfx.diffeqsolve(term, _failing_solver(dfx), 0.0, 1.0, 0.1, jnp.array(1.0))


def _split_solver(lib, structure):
    class SplitEuler(lib.AbstractSolver):
        """Euler on a MultiTerm, taking its parts apart as an IMEX or SDE solver
        does: `terms.terms[0]` and `terms.terms[1]` separately."""

        term_structure: ClassVar = structure
        interpolation_cls: ClassVar = lib.LocalLinearInterpolation

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            first, second = terms.terms
            dy0 = first.vf_prod(t0, y0, args, first.contr(t0, t1))
            y_mid = y0 + dy0
            y1 = y_mid + second.vf_prod(t1, y_mid, args, second.contr(t0, t1))
            return y1, None, dict(y0=y0, y1=y1), None, lib.RESULTS.successful

        def func(self, terms, t0, y0, args):
            return terms.vf(t0, y0, args)

    return SplitEuler()


def _split_terms(lib):
    ts = jnp.linspace(-1.0, 1.0, 9)
    control = lib.LinearInterpolation(ts, jnp.stack([ts, ts**2], axis=-1))
    drift = lib.ODETerm(lambda t, y, args: -0.5 * y)
    driven = lib.ControlTerm(
        lambda t, y, args: jnp.stack([y, jnp.sin(t) * y], -1), control
    )
    return lib.MultiTerm(drift, driven)


@pytest.mark.parametrize(
    # Backwards (where the parts' controls are negated) by default.
    "backwards",
    [pytest.param(False, marks=pytest.mark.slow), True],
)
def test_multiterm_parts_reach_the_solver_in_both_time_directions(backwards):
    t0, t1, dt0 = (0.9, -0.7, -0.2) if backwards else (-0.7, 0.9, 0.2)
    results = {}
    for name, lib in LIBS.items():
        structure = lib.MultiTerm[tuple[lib.ODETerm, lib.ControlTerm]]
        sol = lib.diffeqsolve(
            _split_terms(lib),
            _split_solver(lib, structure),
            t0,
            t1,
            dt0,
            jnp.array([1.0, -2.0]),
            saveat=lib.SaveAt(steps=True),
            max_steps=16,
        )
        results[name] = (np.asarray(sol.ts), np.asarray(sol.ys))
    np.testing.assert_allclose(results["diffeqx"][0], results["diffrax"][0], rtol=1e-15)
    np.testing.assert_allclose(results["diffeqx"][1], results["diffrax"][1], rtol=1e-14)


def _structure_cases(lib):
    ode = lib.ODETerm(lambda t, y, args: -y)
    ts = jnp.linspace(0.0, 1.0, 5)
    ctrl = lib.ControlTerm(lambda t, y, args: y, lib.LinearInterpolation(ts, ts))
    MultiTerm, ODETerm, ControlTerm = lib.MultiTerm, lib.ODETerm, lib.ControlTerm
    AbstractTerm = lib.AbstractTerm
    scalar_control = AbstractTerm[Any, Float[Array, ""]]
    vector_control = lib.ControlTerm(
        lambda t, y, args: jnp.stack([y, y], -1),
        lib.LinearInterpolation(ts, jnp.stack([ts, ts], -1)),
    )
    # (id, terms, term_structure, fits, fragments of diffeqx's message)
    return [
        (
            "fits",
            MultiTerm(ode, ctrl),
            MultiTerm[tuple[ODETerm, ControlTerm]],
            True,
            (),
        ),
        (
            "nested-part",
            MultiTerm(ode, ode),
            MultiTerm[tuple[ODETerm, ControlTerm]],
            False,
            ("terms.terms[1]", "expected ControlTerm", "got ODETerm"),
        ),
        (
            "too-many-parts",
            MultiTerm(ode, ctrl, ode),
            MultiTerm[tuple[ODETerm, ControlTerm]],
            False,
            ("expected a MultiTerm of 2 terms", "of 3"),
        ),
        (
            "not-a-multiterm",
            ode,
            MultiTerm[tuple[AbstractTerm, AbstractTerm]],
            False,
            ("at `terms`", "MultiTerm[tuple[AbstractTerm, AbstractTerm]]", "ODETerm"),
        ),
        (
            "tuple-for-single-term",
            (ode, ode),
            AbstractTerm,
            False,
            ("at `terms`", "expected AbstractTerm", "a tuple of 2"),
        ),
        ("scalar-control-fits", ode, scalar_control, True, ()),
        (
            "vector-control-for-scalar",
            vector_control,
            scalar_control,
            False,
            ("control of `terms`", "Float[Array, '']"),
        ),
        (
            "nested-vector-control",
            MultiTerm(ode, vector_control),
            MultiTerm[tuple[scalar_control, AbstractTerm]],
            True,
            (),
        ),
        (
            "nested-control-type",
            MultiTerm(vector_control, ode),
            MultiTerm[tuple[scalar_control, AbstractTerm]],
            False,
            ("terms.terms[0]", "control"),
        ),
    ]


def _solver_for(lib, structure):
    class AnyStructureEuler(lib.AbstractSolver):
        term_structure: ClassVar = structure
        interpolation_cls: ClassVar = lib.LocalLinearInterpolation

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            y1 = y0 + terms.vf_prod(t0, y0, args, terms.contr(t0, t1))
            return y1, None, dict(y0=y0, y1=y1), None, lib.RESULTS.successful

        def func(self, terms, t0, y0, args):
            return terms.vf(t0, y0, args)

    return AnyStructureEuler()


@pytest.mark.parametrize("index", range(len(_structure_cases(diffeqx))))
def test_term_structure_check_agrees_with_diffrax_and_names_the_mismatch(index):
    outcomes = {}
    for name, lib in LIBS.items():
        case_id, terms, structure, fits, fragments = _structure_cases(lib)[index]
        solver = _solver_for(lib, structure)
        try:
            lib.diffeqsolve(terms, solver, 0.0, 1.0, 0.5, jnp.array(1.0))
        except (ValueError, AssertionError) as error:
            # Diffrax refuses a MultiTerm with the wrong number of parts by a failed
            # assertion; diffeqx always with a ValueError.
            if name == "diffeqx":
                assert isinstance(error, ValueError)
            outcomes[name] = str(error)
        else:
            outcomes[name] = None
        if name == "diffeqx":
            expected_fits, expected_fragments = fits, fragments
    assert (outcomes["diffeqx"] is None) == expected_fits, outcomes["diffeqx"]
    assert (outcomes["diffrax"] is None) == expected_fits, outcomes["diffrax"]
    for fragment in expected_fragments:
        assert fragment in outcomes["diffeqx"], (fragment, outcomes["diffeqx"])


def test_subscripted_classes_are_generic_aliases_of_the_classes():
    for lib in LIBS.values():
        for alias, origin in [
            (lib.AbstractPath[Array], lib.AbstractPath),
            (lib.MultiTerm[tuple[lib.ODETerm, lib.ControlTerm]], lib.MultiTerm),
            (lib.AbstractTerm[Array, Array], lib.AbstractTerm),
            (lib.ControlTerm[Array, Array], lib.ControlTerm),
            (lib.ODETerm[Array], lib.ODETerm),
            (lib.AbstractSolver[Any], lib.AbstractSolver),
        ]:
            assert typing.get_origin(alias) is origin


@pytest.mark.parametrize(
    # One tolerance by default (a compilation per tolerance and library).
    "rtol",
    [
        pytest.param(1e-2, marks=pytest.mark.slow),
        1e-3,
        pytest.param(1e-5, marks=pytest.mark.slow),
    ],
)
def test_abstract_solver_with_error_estimate_steps_as_in_diffrax(rtol):
    results = {}
    for name, lib in LIBS.items():
        sol = lib.diffeqsolve(
            lib.ODETerm(lambda t, y, args: -y + jnp.sin(3 * t)),
            heun_euler(lib, base="AbstractSolver", order=1),
            0.0,
            2.0,
            0.1,
            jnp.array([1.0, 0.5]),
            saveat=lib.SaveAt(steps=True),
            stepsize_controller=lib.PIDController(rtol=rtol, atol=rtol),
            max_steps=4096,
        )
        results[name] = sol
    ours, theirs = results["diffeqx"], results["diffrax"]
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    # The same accept/reject decisions; the step sizes agree to the controller's
    # arithmetic (rounding differences in PIDController are the controller's tests').
    np.testing.assert_allclose(ours.ts, theirs.ts, rtol=1e-7)
    np.testing.assert_allclose(ours.ys, theirs.ys, rtol=1e-4)


def _recorded_warnings(fn, messages=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    if messages is not None:
        messages.extend(str(w.message) for w in caught)
    return out, [w.category for w in caught]


def test_weakly_diagonal_control_term_warns_as_in_diffrax_and_solves_the_same():
    ts = jnp.linspace(0.0, 1.0, 11)
    ys = {}
    categories = {}
    messages = {}
    for name, lib in LIBS.items():
        control = lib.LinearInterpolation(ts, jnp.stack([ts, ts**2], -1))
        messages[name] = []
        term, categories[name] = _recorded_warnings(
            lambda lib=lib, control=control: lib.WeaklyDiagonalControlTerm(
                lambda t, y, args: -y, control
            ),
            messages[name],
        )
        sol = lib.diffeqsolve(term, lib.Heun(), 0.0, 1.0, 0.1, jnp.array([1.0, 2.0]))
        ys[name] = np.asarray(sol.ys)
    assert categories["diffeqx"] == categories["diffrax"] == [UserWarning]
    # Code that checks the warning by its opening words (as Diffrax's own
    # test_adjoint.py::test_sde_against does) sees the same.
    opening = "`WeaklyDiagonalControlTerm` is now deprecated"
    assert all(m[0].startswith(opening) for m in messages.values()), messages
    np.testing.assert_allclose(ys["diffeqx"], ys["diffrax"], rtol=1e-14)


def _discrete_event(state, *, args, **kwargs):
    return state.y[0] < args


# The deprecated discrete terminating events, built the same way in both libraries:
# a bare callable of the state, the wrapper class, a user's subclass of the abstract
# class, and the steady-state event (tolerances from the controller, or given).
DISCRETE_EVENTS = {
    "callable": lambda lib: _discrete_event,
    "wrapper": lambda lib: lib.DiscreteTerminatingEvent(_discrete_event),
    "subclass": lambda lib: type(
        "BelowArgs",
        (lib.AbstractDiscreteTerminatingEvent,),
        {"__call__": lambda self, state, **kwargs: _discrete_event(state, **kwargs)},
    )(),
    "steady": lambda lib: lib.SteadyStateEvent(),
    "steady-given": lambda lib: lib.SteadyStateEvent(rtol=1e-3, atol=1e-4),
}


@pytest.mark.parametrize("kind", list(DISCRETE_EVENTS))
def test_discrete_terminating_event_warns_and_stops_as_in_diffrax(kind):
    results = {}
    for name, lib in LIBS.items():
        event = DISCRETE_EVENTS[kind](lib)
        sol, categories = _recorded_warnings(
            lambda lib=lib, event=event: lib.diffeqsolve(
                lib.ODETerm(lambda t, y, args: -y),
                lib.Tsit5(),
                0.0,
                50.0,
                0.1,
                jnp.array([1.0, 3.0]),
                args=0.3,
                saveat=lib.SaveAt(t1=True),
                stepsize_controller=lib.PIDController(rtol=1e-5, atol=1e-7),
                discrete_terminating_event=event,
            )
        )
        assert UserWarning in categories, name
        results[name] = sol
    ours, theirs = results["diffeqx"], results["diffrax"]
    assert bool(ours.result == diffeqx.RESULTS.event_occurred)
    assert bool(theirs.result == diffrax.RESULTS.event_occurred)
    assert float(ours.ts[0]) < 50.0
    np.testing.assert_allclose(ours.ts, theirs.ts, rtol=1e-14)
    np.testing.assert_allclose(ours.ys, theirs.ys, rtol=1e-14)
    assert int(ours.stats["num_steps"]) == int(theirs.stats["num_steps"])


@pytest.mark.parametrize("lib", ["diffeqx", "diffrax"])
def test_abstract_discrete_terminating_event_needs_a_call(lib):
    dfx = LIBS[lib]
    with pytest.raises(TypeError, match="abstract"):
        dfx.AbstractDiscreteTerminatingEvent()


@pytest.mark.parametrize("lib", ["diffeqx", "diffrax"])
def test_event_and_discrete_terminating_event_together_are_refused(lib):
    dfx = LIBS[lib]
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            event=dfx.Event(lambda t, y, args, **kwargs: y < 0.5),
            discrete_terminating_event=_discrete_event,
        )


SCAN_KINDS = [None, "lax", "checkpointed", "bounded"]


def test_scan_kind_is_accepted_with_diffrax_values_and_changes_nothing():
    def solve(solver):
        return diffeqx.diffeqsolve(
            diffeqx.ODETerm(lambda t, y, args: -y + jnp.cos(t)),
            solver,
            0.0,
            1.0,
            0.1,
            jnp.array([1.0, -1.0]),
            saveat=diffeqx.SaveAt(steps=True),
            max_steps=16,
        )

    # Tsit5's stages run unrolled here, Dopri8's in a loop.
    for cls, kinds in [("Tsit5", SCAN_KINDS), ("Dopri8", ["bounded"])]:
        default = solve(getattr(diffeqx, cls)())
        for scan_kind in kinds:
            chosen = solve(getattr(diffeqx, cls)(scan_kind=scan_kind))
            np.testing.assert_array_equal(chosen.ts, default.ts)
            np.testing.assert_array_equal(chosen.ys, default.ys)
    for scan_kind in SCAN_KINDS:
        assert diffrax.Tsit5(scan_kind=scan_kind).scan_kind == scan_kind
        assert diffeqx.Tsit5(scan_kind=scan_kind).scan_kind == scan_kind


def test_scan_kind_outside_diffrax_values_is_refused():
    with pytest.raises(ValueError, match="scan_kind"):
        diffeqx.Tsit5(scan_kind="unrolled")


def test_butcher_tableau_takes_diffrax_positional_arguments():
    arguments = (
        np.array([0.5, 0.5, 1.0]),
        np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]) - np.array([0.0, 0.0, 1.0, 0.0]),
        (np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    finals = {}
    for name, lib in LIBS.items():
        user_tableau = lib.ButcherTableau(*arguments)

        class RK4(lib.AbstractERK):
            tableau: ClassVar = user_tableau
            interpolation_cls: ClassVar = (
                lib.ThirdOrderHermitePolynomialInterpolation.from_k
            )

            def order(self, terms):
                return 4

        sol = lib.diffeqsolve(
            lib.ODETerm(lambda t, y, args: -y * t),
            RK4(),
            0.0,
            1.0,
            0.05,
            jnp.array([1.0, 2.0]),
        )
        finals[name] = np.asarray(sol.ys)
    np.testing.assert_allclose(finals["diffeqx"], finals["diffrax"], rtol=1e-14)


def _every_solver_name():
    return sorted(
        name
        for name in dir(diffrax)
        if isinstance(getattr(diffrax, name), type)
        and issubclass(getattr(diffrax, name), diffrax.AbstractSolver)
        and not name.startswith("Abstract")
    )


def _instance(lib, name):
    cls = getattr(lib, name)
    if name == "HalfSolver":
        return cls(lib.Heun())
    if name in ("ALIGN", "ShOULD", "QUICSORT"):
        return cls(0.1)
    return cls()


def _orders(lib, name, sde):
    vector_field = lambda t, y, args: -y  # noqa: E731
    terms = lib.ODETerm(vector_field)
    if sde:
        bm = lib.VirtualBrownianTree(
            0.0, 1.0, 1e-3, (), key=jax.random.key(0), levy_area=lib.SpaceTimeLevyArea
        )
        terms = lib.MultiTerm(terms, lib.ControlTerm(vector_field, bm))
    solver = _instance(lib, name)
    out = []
    for method in ("order", "strong_order", "error_order"):
        try:
            out.append(getattr(solver, method)(terms))
        except ValueError:  # e.g. an SDE method's `order` on an ODE, in both
            out.append("ValueError")
    return tuple(out)


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_every_solver_reports_diffrax_orders(sde):
    # `order`, `strong_order` and `error_order` (which `PIDController` reads) of every
    # solver both libraries export, on an ODE and on an SDE. (Heun, Midpoint and
    # Ralston had no strong order, so `HalfSolver(Heun())` could not adapt to an
    # SDE, and ImplicitEuler claimed an error order on SDEs: found by
    # tests/compat/sde_sweep.py.)
    names = [name for name in _every_solver_name() if hasattr(diffeqx, name)]
    assert len(names) >= 30
    if not sde:
        # Underdamped-Langevin solvers take only their own (SDE) terms; on an ODE
        # Diffrax's default formula gives `order`, diffeqx's the SDE rule.
        names = [n for n in names if n not in ("ALIGN", "ShOULD", "QUICSORT")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = {name: _orders(diffeqx, name, sde) for name in names}
        theirs = {name: _orders(diffrax, name, sde) for name in names}
    assert ours == theirs


def _per_part_solver(lib, structure):
    """A solver whose terms are a PyTree matching the state's: each term steps its
    own part of the state."""

    class PerPartEuler(lib.AbstractSolver):
        term_structure: ClassVar = structure
        interpolation_cls: ClassVar = lib.LocalLinearInterpolation

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            def part(term, y):
                return y + term.vf_prod(t0, y, args, term.contr(t0, t1))

            is_term = lambda x: isinstance(x, lib.AbstractTerm)  # noqa: E731
            y1 = jax.tree.map(part, terms, y0, is_leaf=is_term)
            return y1, None, dict(y0=y0, y1=y1), None, lib.RESULTS.successful

        def func(self, terms, t0, y0, args):
            raise AssertionError

    return PerPartEuler()


@pytest.mark.parametrize("fits", [True, False])
def test_a_dict_of_terms_is_checked_against_its_own_parts_of_the_state(fits):
    # diffeqx passed the whole state to each term's vector field when checking its
    # declared types, and crashed on a field that reads its own part.
    results = {}
    for name, lib in LIBS.items():
        ode = lib.ODETerm(lambda t, y, args: -y)
        structure = {
            "a": lib.ODETerm,
            "b": lib.ODETerm[Float[Array, " 3"]],
            "c": lib.AbstractTerm[Float[Array, " 4"], Any],
        }
        y0 = {
            "a": jnp.array(1.0),
            "b": jnp.arange(3.0),
            "c": jnp.arange(4.0 if fits else 5.0),
        }
        solver = _per_part_solver(lib, structure)
        terms = {"a": ode, "b": ode, "c": ode}
        if fits:
            sol = lib.diffeqsolve(terms, solver, 0.0, 1.0, 0.25, y0)
            results[name] = jax.tree.map(np.asarray, sol.ys)
        else:
            with pytest.raises(ValueError, match="terms"):
                lib.diffeqsolve(terms, solver, 0.0, 1.0, 0.25, y0)
    if fits:
        for key in ("a", "b", "c"):
            np.testing.assert_array_equal(
                results["diffeqx"][key], results["diffrax"][key]
            )


def _expensive_ode_term(lib):
    class ExpensiveODETerm(lib.ODETerm):
        def is_vf_expensive(self, t0, t1, y, args):
            return True

    return ExpensiveODETerm(lambda t, y, args: -args * y + jnp.sin(t))


@pytest.mark.parametrize("name", ["Tsit5", "Dopri5", "Bosh3", "Kvaerno5", "Sil3"])
def test_is_vf_expensive_turns_off_first_same_as_last_as_in_diffrax(name):
    """A term whose `is_vf_expensive` is True: a first-same-as-last method's `init`
    gives no state and `step` evaluates the first stage afresh (returning no state),
    and a solve gives Diffrax's steps and values. Until 2026-12-08 diffeqx ignored
    the method and its `step` failed with `solver_state=None`."""
    y0 = jnp.array([1.0, 2.0])
    t0, t1 = jnp.asarray(0.3), jnp.asarray(0.5)
    out = {}
    for key, lib in LIBS.items():
        term = _expensive_ode_term(lib)
        if name == "Sil3":
            term = lib.MultiTerm(term, _expensive_ode_term(lib))
        if name in ("Kvaerno5", "Sil3"):
            # Newton: Diffrax's `VeryChord` stops early (docs/migration.md).
            root_finder = optx.Newton(rtol=1e-9, atol=1e-9)
            solver = getattr(lib, name)(root_finder=root_finder)
        else:
            solver = getattr(lib, name)()
        state = solver.init(term, t0, t1, y0, 0.5)
        y1, y_error, _, new_state, result = solver.step(
            term, t0, t1, y0, 0.5, state, made_jump=False
        )
        assert state is None and new_state is None
        assert result == lib.RESULTS.successful
        sol = lib.diffeqsolve(
            term,
            solver,
            0.0,
            3.0,
            0.1,
            y0,
            args=0.5,
            saveat=lib.SaveAt(ts=jnp.linspace(0.0, 3.0, 7)),
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-8),
        )
        out[key] = (y1, y_error, sol.ys, {k: int(v) for k, v in sol.stats.items()})
    ours, theirs = out["diffeqx"], out["diffrax"]
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-10)
    assert ours[3] == theirs[3]


def test_control_term_vector_field_is_not_expensive_as_in_diffrax():
    """Diffrax's `ControlTerm` keeps the default `is_vf_expensive` (False), so
    first-same-as-last methods carry its matrix between steps; so does diffeqx's."""
    for lib in LIBS.values():
        path = lib.LinearInterpolation(jnp.array([0.0, 1.0]), jnp.array([[0.0], [1.0]]))
        term = lib.ControlTerm(lambda t, y, args: jnp.ones((2, 1)), path)
        assert term.is_vf_expensive(0.0, 1.0, jnp.zeros(2), None) is False
        multi = lib.MultiTerm(lib.ODETerm(lambda t, y, args: -y), term)
        assert multi.is_vf_expensive(0.0, 1.0, jnp.zeros(2), None) is False
