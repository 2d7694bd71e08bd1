"""Coefficients of the stochastic Runge–Kutta methods (published method data).

Each method is a dict read by `srk.py`, which turns it into a
`StochasticButcherTableau`:

- `noise`: `"additive"` for a method that assumes the diffusion does not depend on
  the state (its stages are shifted by the step's noise, the diffusion being
  evaluated at the step's ends only), or `"general"` for one that evaluates the
  diffusion at its stages;
- `a`, `c`, `b_sol`, `b_error`: the drift's tableau (`a` the strictly lower rows, `c`
  the nodes of stages 2, ..., s);
- `w`, `hh`: the weights of the Brownian increment `W` and of the space-time Lévy
  area `H` (normalised as `H ~ N(0, h/12)`), each a dict with `a` and `b_sol` (and,
  for general noise, `b_error`). For additive noise `a` has one entry per stage (the
  multiple of `g(t0) W` or `g(t0) H` added to that stage) and `b_sol` is a number;
  for general noise they are rows and a vector like the drift's;
- `skip_drift`, `skip_diffusion`: the (0-based) stages at which the drift (or the
  diffusion) is not evaluated, as its value there has weight zero everywhere.

The comments number stages from 1.

Sources:

- SEA, ShARK, GeneralShARK and SlowRK: J. Foster, G. dos Reis, C. Strange, "High
  order splitting methods for SDEs satisfying a commutativity condition" (2023),
  arXiv:2210.17543, equations (5.8), (6.1) and (6.2).
- SPaRK: J. Foster, "On the convergence of adaptive approximations for stochastic
  differential equations" (2023), arXiv:2311.14201, Definition 1.6.
- SRA1: A. Rößler, "Runge–Kutta methods for the strong approximation of solutions of
  stochastic differential equations", SIAM J. Numer. Anal. 48(3), 2010. Rößler
  writes the stages with the iterated integral `I_(1,0) = ∫ W ds`; as
  `I_(1,0) / h = W/2 + H`, his stage weight `3/2` on `I_(1,0)/h` is `3/4` on `W` and
  `3/2` on `H` here.
"""

import math

# Shifted Euler (additive noise): one drift evaluation, at
# y0 + g (W/2 + H), the mean of the Brownian path over the step.
SEA = dict(
    noise="additive",
    a=(),
    c=(),
    b_sol=(1.0,),
    b_error=None,
    w=dict(a=(0.5,), b_sol=1.0),
    hh=dict(a=(1.0,), b_sol=0.0),
)

# Rößler's SRA1 (additive noise): two stages, the second at 3/4 of the step.
SRA1 = dict(
    noise="additive",
    a=((0.75,),),
    c=(0.75,),
    b_sol=(1.0 / 3.0, 2.0 / 3.0),
    b_error=(-2.0 / 3.0, 2.0 / 3.0),
    w=dict(a=(0.0, 0.75), b_sol=1.0),
    hh=dict(a=(0.0, 1.5), b_sol=0.0),
)

# ShARK (additive noise): both stages start from the shifted state y0 + g H; the
# second is 5/6 of the way along the step.
SHARK = dict(
    noise="additive",
    a=((5.0 / 6.0,),),
    c=(5.0 / 6.0,),
    b_sol=(0.4, 0.6),
    b_error=(-0.6, 0.6),
    w=dict(a=(0.0, 5.0 / 6.0), b_sol=1.0),
    hh=dict(a=(1.0, 1.0), b_sol=0.0),
)

# ShARK for general noise: stage 1 evaluates the diffusion only (at y0), stages 2
# and 3 are ShARK's two stages with the diffusion evaluated there too.
GENERAL_SHARK = dict(
    noise="general",
    a=((0.0,), (0.0, 5.0 / 6.0)),
    c=(0.0, 5.0 / 6.0),
    b_sol=(0.0, 0.4, 0.6),
    b_error=None,
    w=dict(a=((0.0,), (0.0, 5.0 / 6.0)), b_sol=(0.0, 0.4, 0.6), b_error=None),
    hh=dict(a=((1.0,), (1.0, 0.0)), b_sol=(0.0, 1.2, -1.2), b_error=None),
    skip_drift=(0,),
)

# SLOW-RK (commutative noise): a drift evaluation at y0, a half step of drift, then
# the classical fourth-order Runge–Kutta method along W for the diffusion (stages
# 2-5), a last drift evaluation at 3/4 of the step, and stage 7, which re-evaluates
# the diffusion of stage 4 a half drift step further on (weighted against it by H).
SLOW_RK = dict(
    noise="general",
    a=(
        (0.5,),
        (0.5, 0.0),
        (0.5, 0.0, 0.0),
        (0.5, 0.0, 0.0, 0.0),
        (0.75, 0.0, 0.0, 0.0, 0.0),
        (1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ),
    c=(0.5, 0.5, 0.5, 0.5, 0.75, 1.0),
    b_sol=(1.0 / 3.0, 0.0, 0.0, 0.0, 0.0, 2.0 / 3.0, 0.0),
    b_error=None,
    w=dict(
        a=(
            (0.0,),
            (0.0, 0.5),
            (0.0, 0.0, 0.5),
            (0.0, 0.0, 0.0, 1.0),
            (0.0, 0.0, 0.0, 0.75, 0.0),
            (0.0, 0.0, 0.5, 0.0, 0.0, 0.0),
        ),
        b_sol=(0.0, 1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0, 0.0, 0.0),
        b_error=None,
    ),
    hh=dict(
        a=(
            (0.0,),
            (0.0, 0.0),
            (0.0, 0.0, 0.0),
            (0.0, 0.0, 0.0, 0.0),
            (0.0, 0.0, 0.0, 1.5, 0.0),
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        ),
        b_sol=(0.0, 0.0, 0.0, 2.0, 0.0, 0.0, -2.0),
        b_error=None,
    ),
    skip_drift=(1, 2, 3, 4, 6),
    skip_diffusion=(0, 5),
)

# SPaRK (general noise, embedded error estimate): three stages at 0, 1/2 and 1 of
# the step. The embedded solution weights the first and last stages by 1/2 each
# (Heun's method) and has no H term; `b_error` is the difference of the two.
_X1 = (3.0 - math.sqrt(3.0)) / 6.0
_X2 = math.sqrt(3.0) / 3.0
SPARK = dict(
    noise="general",
    a=((0.5,), (0.0, 1.0)),
    c=(0.5, 1.0),
    b_sol=(_X1, _X2, _X1),
    b_error=(_X1 - 0.5, _X2, _X1 - 0.5),
    w=dict(
        a=((0.5,), (0.0, 1.0)),
        b_sol=(_X1, _X2, _X1),
        b_error=(_X1 - 0.5, _X2, _X1 - 0.5),
    ),
    hh=dict(
        a=((math.sqrt(3.0),), (0.0, 0.0)),
        b_sol=(1.0, 0.0, -1.0),
        b_error=(1.0, 0.0, -1.0),
    ),
)
