"""`citation` prints well-formed BibTeX with the references of what a solve uses, and
takes `diffeqsolve`'s arguments as `diffeqsolve` does."""

import inspect
import re

import jax
import pytest

import diffeqx as dfx


def _printed(capsys, *args, **kwargs):
    dfx.citation(*args, **kwargs)
    return capsys.readouterr().out


def _entries(text):
    """`{key: body}` of the BibTeX entries in `text`, checking each is balanced."""
    entries = {}
    for match in re.finditer(r"^@(\w+)\{([^,\s]+),", text, re.M):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        body = text[match.start() : i]
        assert re.search(r"\btitle = \{", body), body
        assert re.search(r"\byear = \{\d{4}\}", body), body
        assert match.group(2) not in entries, match.group(2)
        entries[match.group(2)] = body
    return entries


def test_a_solve_lists_its_solver_controller_and_adjoint(capsys):
    text = _printed(
        capsys,
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        0.0,
        1.0,
        None,
        1.0,
        stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6, pcoeff=0.3),
        adjoint=dfx.BacksolveAdjoint(
            stepsize_controller=dfx.PIDController(
                rtol=1e-3, atol=1e-6, norm=dfx.adjoint_rms_seminorm
            )
        ),
    )
    entries = _entries(text)
    assert set(entries) == {
        "jax2018",
        "equinox2021",
        "tsitouras2011",
        "soderlind2002",
        "soderlind2003",
        "chen2018",
        "kidger2021seminorm",
    }
    assert "Tsitouras" in text and text.count("@article{tsitouras2011,") == 1
    # Every entry is introduced by a comment saying what it is for.
    for key in entries:
        before = text[: text.index("{" + key + ",")].rstrip().splitlines()
        assert any(line.startswith("% ") for line in before[-12:])


def test_an_sde_with_a_virtual_brownian_tree(capsys):
    bm = dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (), key=jax.random.key(0))
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: -y), dfx.ControlTerm(lambda t, y, args: y, bm)
    )
    entries = _entries(
        _printed(
            capsys,
            terms=terms,
            solver=dfx.HalfSolver(dfx.Euler()),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6),
        )
    )
    # Euler on an SDE is Euler--Maruyama; step doubling and the integral controller
    # share the textbook, printed once.
    assert {"kloeden1992", "li2020", "foster2020thesis", "hairer1993nonstiff"} <= set(
        entries
    )
    ode = _entries(_printed(capsys, dfx.ODETerm(lambda t, y, args: -y), dfx.Euler()))
    assert "kloeden1992" not in ode and "hairer1993nonstiff" in ode


def test_langevin_terms_and_controlled_paths(capsys):
    bm = dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (2,), key=jax.random.key(0))
    terms = dfx.MultiTerm(
        dfx.UnderdampedLangevinDriftTerm(1.0, 1.0, lambda x: x),
        dfx.UnderdampedLangevinDiffusionTerm(1.0, 1.0, bm),
    )
    langevin = _entries(_printed(capsys, terms, dfx.QUICSORT(0.1)))
    assert {"foster2021shifted", "chada2024", "li2020"} <= set(langevin)
    ts = jax.numpy.linspace(0.0, 1.0, 5)
    path = dfx.LinearInterpolation(ts, jax.numpy.ones((5, 2)))
    cde = dfx.ControlTerm(lambda t, y, args: jax.numpy.eye(2), path)
    assert "kidger2020ncde" in _entries(_printed(capsys, cde, dfx.Heun()))


def test_implicit_solvers_cite_optimistix_and_lineax(capsys):
    assert {"kvaerno2004", "optimistix2024", "lineax2023"} <= set(
        _entries(_printed(capsys, solver=dfx.Kvaerno5()))
    )
    rosenbrock = _entries(_printed(capsys, solver=dfx.Rodas5P()))
    assert "steinebach2023" in rosenbrock and "lineax2023" in rosenbrock
    assert "optimistix2024" not in rosenbrock


def _solver_classes():
    return sorted(
        name
        for name in dir(dfx)
        if inspect.isclass(getattr(dfx, name))
        and issubclass(getattr(dfx, name), dfx.AbstractSolver)
        and not inspect.isabstract(getattr(dfx, name))
        and not name.startswith("Abstract")
    )


@pytest.mark.parametrize("name", _solver_classes())
def test_every_solver_has_a_reference(capsys, name):
    cls = getattr(dfx, name)
    if name == "HalfSolver":
        solver = cls(dfx.Heun())
    elif name in ("ALIGN", "ShOULD", "QUICSORT"):
        solver = cls(0.1)
    else:
        solver = cls()
    text = _printed(capsys, solver=solver)
    assert "No reference is known" not in text
    assert len(_entries(text)) >= 3  # JAX, Equinox and the method


def test_a_solver_of_your_own_gets_a_note(capsys):
    class Mine(dfx.AbstractSolver):
        term_structure = dfx.AbstractTerm
        interpolation_cls = dfx.LocalLinearInterpolation

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            raise NotImplementedError

        def func(self, terms, t0, y0, args):
            return terms.vf(t0, y0, args)

    text = _printed(capsys, solver=Mine())
    assert "No reference is known for the solver Mine" in text
    assert set(_entries(text)) == {"jax2018", "equinox2021"}


def test_arguments_bind_as_in_diffeqsolve():
    with pytest.raises(TypeError, match="citation.*diffeqsolve.*rtol"):
        dfx.citation(rtol=1e-3)
    with pytest.raises(TypeError, match="citation.*diffeqsolve"):
        dfx.citation(*range(20))


@pytest.fixture
def rules():
    """`dfx.citation_rules`, restored after the test."""
    saved = list(dfx.citation_rules)
    yield dfx.citation_rules
    dfx.citation_rules[:] = saved


def test_an_appended_rule_gets_the_arguments_it_names(capsys, rules):
    calls = []

    def mine(solver, terms, dt0=None):
        calls.append((solver, terms, dt0))
        return (
            "% Our own solver:\n@misc{ours2026,\n  title = {Ours},\n  year = {2026}\n}"
        )

    rules.append(mine)
    term = dfx.ODETerm(lambda t, y, args: -y)
    # `terms` and `solver` given positionally, bound as `diffeqsolve` binds them.
    text = _printed(capsys, term, dfx.Euler(), 0.0, 1.0)
    assert calls == [(dfx.Euler(), term, None)]
    assert text.index("% Our own solver:") > text.index("equinox2021")
    assert "ours2026" in _entries(text)
    # A required parameter not given: the rule is skipped.
    calls.clear()
    _printed(capsys, solver=dfx.Euler())
    assert calls == []


def test_a_rule_taking_keywords_gets_every_argument_given(capsys, rules):
    seen = []
    rules[:] = [lambda **kwargs: seen.append(kwargs)]
    text = _printed(capsys, solver=dfx.Tsit5(), dt0=None, max_steps=7)
    assert seen == [dict(solver=dfx.Tsit5(), dt0=None, max_steps=7)]
    # Every rule returned None: only the header and footer.
    assert _entries(text) == {}


def test_a_reference_printed_before_is_referred_to(capsys, rules):
    rules.append(lambda: "% Built on JAX:\n@software{jax2018,\n  title = {JAX}\n}")
    text = _printed(capsys)
    assert text.count("@software{jax2018,") == 1
    assert "% Built on JAX:\n% (see jax2018 above)" in text


def test_a_rule_must_return_text_or_none(rules):
    def bad(solver):
        return 5

    rules.append(bad)
    with pytest.raises(TypeError, match="citation rule.*bad.*returned int 5"):
        dfx.citation(solver=dfx.Euler())
