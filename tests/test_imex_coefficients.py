"""The coefficients of the additive (IMEX) Runge–Kutta methods, checked on their own:
order conditions of each tableau and of each pair, the embedded methods, the
continuous extensions and the structure of the implicit tableaus.

Order conditions are written with rooted trees whose vertices are coloured by the
part of the method (`"E"` explicit, `"I"` implicit) they belong to: for a tree `t`,
the stage vector `g(t)` is the elementwise product, over the root's children `u`, of
`A^{colour(u)} g(u)`, and the condition reads `b^{colour(root)} . g(t) = 1 / gamma(t)`
with `gamma` the tree's density. With one colour these are the classical conditions
of a single tableau; with two, the conditions of the additive method.
"""

import math

import numpy as np
import pytest

from diffeqx._solver.imex_coefficients import (
    IMEX_TABLEAUS,
    KENCARP_DENSE,
)

# A condition counts as satisfied below `_SATISFIED`; as violated above `_VIOLATED`.
# Nothing may fall between the two, so the order found is unambiguous.
_SATISFIED = 1e-13
_VIOLATED = 1e-6
_MAX_ORDER = 6


def _multisets(pool, total, start=0):
    """Multisets of trees from `pool` (as non-decreasing index sequences) whose orders
    add up to `total`."""
    if total == 0:
        yield ()
        return
    for index in range(start, len(pool)):
        tree, order = pool[index]
        if order <= total:
            for rest in _multisets(pool, total - order, index):
                yield (tree,) + rest


def _coloured_trees(max_order, colours):
    """`{n: [trees of order n]}`, each tree `(colour, children)` with every vertex
    coloured from `colours`; each tree appears once."""
    trees = {}
    pool = []  # (tree, order) for every order generated so far
    for n in range(1, max_order + 1):
        trees[n] = [
            (colour, children)
            for children in _multisets(pool, n - 1)
            for colour in colours
        ]
        pool.extend((tree, n) for tree in trees[n])
    return trees


_TREES = {
    1: _coloured_trees(_MAX_ORDER, ("E",)),
    2: _coloured_trees(_MAX_ORDER, ("E", "I")),
}


def _density(tree):
    _, children = tree
    order = 1 + sum(_size(child) for child in children)
    return order * math.prod(_density(child) for child in children)


def _size(tree):
    return 1 + sum(_size(child) for child in tree[1])


def _stage_vector(tree, matrices):
    _, children = tree
    size = next(iter(matrices.values())).shape[0]
    g = np.ones(size)
    for child in children:
        g = g * (matrices[child[0]] @ _stage_vector(child, matrices))
    return g


def _residuals(matrices, weights, theta=1.0):
    """`{n: max |condition residual| over the trees of order n}` for the method with
    Runge–Kutta matrices `matrices[colour]` and weights `weights[colour]`; with
    `theta != 1`, the conditions of a continuous extension at `theta` (right-hand side
    `theta ** n / gamma`)."""
    trees = _TREES[len(matrices)]
    out = {}
    for n, trees_n in trees.items():
        out[n] = max(
            abs(
                weights[tree[0]] @ _stage_vector(tree, matrices)
                - theta**n / _density(tree)
            )
            for tree in trees_n
        )
    return out


def _order(residuals):
    """The largest `p` with every condition up to order `p` satisfied; checks that no
    residual sits in the ambiguous band between the two thresholds."""
    for n, r in residuals.items():
        assert r < _SATISFIED or r > _VIOLATED, (n, r)
    order = 0
    for n in sorted(residuals):
        if residuals[n] >= _SATISFIED:
            break
        order = n
    return order


def _single(a, b):
    return _order(_residuals({"E": a}, {"E": b}))


def _additive(explicit, implicit, b_explicit, b_implicit):
    return _order(
        _residuals(
            {"E": explicit.a_matrix, "I": implicit.a_matrix},
            {"E": b_explicit, "I": b_implicit},
        )
    )


def _embedded(tableau):
    return tableau.b_sol - tableau.b_error


def test_tree_counts():
    one = [len(_TREES[1][n]) for n in range(1, _MAX_ORDER + 1)]
    two = [len(_TREES[2][n]) for n in range(1, _MAX_ORDER + 1)]
    assert one == [1, 1, 2, 4, 9, 20]  # rooted trees (OEIS A000081)
    assert two == [2, 4, 14, 52, 214, 916]  # rooted trees, vertices in two colours
    # The densities of the order-4 trees: 4, 8, 12, 24.
    assert sorted(_density(t) for t in _TREES[1][4]) == [4, 8, 12, 24]


# (name, order of each tableau's solution weights, of its embedded weights,
#  order of the coupled solution, of the coupled embedded method)
_KENCARP_ORDERS = [
    ("KenCarp3", 3, 2, 3, 2),
    ("KenCarp4", 4, 3, 4, 3),
    ("KenCarp5", 5, 4, 5, 4),
]


@pytest.mark.parametrize(
    "name, order, embedded, coupled, coupled_embedded", _KENCARP_ORDERS
)
def test_kencarp_orders(name, order, embedded, coupled, coupled_embedded):
    explicit, implicit = IMEX_TABLEAUS[name]
    # The two halves share their nodes, weights and error weights.
    np.testing.assert_array_equal(explicit.c, implicit.c)
    np.testing.assert_array_equal(explicit.b_sol, implicit.b_sol)
    np.testing.assert_array_equal(explicit.b_error, implicit.b_error)
    for tableau in (explicit, implicit):
        assert _single(tableau.a_matrix, tableau.b_sol) == order
        assert _single(tableau.a_matrix, _embedded(tableau)) == embedded
    b = explicit.b_sol
    assert _additive(explicit, implicit, b, b) == coupled
    assert _additive(explicit, implicit, _embedded(explicit), _embedded(implicit)) == (
        coupled_embedded
    )


def test_sil3_orders():
    explicit, implicit = IMEX_TABLEAUS["Sil3"]
    np.testing.assert_array_equal(explicit.c, implicit.c)
    assert _single(explicit.a_matrix, explicit.b_sol) == 2
    assert _single(implicit.a_matrix, implicit.b_sol) == 2
    assert _single(explicit.a_matrix, _embedded(explicit)) == 2
    # The implicit half's embedded weights (1/4, 0, 3/4, 0) happen to be of order 3.
    assert _single(implicit.a_matrix, _embedded(implicit)) == 3
    assert _additive(explicit, implicit, explicit.b_sol, implicit.b_sol) == 2
    assert _additive(explicit, implicit, _embedded(explicit), _embedded(implicit)) == 2
    # The explicit half is of order 3 for linear autonomous problems only: it meets
    # the condition of the tall tree of order 3, b . A c = 1/6, but not that of the
    # bushy one, b . c^2 = 1/3 (it gives 7/18), nor the tall tree of order 4.
    a, b = explicit.a_matrix, explicit.b_sol
    c = a.sum(axis=1)
    assert abs(b @ (a @ c) - 1 / 6) < 1e-15
    assert abs(b @ c**2 - 7 / 18) < 1e-15
    assert abs(b @ (a @ (a @ c)) - 1 / 24) > 1e-2


def test_consistency():
    # ButcherTableau's constructor checks row sums to 1e-10; here, to rounding.
    for explicit, implicit in IMEX_TABLEAUS.values():
        for tableau in (explicit, implicit):
            a = tableau.a_matrix
            nodes = np.concatenate([[tableau.c1], tableau.c])
            np.testing.assert_allclose(a.sum(axis=1), nodes, rtol=0, atol=1e-14)
            assert tableau.c1 == 0.0
            assert abs(tableau.b_sol.sum() - 1) < 1e-14
            assert abs(tableau.b_error.sum()) < 1e-14
        assert explicit.is_explicit
        assert not implicit.is_explicit


@pytest.mark.parametrize("name", ["KenCarp3", "KenCarp4", "KenCarp5"])
def test_kencarp_implicit_structure(name):
    explicit, implicit = IMEX_TABLEAUS[name]
    diagonal = implicit.a_diagonal
    # ESDIRK: explicit first stage, one repeated diagonal entry.
    assert diagonal[0] == 0
    assert np.all(diagonal[1:] == diagonal[1])
    assert diagonal[1] > 0
    # Stiffly accurate: the last stage is the solution.
    np.testing.assert_array_equal(implicit.a_matrix[-1], implicit.b_sol)
    assert implicit.c[-1] == 1
    # The second stage of the implicit half is the trapezoidal rule's: a_21 = gamma.
    assert implicit.a_lower[0][0] == diagonal[1]
    # The explicit half is not first-same-as-last.
    assert not np.allclose(explicit.a_matrix[-1], explicit.b_sol)


def test_sil3_structure():
    explicit, implicit = IMEX_TABLEAUS["Sil3"]
    diagonal = implicit.a_diagonal
    # An explicit first stage, but not singly diagonal (EDIRK, not ESDIRK).
    assert diagonal[0] == 0
    assert len(set(diagonal[1:].tolist())) == 3
    # Both halves end on their solution: the last stage of each is the solution.
    np.testing.assert_array_equal(implicit.a_matrix[-1], implicit.b_sol)
    np.testing.assert_array_equal(explicit.a_matrix[-1, :-1], explicit.b_sol[:-1])
    assert explicit.b_sol[-1] == 0
    # Unlike the Kennedy–Carpenter pairs, the halves weight the stages differently.
    assert not np.allclose(explicit.b_sol, implicit.b_sol)


# Rows of each implicit tableau's stage predictor for which the prediction is exact
# when the increments are linear in time (so that `sum_j p_ij c_j = c_i`): all rows but
# the first for the Kennedy–Carpenter methods (linear extrapolation from the first
# stage and one other), only the second for Sil3.
_LINEAR_EXACT_ROWS = {
    "KenCarp3": [1, 2],
    "KenCarp4": [1, 2, 3, 4],
    "KenCarp5": [1, 2, 3, 4, 5, 6],
    "Sil3": [1],
}


@pytest.mark.parametrize("name", list(IMEX_TABLEAUS))
def test_predictors(name):
    _, implicit = IMEX_TABLEAUS[name]
    nodes = np.concatenate([[0.0], implicit.c])
    assert implicit.a_predictor is not None
    for i, row in enumerate(implicit.a_predictor):
        # Row i predicts stage i + 1 from stages 0..i; it reproduces constants.
        assert abs(row.sum() - 1) < 1e-14
        exact = abs(row @ nodes[: i + 1] - nodes[i + 1]) < 1e-14
        assert exact == (i in _LINEAR_EXACT_ROWS[name]), (i, row)
    np.testing.assert_array_equal(implicit.a_predictor[0], [1.0])


# (name, degree of the continuous extension = its order)
_DENSE_ORDERS = [("KenCarp3", 2), ("KenCarp4", 3), ("KenCarp5", 3)]


@pytest.mark.parametrize("name, order", _DENSE_ORDERS)
def test_dense_output(name, order):
    explicit, implicit = IMEX_TABLEAUS[name]
    coefficients = KENCARP_DENSE[name]
    assert coefficients.shape == (explicit.num_stages, order)
    # At theta = 1 the extension gives the step's solution.
    np.testing.assert_allclose(coefficients.sum(axis=1), explicit.b_sol, atol=1e-13)
    matrices = {"E": explicit.a_matrix, "I": implicit.a_matrix}
    for theta in (0.3, 0.7, 1.0):
        powers = theta ** np.arange(1, order + 1)
        b_theta = coefficients @ powers
        residuals = _residuals(matrices, {"E": b_theta, "I": b_theta}, theta)
        # Every coloured condition up to `order` holds, for both halves and coupled:
        # sum b*_i = theta, sum b*_i c_i = theta^2 / 2, and, at order 3,
        # sum b*_i c_i^2 = theta^3 / 3, sum b*_i (A c)_i = theta^3 / 6 with A = A^E, A^I.
        assert _order(residuals) >= order
        if theta != 1.0:
            assert _order(residuals) == order
    # The order-3 conditions spelled out (the generic check above covers them).
    if order >= 3:
        for theta in (0.3, 0.7):
            b_theta = coefficients @ theta ** np.arange(1, order + 1)
            c = np.concatenate([[0.0], explicit.c])
            assert abs(b_theta @ c**2 - theta**3 / 3) < _SATISFIED
            for a in matrices.values():
                assert abs(b_theta @ (a @ c) - theta**3 / 6) < _SATISFIED
