"""Analysis of deep equilibrium models (Nguyen Ngoc Hieu 2022, "An analysis of applying neural
tangent kernels for deep equilibrium models", chapters 3–4; cited as Nguyen 2022): convergence of the forward
solve, trajectories, the empirical NTK and the linear-rate bound, loss-Hessian spectra and
filter-normalized loss landscapes. One module per tool; figures in :mod:`.plotting`; the
command line is ``deqdiff analyze``."""

from .hessian import deq_loss_hessian, hessian_spectrum
from .landscape import (Landscape, evaluate_grid, filter_normalize, flatness_summary, landscape_1d, landscape_2d,
                        random_directions)
from .ntk import (empirical_ntk, equilibrium_matrix, lambda_0, linear_rate_check, ntk_spectrum, ntk_summary,
                  per_sample_jacobian)
from .residuals import ResidualCurves, compare_initializations, relative_residuals, reinit_normal_, residual_curves
from .trajectories import collect_trajectories, pca_fit, project_trajectories, trajectories_over_training

__all__ = [
    "Landscape", "ResidualCurves", "collect_trajectories", "compare_initializations", "deq_loss_hessian",
    "empirical_ntk", "equilibrium_matrix", "evaluate_grid", "filter_normalize", "flatness_summary",
    "hessian_spectrum", "lambda_0", "landscape_1d", "landscape_2d", "linear_rate_check", "ntk_spectrum",
    "ntk_summary", "pca_fit", "per_sample_jacobian", "project_trajectories", "random_directions",
    "reinit_normal_", "relative_residuals", "residual_curves", "trajectories_over_training",
]
