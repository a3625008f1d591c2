"""Forward (nonlinear fixed-point) and linear solvers, one loop per algorithm, and the
registry through which ``fixed_point``/``linear_solve`` find them by name."""

from .base import (
    ConvergenceError,
    ConvergenceWarning,
    SolveInfo,
    Tracker,
    available_solvers,
    get_solver,
    register_solver,
    row_norm,
)
from . import fixed_point_iteration  # noqa: F401  (registers "fixed_point")
from . import anderson, broyden, newton_krylov, auto  # noqa: F401  (forward solvers)
from . import linear, gmres, bicgstab  # noqa: F401  (linear solvers)
from . import neural  # noqa: F401  (registers "neural": learned Anderson, Bai et al. 2022)

# Solvers that see the map only through g commute with z ↦ c·z: the engine may rescale their
# problems by powers of two (deqdiff.solvers.scaling); the splitting solvers hold W and c.
for _name in ("fixed_point", "anderson", "broyden", "newton_krylov", "auto"):
    get_solver(_name).scale_equivariant = True

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "SolveInfo",
    "Tracker",
    "available_solvers",
    "get_solver",
    "register_solver",
    "row_norm",
]
