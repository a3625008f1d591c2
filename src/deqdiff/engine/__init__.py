"""The differentiation engine: a differentiable linear solve and the fixed-point node whose
derivatives of every order are linear solves with ``I − ∂f/∂z`` at the fixed point."""

from .fixed_point import FixedPointInfo, fixed_point
from .linear_solve import linear_solve
from .phantom import PhantomGrad
from .warm_start import WarmStart
from .operators import FixedPointJacobian, FunctionOperator, LinearOperator, SingularOperatorError

__all__ = ["FixedPointInfo", "FixedPointJacobian", "FunctionOperator", "LinearOperator", "PhantomGrad", "SingularOperatorError",
           "WarmStart", "fixed_point", "linear_solve"]
