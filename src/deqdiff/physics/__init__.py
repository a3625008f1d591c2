"""Physics-informed deep equilibrium models.

A model maps inputs ``x`` ``(B, d_in)`` (time, initial state, parameters, space …) to ``y``;
the physics loss differentiates ``y`` by a column of ``x`` with ``torch.autograd.grad`` through
:func:`deqdiff.fixed_point`, so ``∂y/∂t`` and the weight gradient of a loss on it are implicit
solves (Pacheco 2023, eqs. deq-jacobian and hessian-t). Modules:

* :mod:`.models` — ``PIDEQ`` (implicit or unrolled), ``MLP``, ``FlowMap`` (conditioned on y0);
* :mod:`.losses` — ``PhysicsLoss``, ``ode_residual``, ``output_gradient``/``output_tangent``, Jacobian penalties;
* :mod:`.training` — ``Trainer`` with exact checkpoint/resume;
* :mod:`.problems` — ODE problems (Van der Pol) and ``solve_ivp`` references;
* :mod:`.metrics`, :mod:`.rollout`, :mod:`.plots`, :mod:`.vdp` — the Van der Pol experiment.
"""

from .losses import LossTerms, PhysicsLoss, jacobian_penalty, ode_residual, output_gradient, output_tangent
from .models import MLP, PIDEQ, FlowMap, TanhCell, count_parameters

__all__ = ["PIDEQ", "MLP", "FlowMap", "TanhCell", "count_parameters", "PhysicsLoss", "LossTerms",
           "ode_residual", "output_gradient", "output_tangent", "jacobian_penalty"]
