"""Runge–Kutta methods defined by subclassing `AbstractRungeKutta` directly, as
Diffrax's documentation allows (a `tableau` and `calculate_jacobian`, no engine
class): the same subclass, written against either library, takes the same steps to
the same values."""

from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffeqx

diffrax = pytest.importorskip("diffrax")

LIBS = {"diffeqx": diffeqx, "diffrax": diffrax}


def _method(lib, make_tableau, *, implicit=False, seen_k=None):
    """A direct subclass of `lib.AbstractRungeKutta` running `make_tableau(lib)`, whose
    dense output records the structure of the `k` it is given."""

    class Method(lib.AbstractRungeKutta):
        tableau: ClassVar[Any] = make_tableau(lib)
        calculate_jacobian: ClassVar[Any] = (
            lib.CalculateJacobian.second_stage
            if implicit
            else lib.CalculateJacobian.never
        )
        if implicit:
            root_finder: Any = optx.Newton(rtol=1e-10, atol=1e-10)
            root_find_max_steps: int = 10

        @staticmethod
        def interpolation_cls(*, t0, t1, y0, y1, k):
            if seen_k is not None:
                seen_k.append(
                    tuple(x.shape for x in k) if isinstance(k, tuple) else k.shape
                )
            return lib.LocalLinearInterpolation(t0=t0, t1=t1, y0=y0, y1=y1)

        def order(self, terms):
            return 5

    return Method


def _dopri5(lib):
    return lib.Dopri5.tableau


def _two_dopri5(lib):
    return lib.MultiButcherTableau(lib.Dopri5.tableau, lib.Dopri5.tableau)


def _dopri5_kvaerno5(lib):
    # Different nodes: each term is evaluated at its own tableau's stage times.
    return lib.MultiButcherTableau(lib.Dopri5.tableau, lib.Kvaerno5.tableau)


def _solve(lib, tableau, *, implicit=False, seen_k=None, multi=True, steps=True):
    method = _method(lib, tableau, implicit=implicit, seen_k=seen_k)
    if multi:
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: jnp.sin(t) * y[::-1]),
            lib.ODETerm(lambda t, y, args: -2.0 * y),
        )
    else:
        terms = lib.ODETerm(lambda t, y, args: jnp.sin(t) * y[::-1] - 2.0 * y)
    sol = lib.diffeqsolve(
        terms,
        method(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0, 0.5]),
        saveat=lib.SaveAt(ts=jnp.linspace(0.0, 2.0, 5), steps=steps),
        stepsize_controller=lib.PIDController(rtol=1e-7, atol=1e-7),
    )
    return method, sol


def _assert_same(ours, theirs, rtol):
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    for a, b in zip(ours.ts, theirs.ts, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol)
    for a, b in zip(ours.ys, theirs.ys, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-14)


@pytest.mark.parametrize(
    "tableau, implicit, multi",
    [
        (_dopri5, False, False),
        (_two_dopri5, False, True),
        pytest.param(_dopri5_kvaerno5, True, True, marks=pytest.mark.slow),
    ],
    ids=["explicit", "two explicit", "explicit and implicit, different nodes"],
)
def test_a_direct_subclass_takes_diffraxs_steps(tableau, implicit, multi):
    seen = {name: [] for name in LIBS}
    results = {
        name: _solve(lib, tableau, implicit=implicit, seen_k=seen[name], multi=multi)
        for name, lib in LIBS.items()
    }
    (ours_cls, ours), (theirs_cls, theirs) = results["diffeqx"], results["diffrax"]
    assert diffeqx.is_successful(ours.result)
    # Several tableaus: the stages are sums of one product per tableau, which the
    # libraries round differently in the last bits (docs/migration.md, "Values to
    # the last digits"), moving step times by about 1e-12.
    _assert_same(ours, theirs, rtol=1e-9 if multi else 1e-12)
    # The term structure follows from the tableau; a multi-tableau method's dense
    # output gets each term's stage increments.
    parts = len(getattr(ours_cls.tableau, "tableaus", ()))
    assert (parts == 0) == (ours_cls.term_structure is diffeqx.AbstractTerm)
    assert (parts == 0) == (theirs_cls.term_structure is diffrax.AbstractTerm)
    assert seen["diffeqx"][0] == seen["diffrax"][0]


def test_two_copies_of_a_tableau_solve_as_the_method_itself():
    # The sum of the two terms through one Dopri5 tableau each: Dopri5 on the sum
    # (compared at `t1`: the saves in between come from each method's own
    # interpolation).
    _, sol = _solve(diffeqx, _two_dopri5, steps=False)
    ref = diffeqx.diffeqsolve(
        diffeqx.ODETerm(lambda t, y, args: jnp.sin(t) * y[::-1] - 2.0 * y),
        diffeqx.Dopri5(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0, 0.5]),
        saveat=diffeqx.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
        stepsize_controller=diffeqx.PIDController(rtol=1e-7, atol=1e-7),
    )
    np.testing.assert_allclose(
        np.asarray(sol.ys[-1]), np.asarray(ref.ys[-1]), rtol=1e-12, atol=1e-14
    )


def test_an_implicit_tableau_without_a_root_finder_is_refused():
    class NoRootFinder(diffeqx.AbstractRungeKutta):
        tableau: ClassVar[Any] = diffeqx.Kvaerno3.tableau
        calculate_jacobian: ClassVar[Any] = diffeqx.CalculateJacobian.second_stage
        interpolation_cls: ClassVar[Any] = diffeqx.LocalLinearInterpolation

        def order(self, terms):
            return 3

    with pytest.raises(ValueError, match="NoRootFinder has an implicit tableau.*"):
        diffeqx.diffeqsolve(
            diffeqx.ODETerm(lambda t, y, args: -y),
            NoRootFinder(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
        )


@pytest.mark.parametrize(
    "name", ["Tsit5", pytest.param("KenCarp3", marks=pytest.mark.slow)]
)
def test_a_term_returning_a_python_zero_solves_as_in_diffrax(name):
    # Diffrax's own tests pad an IMEX split with `ODETerm(lambda t, y, args: 0)`;
    # diffeqx failed there under strict dtype promotion.
    sols = {}
    for lib_name, lib in LIBS.items():
        kwargs = {}
        if name == "KenCarp3":
            kwargs["root_finder"] = optx.Newton(rtol=1e-10, atol=1e-10)
        sols[lib_name] = lib.diffeqsolve(
            lib.MultiTerm(
                lib.ODETerm(lambda t, y, args: 0),
                lib.ODETerm(lambda t, y, args: -y),
            ),
            getattr(lib, name)(**kwargs),
            0,
            1,
            0.1,
            jnp.array([1.0, 0.5]),
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
        )
    _assert_same(sols["diffeqx"], sols["diffrax"], rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(sols["diffeqx"].ys[-1]), np.exp(-1.0) * np.array([1.0, 0.5]), 1e-5
    )
