"""deqdiff: deep equilibrium models with implicit differentiation of every order."""

from . import solvers
from . import derivatives
from .engine import FixedPointInfo, PhantomGrad, SingularOperatorError, WarmStart, fixed_point, linear_solve
from .layers import DEQ, VariationalDropout
from .solvers import ConvergenceError, ConvergenceWarning, SolveInfo, register_solver

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "ConvergenceError",
    "ConvergenceWarning",
    "FixedPointInfo",
    "PhantomGrad",
    "SingularOperatorError",
    "SolveInfo",
    "VariationalDropout",
    "WarmStart",
    "derivatives",
    "fixed_point",
    "linear_solve",
    "register_solver",
    "solvers",
]
