"""Forward (nonlinear fixed-point) and linear solvers, one loop per algorithm, and the
registry through which ``fixed_point``/``linear_solve`` find them by name."""

from .base import (
    ConvergenceError,
    ConvergenceWarning,
    SolveInfo,
    available_solvers,
    get_solver,
    register_solver,
)
from . import fixed_point_iteration  # noqa: F401  (registers "fixed_point")
from . import anderson, broyden, newton_krylov  # noqa: F401  (forward solvers)
from . import linear, gmres, bicgstab  # noqa: F401  (linear solvers)

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "SolveInfo",
    "available_solvers",
    "get_solver",
    "register_solver",
]
