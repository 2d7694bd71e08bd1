"""`citation`: BibTeX references for the numerical methods a solve uses."""

import inspect
import re
from typing import Any

# Each reference once, by key. Bibliographic data only; no abstracts.
_BIBTEX = {
    "jax2018": """@software{jax2018,
  author = {James Bradbury and Roy Frostig and Peter Hawkins and Matthew James
            Johnson and Yash Katariya and Chris Leary and Dougal Maclaurin and
            George Necula and Adam Paszke and Jake Vander{P}las and Skye
            Wanderman-{M}ilne and Qiao Zhang},
  title = {{JAX}: composable transformations of {P}ython+{N}um{P}y programs},
  url = {http://github.com/jax-ml/jax},
  year = {2018}
}""",
    "equinox2021": """@article{equinox2021,
  author = {Patrick Kidger and Cristian Garcia},
  title = {{E}quinox: neural networks in {JAX} via callable {P}y{T}rees and
           filtered transformations},
  journal = {Differentiable Programming workshop at Neural Information
             Processing Systems 2021},
  year = {2021}
}""",
    "optimistix2024": """@article{optimistix2024,
  author = {Jason Rader and Terry Lyons and Patrick Kidger},
  title = {{O}ptimistix: modular optimisation in {JAX} and {E}quinox},
  journal = {arXiv:2402.09983},
  year = {2024}
}""",
    "lineax2023": """@article{lineax2023,
  author = {Jason Rader and Terry Lyons and Patrick Kidger},
  title = {{L}ineax: unified linear solves and linear least-squares in {JAX} and
           {E}quinox},
  journal = {AI for Science workshop at Neural Information Processing Systems
             2023, arXiv:2311.17283},
  year = {2023}
}""",
    "hairer1993nonstiff": """@book{hairer1993nonstiff,
  author = {Ernst Hairer and Syvert P. N{\\o}rsett and Gerhard Wanner},
  title = {Solving Ordinary Differential Equations {I}: Nonstiff Problems},
  edition = {Second Revised Edition},
  series = {Springer Series in Computational Mathematics},
  volume = {8},
  publisher = {Springer},
  address = {Berlin},
  year = {1993}
}""",
    "hairer1996stiff": """@book{hairer1996stiff,
  author = {Ernst Hairer and Gerhard Wanner},
  title = {Solving Ordinary Differential Equations {II}: Stiff and
           Differential-Algebraic Problems},
  edition = {Second Revised Edition},
  series = {Springer Series in Computational Mathematics},
  volume = {14},
  publisher = {Springer},
  address = {Berlin},
  year = {1996}
}""",
    "hairer2006geometric": """@book{hairer2006geometric,
  author = {Ernst Hairer and Christian Lubich and Gerhard Wanner},
  title = {Geometric Numerical Integration: Structure-Preserving Algorithms for
           Ordinary Differential Equations},
  edition = {Second Edition},
  series = {Springer Series in Computational Mathematics},
  volume = {31},
  publisher = {Springer},
  address = {Berlin},
  year = {2006}
}""",
    "ralston1962": """@article{ralston1962,
  author = {Anthony Ralston},
  title = {{R}unge--{K}utta methods with minimum error bounds},
  journal = {Mathematics of Computation},
  volume = {16},
  number = {80},
  pages = {431--437},
  year = {1962}
}""",
    "bogacki1989": """@article{bogacki1989,
  author = {Przemys{\\l}aw Bogacki and Lawrence F. Shampine},
  title = {A 3(2) pair of {R}unge--{K}utta formulas},
  journal = {Applied Mathematics Letters},
  volume = {2},
  number = {4},
  pages = {321--325},
  year = {1989}
}""",
    "tsitouras2011": """@article{tsitouras2011,
  author = {Ch. Tsitouras},
  title = {{R}unge--{K}utta pairs of order 5(4) satisfying only the first column
           simplifying assumption},
  journal = {Computers \\& Mathematics with Applications},
  volume = {62},
  number = {2},
  pages = {770--775},
  year = {2011}
}""",
    "dormand1980": """@article{dormand1980,
  author = {John R. Dormand and Peter J. Prince},
  title = {A family of embedded {R}unge--{K}utta formulae},
  journal = {Journal of Computational and Applied Mathematics},
  volume = {6},
  number = {1},
  pages = {19--26},
  year = {1980}
}""",
    "shampine1986": """@article{shampine1986,
  author = {Lawrence F. Shampine},
  title = {Some practical {R}unge--{K}utta formulas},
  journal = {Mathematics of Computation},
  volume = {46},
  number = {173},
  pages = {135--150},
  year = {1986}
}""",
    "prince1981": """@article{prince1981,
  author = {Peter J. Prince and John R. Dormand},
  title = {High order embedded {R}unge--{K}utta formulae},
  journal = {Journal of Computational and Applied Mathematics},
  volume = {7},
  number = {1},
  pages = {67--75},
  year = {1981}
}""",
    "shampine2009": """@article{shampine2009,
  author = {Lawrence F. Shampine},
  title = {Stability of the leapfrog/midpoint method},
  journal = {Applied Mathematics and Computation},
  volume = {208},
  number = {1},
  pages = {293--298},
  year = {2009}
}""",
    "kvaerno2004": """@article{kvaerno2004,
  author = {Anne Kv{\\ae}rn{\\o}},
  title = {Singly diagonally implicit {R}unge--{K}utta methods with an explicit
           first stage},
  journal = {BIT Numerical Mathematics},
  volume = {44},
  number = {3},
  pages = {489--502},
  year = {2004}
}""",
    "kennedy2003": """@article{kennedy2003,
  author = {Christopher A. Kennedy and Mark H. Carpenter},
  title = {Additive {R}unge--{K}utta schemes for
           convection--diffusion--reaction equations},
  journal = {Applied Numerical Mathematics},
  volume = {44},
  number = {1--2},
  pages = {139--181},
  year = {2003}
}""",
    "whitaker2013": """@article{whitaker2013,
  author = {Jeffrey S. Whitaker and Sajal K. Kar},
  title = {Implicit--explicit {R}unge--{K}utta methods for fast--slow wave
           problems},
  journal = {Monthly Weather Review},
  volume = {141},
  number = {10},
  pages = {3426--3434},
  year = {2013}
}""",
    "shampine1997": """@article{shampine1997,
  author = {Lawrence F. Shampine and Mark W. Reichelt},
  title = {The {MATLAB} {ODE} suite},
  journal = {SIAM Journal on Scientific Computing},
  volume = {18},
  number = {1},
  pages = {1--22},
  year = {1997}
}""",
    "steinebach2023": """@article{steinebach2023,
  author = {Gerd Steinebach},
  title = {Construction of {R}osenbrock--{W}anner method {R}odas5{P} and numerical
           benchmarks within the {J}ulia {D}ifferential {E}quations package},
  journal = {BIT Numerical Mathematics},
  volume = {63},
  year = {2023},
  doi = {10.1007/s10543-023-00967-x}
}""",
    "soderlind2002": """@article{soderlind2002,
  author = {Gustaf S{\\"o}derlind},
  title = {Automatic control and adaptive time-stepping},
  journal = {Numerical Algorithms},
  volume = {31},
  pages = {281--310},
  year = {2002}
}""",
    "soderlind2003": """@article{soderlind2003,
  author = {Gustaf S{\\"o}derlind},
  title = {Digital filters in adaptive time-stepping},
  journal = {ACM Transactions on Mathematical Software},
  volume = {29},
  number = {1},
  pages = {1--26},
  year = {2003}
}""",
    "chen2018": """@inproceedings{chen2018,
  author = {Ricky T. Q. Chen and Yulia Rubanova and Jesse Bettencourt and David
            Duvenaud},
  title = {Neural ordinary differential equations},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {31},
  year = {2018}
}""",
    "kidger2021seminorm": """@inproceedings{kidger2021seminorm,
  author = {Patrick Kidger and Ricky T. Q. Chen and Terry Lyons},
  title = {``{H}ey, that's not an {ODE}'': faster {ODE} adjoints via seminorms},
  booktitle = {International Conference on Machine Learning},
  year = {2021}
}""",
    "stumm2010": """@article{stumm2010,
  author = {Philipp Stumm and Andrea Walther},
  title = {New algorithms for optimal online checkpointing},
  journal = {SIAM Journal on Scientific Computing},
  volume = {32},
  number = {2},
  year = {2010}
}""",
    "griewank2000": """@article{griewank2000,
  author = {Andreas Griewank and Andrea Walther},
  title = {Algorithm 799: revolve: an implementation of checkpointing for the
           reverse or adjoint mode of computational differentiation},
  journal = {ACM Transactions on Mathematical Software},
  volume = {26},
  number = {1},
  pages = {19--45},
  year = {2000}
}""",
    "blondel2022": """@inproceedings{blondel2022,
  author = {Mathieu Blondel and Quentin Berthet and Marco Cuturi and Roy Frostig
            and Stephan Hoyer and Felipe Llinares-L{\\'o}pez and Fabian
            Pedregosa and Jean-Philippe Vert},
  title = {Efficient and modular implicit differentiation},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {35},
  year = {2022}
}""",
    "kidger2020ncde": """@inproceedings{kidger2020ncde,
  author = {Patrick Kidger and James Morrill and James Foster and Terry Lyons},
  title = {Neural controlled differential equations for irregular time series},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {33},
  year = {2020}
}""",
    "kloeden1992": """@book{kloeden1992,
  author = {Peter E. Kloeden and Eckhard Platen},
  title = {Numerical Solution of Stochastic Differential Equations},
  series = {Applications of Mathematics},
  volume = {23},
  publisher = {Springer},
  address = {Berlin},
  year = {1992}
}""",
    "kidger2021sde": """@inproceedings{kidger2021sde,
  author = {Patrick Kidger and James Foster and Xuechen Li and Terry Lyons},
  title = {Efficient and accurate gradients for neural {SDE}s},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {34},
  year = {2021}
}""",
    "rossler2010": """@article{rossler2010,
  author = {Andreas R{\\"o}{\\ss}ler},
  title = {{R}unge--{K}utta methods for the strong approximation of solutions of
           stochastic differential equations},
  journal = {SIAM Journal on Numerical Analysis},
  volume = {48},
  number = {3},
  pages = {922--952},
  year = {2010}
}""",
    "foster2023splitting": """@article{foster2023splitting,
  author = {James Foster and Gon{\\c{c}}alo dos Reis and Calum Strange},
  title = {High order splitting methods for {SDE}s satisfying a commutativity
           condition},
  journal = {arXiv:2210.17543},
  year = {2023}
}""",
    "foster2023adaptive": """@article{foster2023adaptive,
  author = {James Foster},
  title = {On the convergence of adaptive approximations for stochastic
           differential equations},
  journal = {arXiv:2311.14201},
  year = {2023}
}""",
    "li2020": """@inproceedings{li2020,
  author = {Xuechen Li and Ting-Kam Leonard Wong and Ricky T. Q. Chen and David
            Duvenaud},
  title = {Scalable gradients for stochastic differential equations},
  booktitle = {International Conference on Artificial Intelligence and
               Statistics},
  year = {2020}
}""",
    "foster2020thesis": """@phdthesis{foster2020thesis,
  author = {James M. Foster},
  title = {Numerical approximations for stochastic differential equations},
  school = {University of Oxford},
  year = {2020}
}""",
    "foster2021shifted": """@article{foster2021shifted,
  author = {James Foster and Terry Lyons and Harald Oberhauser},
  title = {The shifted {ODE} method for underdamped {L}angevin {MCMC}},
  journal = {arXiv:2101.03446},
  year = {2021}
}""",
    "chada2024": """@article{chada2024,
  author = {Neil K. Chada and Benedict Leimkuhler and Daniel Paulin and Peter A.
            Whalley},
  title = {Unbiased kinetic {L}angevin {M}onte {C}arlo with inexact gradients},
  journal = {arXiv:2311.05025},
  year = {2024}
}""",
}

# Solver class name -> (what it is, the keys of its references).
_EXPLICIT_TEXTBOOK = ("an explicit Runge--Kutta method", ("hairer1993nonstiff",))
_SOLVERS = {
    "Euler": ("Euler's method", ("hairer1993nonstiff",)),
    "Heun": ("Heun's method", ("hairer1993nonstiff",)),
    "Midpoint": ("the explicit midpoint method", ("hairer1993nonstiff",)),
    "Ralston": ("Ralston's method", ("ralston1962",)),
    "Bosh3": ("the Bogacki--Shampine method", ("bogacki1989",)),
    "Tsit5": ("Tsitouras' 5(4) method", ("tsitouras2011",)),
    "Dopri5": (
        "the Dormand--Prince 5(4) method (dense output: Shampine 1986)",
        ("dormand1980", "shampine1986"),
    ),
    "Dopri8": ("the Dormand--Prince 8(7) method", ("prince1981",)),
    "SemiImplicitEuler": (
        "the semi-implicit (symplectic) Euler method",
        ("hairer2006geometric",),
    ),
    "LeapfrogMidpoint": ("the leapfrog/midpoint method", ("shampine2009",)),
    "ImplicitEuler": ("the implicit Euler method", ("hairer1996stiff",)),
    "Kvaerno3": ("Kv{\\ae}rn{\\o}'s ESDIRK method", ("kvaerno2004",)),
    "Kvaerno4": ("Kv{\\ae}rn{\\o}'s ESDIRK method", ("kvaerno2004",)),
    "Kvaerno5": ("Kv{\\ae}rn{\\o}'s ESDIRK method", ("kvaerno2004",)),
    "KenCarp3": ("a Kennedy--Carpenter IMEX method", ("kennedy2003",)),
    "KenCarp4": ("a Kennedy--Carpenter IMEX method", ("kennedy2003",)),
    "KenCarp5": ("a Kennedy--Carpenter IMEX method", ("kennedy2003",)),
    "Sil3": ("the Whitaker--Kar IMEX method", ("whitaker2013",)),
    "Rosenbrock23": (
        "the Shampine--Reichelt Rosenbrock method (ode23s)",
        ("shampine1997",),
    ),
    "Rodas4": (
        "the Rodas4 Rosenbrock method (Section IV.7 of Hairer and Wanner)",
        ("hairer1996stiff",),
    ),
    "Rodas5P": ("Steinebach's Rodas5P Rosenbrock method", ("steinebach2023",)),
    "EulerHeun": ("the Euler--Heun method for SDEs", ("kloeden1992",)),
    "ItoMilstein": ("Milstein's method (It{\\^o})", ("kloeden1992",)),
    "StratonovichMilstein": ("Milstein's method (Stratonovich)", ("kloeden1992",)),
    "ReversibleHeun": ("the reversible Heun method", ("kidger2021sde",)),
    "SRA1": ("R{\\\"o}{\\ss}ler's SRA1 method", ("rossler2010",)),
    "SEA": ("the SEA method", ("foster2023splitting",)),
    "ShARK": ("the ShARK method", ("foster2023splitting",)),
    "GeneralShARK": ("the general-noise ShARK method", ("foster2023splitting",)),
    "SlowRK": ("the SlowRK method", ("foster2023splitting",)),
    "SPaRK": ("the SPaRK method", ("foster2023adaptive",)),
    "ALIGN": ("the ALIGN method (shifted ODE method)", ("foster2021shifted",)),
    "ShOULD": ("the ShOULD method (shifted ODE method)", ("foster2021shifted",)),
    "QUICSORT": (
        "the QUICSORT method (shifted ODE method; UBU splitting)",
        ("foster2021shifted", "chada2024"),
    ),
}
_SDE_SOLVERS = {
    "Euler",
    "EulerHeun",
    "ItoMilstein",
    "StratonovichMilstein",
    "ReversibleHeun",
    "SRA1",
    "SEA",
    "ShARK",
    "GeneralShARK",
    "SlowRK",
    "SPaRK",
}


def _inner_solver(solver):
    while hasattr(solver, "solver") and type(solver).__name__ == "HalfSolver":
        solver = solver.solver
    return solver


def _solver_entries(solver, is_sde: bool) -> list[tuple[str, tuple[str, ...]]]:
    from ._solver.base import AbstractImplicitSolver
    from ._solver.rosenbrock import AbstractRosenbrock

    entries = []
    if type(solver).__name__ == "HalfSolver":
        entries.append(
            (
                "Error estimates by step doubling (`HalfSolver`): Section II.4 of",
                ("hairer1993nonstiff",),
            )
        )
    solver = _inner_solver(solver)
    name = type(solver).__name__
    if name == "Euler" and is_sde:
        entries.append(("You are using the Euler--Maruyama method:", ("kloeden1992",)))
    elif name in _SOLVERS:
        what, keys = _SOLVERS[name]
        entries.append((f"You are using {what}:", keys))
    elif solver is not None:
        from ._solver.runge_kutta import AbstractERK

        if isinstance(solver, AbstractERK):
            what, keys = _EXPLICIT_TEXTBOOK
            entries.append((f"You are using {what}; see", keys))
        else:
            entries.append(
                (
                    f"No reference is known for the solver {name}; cite its source.",
                    (),
                )
            )
    if isinstance(solver, AbstractImplicitSolver):
        entries.append(
            (
                "Its nonlinear and linear solves use Optimistix and Lineax:",
                ("optimistix2024", "lineax2023"),
            )
        )
    elif isinstance(solver, AbstractRosenbrock):
        entries.append(("Its linear solves use Lineax:", ("lineax2023",)))
    return entries


def _controller_entries(controller) -> list[tuple[str, tuple[str, ...]]]:
    from ._controller.clip import ClipStepSizeController
    from ._controller.pid import PIDController

    entries = []
    while isinstance(controller, ClipStepSizeController):
        controller = controller.controller
    if isinstance(controller, PIDController):
        if controller.pcoeff == 0 and controller.dcoeff == 0:
            entries.append(
                (
                    "Step sizes are adapted by an integral controller, Section II.4 of",
                    ("hairer1993nonstiff",),
                )
            )
        else:
            entries.append(
                (
                    "Step sizes are adapted by a PI/PID controller:",
                    ("soderlind2002", "soderlind2003"),
                )
            )
    return entries


def _adjoint_entries(adjoint) -> list[tuple[str, tuple[str, ...]]]:
    from ._adjoint.backsolve import BacksolveAdjoint, adjoint_rms_seminorm
    from ._adjoint.checkpoint import RecursiveCheckpointAdjoint
    from ._adjoint.implicit import ImplicitAdjoint

    if isinstance(adjoint, BacksolveAdjoint):
        entries = [
            (
                "Gradients by solving the adjoint equation backwards in time "
                "(`BacksolveAdjoint`):",
                ("chen2018",),
            )
        ]
        controller = adjoint.kwargs.get("stepsize_controller")
        if getattr(controller, "norm", None) is adjoint_rms_seminorm:
            entries.append(
                ("with the seminorm for its step sizes:", ("kidger2021seminorm",))
            )
        return entries
    if isinstance(adjoint, ImplicitAdjoint):
        return [
            (
                "Gradients by the implicit function theorem (`ImplicitAdjoint`):",
                ("blondel2022",),
            )
        ]
    if isinstance(adjoint, RecursiveCheckpointAdjoint):
        return [
            (
                "Reverse-mode gradients of an adaptive solve checkpoint the loop by "
                "online treeverse (if you differentiate the solve):",
                ("stumm2010", "griewank2000"),
            )
        ]
    return []


def _terms_entries(terms) -> tuple[list, bool]:
    """References for the terms (controlled and Brownian paths), and whether the
    terms make an SDE."""
    import jax

    from ._brownian.base import AbstractBrownianPath, brownian_paths
    from ._brownian.tree import VirtualBrownianTree
    from ._control_term import _AbstractControlTerm

    entries = []
    brownian = brownian_paths(terms)
    if any(isinstance(p, VirtualBrownianTree) for p in brownian):
        entries.append(
            (
                "A virtual Brownian tree (with the conditional laws of its Levy "
                "areas) drives the solve:",
                ("li2020", "foster2020thesis"),
            )
        )
    control_terms = [
        leaf
        for leaf in jax.tree.leaves(
            terms, is_leaf=lambda x: isinstance(x, _AbstractControlTerm)
        )
        if isinstance(leaf, _AbstractControlTerm)
    ]
    if any(
        not isinstance(term.control, AbstractBrownianPath) for term in control_terms
    ):
        entries.append(
            (
                "A controlled differential equation (e.g. a neural CDE):",
                ("kidger2020ncde",),
            )
        )
    return entries, bool(brownian)


def _langevin(terms) -> bool:
    import jax

    from ._langevin import UnderdampedLangevinDiffusionTerm

    return any(
        isinstance(leaf, UnderdampedLangevinDiffusionTerm)
        for leaf in jax.tree.leaves(
            terms, is_leaf=lambda x: isinstance(x, UnderdampedLangevinDiffusionTerm)
        )
    )


def _text(entries: list[tuple[str, tuple[str, ...]]]) -> str | None:
    """A rule's text from `(comment, reference keys)` pairs: each comment as a `%`
    line followed by the BibTeX of its references."""
    if not entries:
        return None
    blocks = []
    for comment, keys in entries:
        blocks.append("\n".join([f"% {comment}"] + [_BIBTEX[key] for key in keys]))
    return "\n\n".join(blocks)


def _libraries_rule():
    return _text([("diffeqx is built on JAX and Equinox:", ("jax2018", "equinox2021"))])


def _solver_rule(solver, terms=None):
    if solver is None:
        return None
    is_sde = _terms_entries(terms)[1] or _langevin(terms)
    is_sde = is_sde or type(_inner_solver(solver)).__name__ in _SDE_SOLVERS - {"Euler"}
    return _text(_solver_entries(solver, is_sde))


def _terms_rule(terms):
    return _text(_terms_entries(terms)[0])


def _controller_rule(stepsize_controller):
    return _text(_controller_entries(stepsize_controller))


def _adjoint_rule(adjoint):
    return _text(_adjoint_entries(adjoint))


def _event_rule(event):
    if getattr(event, "root_finder", None) is None:
        return None
    return _text(
        [("Event times are located by an Optimistix root find:", ("optimistix2024",))]
    )


citation_rules: list = [
    _libraries_rule,
    _solver_rule,
    _terms_rule,
    _controller_rule,
    _adjoint_rule,
    _event_rule,
]
"""The rules `citation` applies, in order. A rule is a function whose parameters are
named after arguments of `diffeqsolve` (`terms`, `solver`, `stepsize_controller`,
...), and which returns text to print (comment lines starting with `%`, and BibTeX
entries) or `None`. `citation` calls each rule with those of its arguments the rule
names (all of them for a rule taking `**kwargs`), and skips a rule that has a
parameter without a default which the call did not give. Append a function to add
references for your own solvers or terms."""


def _call_rule(rule, arguments: dict):
    """`rule` applied to the matching `arguments`, or `None` when one of its required
    parameters was not given."""
    parameters = inspect.signature(rule).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return rule(**arguments)
    given = {}
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            if p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
                return None
            continue
        if p.name in arguments:
            given[p.name] = arguments[p.name]
        elif p.default is p.empty:
            return None
    text = rule(**given)
    if text is not None and not isinstance(text, str):
        raise TypeError(
            f"A citation rule must return a string or None; {rule!r} returned "
            f"{type(text).__name__} {text!r}."
        )
    return text


_ENTRY = re.compile(r"^@\w+\{([^,\s]+),", re.M)


def _once(text: str, printed: set[str]) -> str:
    """`text` with each BibTeX entry whose key was printed before replaced by a
    `% (see KEY above)` line; records the keys it keeps in `printed`."""
    pieces, position = [], 0
    for match in _ENTRY.finditer(text):
        if match.start() < position:  # inside an entry already passed
            continue
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        key = match.group(1)
        pieces.append(text[position : match.start()])
        if key in printed:
            pieces.append(f"% (see {key} above)")
        else:
            printed.add(key)
            pieces.append(text[match.start() : end])
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def citation(*args: Any, **kwargs: Any) -> None:
    """Prints BibTeX references for the numerical methods a solve uses.

    Takes any of the arguments of [`diffeqsolve`][diffeqx.diffeqsolve], positionally
    or by name, as `diffeqsolve` does: to list the references of a solve, call
    `citation` where the solve calls `diffeqsolve`, e.g.

    ```python
    diffeqx.citation(
        terms, diffeqx.Tsit5(), t0, t1, dt0, y0,
        stepsize_controller=diffeqx.PIDController(rtol=1e-6, atol=1e-6),
    )
    ```

    References are given for the solver, the step-size controller, the adjoint,
    virtual Brownian trees and controlled differential equations, event root
    finding, and JAX and Equinox, each once, each introduced by a comment line (`%`)
    saying what it is for. A solver
    with no known reference (e.g. your own) gets a comment saying so. Modelling
    techniques are not covered. The references come from the functions in
    [`diffeqx.citation_rules`][], to which you can append your own. Prints to
    standard output; returns `None`.
    """
    from ._solve.diffeqsolve import diffeqsolve

    signature = inspect.signature(diffeqsolve)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"`citation` takes the arguments of `diffeqsolve`: {error}"
        ) from None
    arguments = dict(bound.arguments)
    lines = [
        "% --- References for this solve, listed by `diffeqx.citation(...)` ---",
        "% The numerical methods it uses; modelling techniques are not covered.",
    ]
    printed: set[str] = set()
    for rule in list(citation_rules):
        text = _call_rule(rule, arguments)
        if text is not None and text.strip():
            lines += ["", _once(text.strip("\n"), printed)]
    lines += ["", "% --- End of references ---"]
    print("\n".join(lines))
