"""`citation_rules` against Diffrax's: a rule appended to either library's list is
called with the same arguments, and skipped in the same calls."""

import pytest

import diffeqx

diffrax = pytest.importorskip("diffrax")


@pytest.mark.parametrize(
    "call",
    [
        lambda lib, term: lib.citation(term, lib.Tsit5(), 0.0, 1.0, 0.1),
        lambda lib, term: lib.citation(solver=lib.Euler(), dt0=None),
        lambda lib, term: lib.citation(terms=term, adjoint=lib.DirectAdjoint()),
        lambda lib, term: lib.citation(),
    ],
)
def test_rules_are_called_with_the_same_arguments(capsys, call):
    seen = {}
    for name, lib in {"diffeqx": diffeqx, "diffrax": diffrax}.items():
        calls = []

        def named(solver, dt0=None, _calls=calls):
            _calls.append(("named", type(solver).__name__, dt0))
            return "% named rule"

        def keywords(_calls=calls, **kwargs):
            _calls.append(("keywords", sorted(kwargs)))

        def needs_terms(terms, _calls=calls):
            _calls.append(("needs_terms", type(terms).__name__))

        saved = list(lib.citation_rules)
        lib.citation_rules += [named, keywords, needs_terms]
        try:
            call(lib, lib.ODETerm(lambda t, y, args: -y))
        finally:
            lib.citation_rules[:] = saved
        assert "% named rule" in capsys.readouterr().out or not any(
            c[0] == "named" for c in calls
        )
        seen[name] = calls
    assert seen["diffeqx"] == seen["diffrax"]
