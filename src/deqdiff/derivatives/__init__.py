"""``deqdiff.derivatives``: functional derivatives of deep equilibrium models.

Every function takes the layer ``f(z, *params)``, its fixed point ``z_star`` at ``params``
(e.g. the output of ``deqdiff.fixed_point``) and ``params`` — a tuple of f's arguments after
z, tensors or pytrees of tensors (a dict of module parameters) — and selects derivatives
with ``argnums`` as in ``torch.func``. Every derivative is one or a few linear solves with
``I − ∂f/∂z`` at z* through the engine (``deqdiff.linear_solve``'s operator machinery);
the count is stated per function and in docs/derivatives.md.

References cited in this package: Pacheco 2023, "Second derivative (and further) of deep
equilibrium/implicit models" (equations named deq-jacobian, deq-backward-fixed-point,
hessian-t); Schraudolph 2002, "Fast curvature matrix-vector products for second-order
gradient descent" (Gauss–Newton); Wang, Navon, Le Dimet & Zou 1992, "The second order
adjoint analysis"; Nguyen Ngoc Hieu 2022, "An analysis of applying neural tangent kernels
for deep equilibrium models" (cited as Nguyen 2022).
"""

from .hessian import LossHessian
from .jacobian import deq_jacobian, deq_jvp, deq_vjp
from .lanczos import eigsh, hessian_eigenvalues, lanczos
from .mixed import deq_second_jvp, derivative_loss_grad, mixed_jacobian, mixed_jvp, mixed_vjp
from .time import input_derivatives, time_derivatives

__all__ = [
    "LossHessian",
    "deq_jacobian",
    "deq_jvp",
    "deq_vjp",
    "deq_second_jvp",
    "derivative_loss_grad",
    "eigsh",
    "hessian_eigenvalues",
    "input_derivatives",
    "lanczos",
    "mixed_jacobian",
    "mixed_jvp",
    "mixed_vjp",
    "time_derivatives",
]
