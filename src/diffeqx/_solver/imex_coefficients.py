"""Coefficients of the additive (implicit–explicit, IMEX) Runge–Kutta methods.

An additive method advances `dy = f_E(t, y) dt + f_I(t, y) dt` with two tableaus that
share their stages: the explicit one (ERK) is applied to `f_E`, the diagonally
implicit one to `f_I`. `IMEX_TABLEAUS[name]` is the pair `(explicit, implicit)`.

Sources:

- C. A. Kennedy and M. H. Carpenter, "Additive Runge–Kutta schemes for
  convection–diffusion–reaction equations", Applied Numerical Mathematics 44 (2003)
  139–181: the pairs ARK3(2)4L[2]SA (`"KenCarp3"`), ARK4(3)6L[2]SA (`"KenCarp4"`) and
  ARK5(4)8L[2]SA (`"KenCarp5"`). In each, an ERK and an ESDIRK (explicit first stage,
  one repeated diagonal entry, stiffly accurate) share the nodes, the solution weights
  and the embedded weights of one order lower, so both halves carry the same
  `b_error` (solution weights minus embedded weights). The paper's continuous
  extensions are in `KENCARP_DENSE`.
- J. S. Whitaker and S. K. Kar, "Implicit–explicit Runge–Kutta methods for fast–slow
  wave problems", Monthly Weather Review 141 (2013) 3426–3434: the four-stage method
  that Diffrax 0.7.2 names `Sil3`. Its two halves have different solution weights, and
  the error weights are those Diffrax uses (a comparison with a Heun-type pair); it
  has no continuous extension of its own (Diffrax interpolates its steps with a cubic
  Hermite polynomial).

The stage predictors (`a_predictor` of each implicit tableau: the starting guess of a
stage's nonlinear solve, as a combination of the earlier stages' increments) are not
part of the published methods; they are the ones Diffrax 0.7.2 uses, so that the
nonlinear solves start from the same points. For the Kennedy–Carpenter methods,
every predictor after the first extrapolates linearly in time from the first stage
and one earlier stage; the first simply repeats the first stage.

Kennedy and Carpenter give their coefficients as ratios of integers; they are written
here as those ratios. One entry, the implicit `a_76` of ARK5(4)8L[2]SA, is
`-4269925059573 / 7827059040749` as in the paper (and in SUNDIALS and PETSc); Diffrax
0.7.2 has `...040719` there, a misprint that leaves that row's sum off its node by
about `2e-12`.
"""

import numpy as np

from .runge_kutta import ButcherTableau


def _extrapolation_row(nodes, stage, source):
    """Predictor row for `stage` (0-based, >= 1): the straight line through the first
    stage's increment (node 0) and the increment of stage `source`, evaluated at the
    node of `stage`. `nodes` includes the first node."""
    ratio = nodes[stage] / nodes[source]
    row = np.zeros(stage)
    row[0] = 1 - ratio
    row[source] = ratio
    return row


def _kencarp_pair(
    gamma, c, b_sol, b_embedded, explicit_rows, implicit_rows, predictor_sources
):
    """The (explicit, implicit) tableaus of a Kennedy–Carpenter ARK method.

    `c` excludes the first node (0). `implicit_rows` excludes the last row, which
    equals the solution weights (the ESDIRK is stiffly accurate).
    `predictor_sources[i]` is the (0-based) index of the earlier stage that, with the
    first stage, predicts the stage of index `i + 2`; the stage of index 1 is predicted
    by the first stage alone."""
    b_sol = np.asarray(b_sol)
    b_error = b_sol - np.asarray(b_embedded)
    nodes = np.concatenate([[0.0], c])
    explicit = ButcherTableau(
        c=c, b_sol=b_sol, b_error=b_error, a_lower=tuple(map(np.array, explicit_rows))
    )
    predictor = (np.array([1.0]),) + tuple(
        _extrapolation_row(nodes, stage, source)
        for stage, source in enumerate(predictor_sources, start=2)
    )
    implicit = ButcherTableau(
        c=c,
        b_sol=b_sol,
        b_error=b_error,
        a_lower=tuple(map(np.array, implicit_rows)) + (b_sol[:-1],),
        a_diagonal=np.array([0.0] + [gamma] * (len(b_sol) - 1)),
        a_predictor=predictor,
    )
    return explicit, implicit


# ARK3(2)4L[2]SA.
_GAMMA3 = 1767732205903 / 4055673282236
KENCARP3 = _kencarp_pair(
    gamma=_GAMMA3,
    c=np.array([2 * _GAMMA3, 3 / 5, 1.0]),
    b_sol=[
        1471266399579 / 7840856788654,
        -4482444167858 / 7529755066697,
        11266239266428 / 11593286722821,
        _GAMMA3,
    ],
    b_embedded=[
        2756255671327 / 12835298489170,
        -10771552573575 / 22201958757719,
        9247589265047 / 10645013368117,
        2193209047091 / 5459859503100,
    ],
    explicit_rows=[
        [2 * _GAMMA3],
        [5535828885825 / 10492691773637, 788022342437 / 10882634858940],
        [
            6485989280629 / 16251701735622,
            -4246266847089 / 9704473918619,
            10755448449292 / 10357097424841,
        ],
    ],
    implicit_rows=[
        [_GAMMA3],
        [2746238789719 / 10658868560708, -640167445237 / 6845629431997],
    ],
    # The third node (3/5) lies between the first two (0 and 2 gamma): the third stage is
    # interpolated from the first two, and the fourth extrapolated from them.
    predictor_sources=[1, 1],
)

# ARK4(3)6L[2]SA.
_GAMMA4 = 1 / 4
KENCARP4 = _kencarp_pair(
    gamma=_GAMMA4,
    c=np.array([1 / 2, 83 / 250, 31 / 50, 17 / 20, 1.0]),
    b_sol=[
        82889 / 524892,
        0.0,
        15625 / 83664,
        69875 / 102672,
        -2260 / 8211,
        _GAMMA4,
    ],
    b_embedded=[
        4586570599 / 29645900160,
        0.0,
        178811875 / 945068544,
        814220225 / 1159782912,
        -3700637 / 11593932,
        61727 / 225920,
    ],
    explicit_rows=[
        [1 / 2],
        [13861 / 62500, 6889 / 62500],
        [
            -116923316275 / 2393684061468,
            -2731218467317 / 15368042101831,
            9408046702089 / 11113171139209,
        ],
        [
            -451086348788 / 2902428689909,
            -2682348792572 / 7519795681897,
            12662868775082 / 11960479115383,
            3355817975965 / 11060851509271,
        ],
        [
            647845179188 / 3216320057751,
            73281519250 / 8382639484533,
            552539513391 / 3454668386233,
            3354512671639 / 8306763924573,
            4040 / 17871,
        ],
    ],
    implicit_rows=[
        [_GAMMA4],
        [8611 / 62500, -1743 / 31250],
        [5012029 / 34652500, -654441 / 2922500, 174375 / 388108],
        [
            15267082809 / 155376265600,
            -71443401 / 120774400,
            730878875 / 902184768,
            2285395 / 8070912,
        ],
    ],
    predictor_sources=[1, 1, 3, 4],
)

# ARK5(4)8L[2]SA.
_GAMMA5 = 41 / 200
KENCARP5 = _kencarp_pair(
    gamma=_GAMMA5,
    c=np.array(
        [
            41 / 100,
            2935347310677 / 11292855782101,
            1426016391358 / 7196633302097,
            92 / 100,
            24 / 100,
            3 / 5,
            1.0,
        ]
    ),
    b_sol=[
        -872700587467 / 9133579230613,
        0.0,
        0.0,
        22348218063261 / 9555858737531,
        -1143369518992 / 8141816002931,
        -39379526789629 / 19018526304540,
        32727382324388 / 42900044865799,
        _GAMMA5,
    ],
    b_embedded=[
        -975461918565 / 9796059967033,
        0.0,
        0.0,
        78070527104295 / 32432590147079,
        -548382580838 / 3424219808633,
        -33438840321285 / 15594753105479,
        3629800801594 / 4656183773603,
        4035322873751 / 18575991585200,
    ],
    explicit_rows=[
        [41 / 100],
        [367902744464 / 2072280473677, 677623207551 / 8224143866563],
        [1268023523408 / 10340822734521, 0.0, 1029933939417 / 13636558850479],
        [
            14463281900351 / 6315353703477,
            0.0,
            66114435211212 / 5879490589093,
            -54053170152839 / 4284798021562,
        ],
        [
            14090043504691 / 34967701212078,
            0.0,
            15191511035443 / 11219624916014,
            -18461159152457 / 12425892160975,
            -281667163811 / 9011619295870,
        ],
        [
            19230459214898 / 13134317526959,
            0.0,
            21275331358303 / 2942455364971,
            -38145345988419 / 4862620318723,
            -1 / 8,
            -1 / 8,
        ],
        [
            -19977161125411 / 11928030595625,
            0.0,
            -40795976796054 / 6384907823539,
            177454434618887 / 12078138498510,
            782672205425 / 8267701900261,
            -69563011059811 / 9646580694205,
            7356628210526 / 4942186776405,
        ],
    ],
    implicit_rows=[
        [_GAMMA5],
        [41 / 400, -567603406766 / 11931857230679],
        [683785636431 / 9252920307686, 0.0, -110385047103 / 1367015193373],
        [
            3016520224154 / 10081342136671,
            0.0,
            30586259806659 / 12414158314087,
            -22760509404356 / 11113319521817,
        ],
        [
            218866479029 / 1489978393911,
            0.0,
            638256894668 / 5436446318841,
            -1179710474555 / 5321154724896,
            -60928119172 / 8023461067671,
        ],
        [
            1020004230633 / 5715676835656,
            0.0,
            25762820946817 / 25263940353407,
            -2161375909145 / 9755907335909,
            -211217309593 / 5846859502534,
            -4269925059573 / 7827059040749,
        ],
    ],
    predictor_sources=[1, 1, 1, 2, 4, 4],
)

# Whitaker–Kar's method (Diffrax's `Sil3`). Neither half's embedded weights are
# published with the method; these are Diffrax's.
SIL3 = (
    ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 2, -1 / 2, 1.0, 0.0]),
        b_error=np.array([0.0, 1 / 2, -1.0, 1 / 2]),
        a_lower=(
            np.array([1 / 3]),
            np.array([1 / 6, 1 / 2]),
            np.array([1 / 2, -1 / 2, 1.0]),
        ),
    ),
    ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([3 / 8, 0.0, 3 / 8, 1 / 4]),
        b_error=np.array([1 / 8, 0.0, -3 / 8, 1 / 4]),
        a_lower=(
            np.array([1 / 6]),
            np.array([1 / 3, 0.0]),
            np.array([3 / 8, 0.0, 3 / 8]),
        ),
        a_diagonal=np.array([0.0, 1 / 6, 1 / 3, 1 / 4]),
        # The third stage is extrapolated linearly from the first two; the fourth
        # reuses that same combination.
        a_predictor=(
            np.array([1.0]),
            np.array([-1.0, 2.0]),
            np.array([-1.0, 2.0, 0.0]),
        ),
    ),
)

IMEX_TABLEAUS = {
    "KenCarp3": KENCARP3,
    "KenCarp4": KENCARP4,
    "KenCarp5": KENCARP5,
    "Sil3": SIL3,
}

# Continuous extensions of the Kennedy–Carpenter methods: over a step from `t0` of size
# `h`, with the increments `k_i` of stage `i` (the explicit and implicit parts summed),
# `y(t0 + theta h) ~ y0 + sum_i b*_i(theta) k_i` where
# `b*_i(theta) = sum_j KENCARP_DENSE[name][i, j] * theta ** (j + 1)`; that is, column `j`
# holds the coefficient of `theta ** (j + 1)` (lowest power first, no constant term).
# At `theta = 1` each row sums to that stage's solution weight.
KENCARP_DENSE = {
    "KenCarp3": np.array(
        [
            [4655552711362 / 22874653954995, -215264564351 / 13552729205753],
            [-18682724506714 / 9892148508045, 17870216137069 / 13817060693119],
            [34259539580243 / 13192909600954, -28141676662227 / 17317692491321],
            [584795268549 / 6622622206610, 2508943948391 / 7218656332882],
        ]
    ),
    "KenCarp4": np.array(
        [
            [
                6943876665148 / 7220017795957,
                -54480133 / 30881146,
                6818779379841 / 7100303317025,
            ],
            [0.0, 0.0, 0.0],
            [
                7640104374378 / 9702883013639,
                -11436875 / 14766696,
                2173542590792 / 12501825683035,
            ],
            [
                -20649996744609 / 7521556579894,
                174696575 / 18121608,
                -31592104683404 / 5083833661969,
            ],
            [
                8854892464581 / 2390941311638,
                -12120380 / 966161,
                61146701046299 / 7138195549469,
            ],
            [
                -11397109935349 / 6675773540249,
                3843 / 706,
                -17219254887155 / 4939391667607,
            ],
        ]
    ),
    "KenCarp5": np.array(
        [
            [
                -17674230611817 / 10670229744614,
                43486358583215 / 12773830924787,
                -9257016797708 / 5021505065439,
            ],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [
                65168852399939 / 7868540260826,
                -91478233927265 / 11067650958493,
                26096422576131 / 11239449250142,
            ],
            [
                15494834004392 / 5936557850923,
                -79368583304911 / 10890268929626,
                92396832856987 / 20362823103730,
            ],
            [
                -99329723586156 / 26959484932159,
                -12239297817655 / 9152339842473,
                30029262896817 / 10175596800299,
            ],
            [
                -19024464361622 / 5461577185407,
                115839755401235 / 10719374521269,
                -26136350496073 / 3983972220547,
            ],
            [
                -6511271360970 / 6095937251113,
                5843115559534 / 2180450260947,
                -5289405421727 / 3760307252460,
            ],
        ]
    ),
}
