"""2-D Darcy flow data for neural operators: random coefficient fields and their FD solutions.

The steady-state problem (Li et al. 2021, "Fourier neural operator for parametric partial
differential equations", §5.2)

    −∇·(a(x) ∇u(x)) = f(x),   x ∈ (0, 1)²,      u = 0 on the boundary,   f ≡ 1,

maps the coefficient field a to the solution u.

* Coefficients (:func:`sample_coefficients`): as in Li et al. 2021, a = ψ(g) with g a Gaussian
  random field of covariance (−Δ + τ²I)^(−α) (zero Neumann conditions, mean-zero; α = 2, τ = 3)
  and ψ the threshold taking ``high`` (12) where g ≥ 0 and ``low`` (3) where g < 0. The field is
  drawn in the cosine basis cos(πk₁x)cos(πk₂y) of the Neumann Laplacian (eigenvalues π²|k|²)
  and evaluated at the grid nodes.
* Solutions (:func:`solve_darcy`): second-order finite differences on the uniform grid of
  ``s × s`` nodes including the boundary (h = 1/(s − 1); (s − 2)² unknowns), the 5-point
  stencil with harmonic-mean face coefficients a_{i+½,j} = 2a_{i,j}a_{i+1,j}/(a_{i,j} + a_{i+1,j})
  (the standard choice for discontinuous coefficients), solved by ``scipy.sparse`` (a direct
  sparse LU).

:func:`generate` draws a deterministic data set from a seed; :func:`load_or_generate` caches it
to an ``.npz`` file (regenerated when the file's settings differ). No downloads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

__all__ = ["DarcySettings", "DarcyData", "sample_coefficients", "darcy_matrix", "solve_darcy", "generate",
           "load_or_generate"]


@dataclass(frozen=True)
class DarcySettings:
    """What a data set is drawn from. ``resolution``: nodes per side including the boundary
    (default 32: a power of two, where the FNO's FFTs are fastest; Li et al. use 85–421); ``alpha``, ``tau``:
    the covariance (−Δ + τ²)^(−α); ``high``/``low``: the two coefficient values; ``forcing``: f."""

    n_samples: int = 1000
    resolution: int = 32
    alpha: float = 2.0
    tau: float = 3.0
    high: float = 12.0
    low: float = 3.0
    forcing: float = 1.0
    seed: int = 0

    def validate(self) -> "DarcySettings":
        if int(self.n_samples) != self.n_samples or self.n_samples < 1:
            raise ValueError(f"n_samples must be an integer ≥ 1, got {self.n_samples}")
        if int(self.resolution) != self.resolution or self.resolution < 4:
            raise ValueError(f"resolution must be an integer ≥ 4 (nodes per side incl. the boundary), got {self.resolution}")
        for name in ("alpha", "tau", "high", "low"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if not np.isfinite(self.forcing):
            raise ValueError(f"forcing must be finite, got {self.forcing}")
        return self


@dataclass
class DarcyData:
    """``a``, ``u``: arrays ``(n_samples, s, s)`` (float64) on the nodes ``x_i = i/(s − 1)``
    (index 0 along x, 1 along y); ``u`` is 0 on the boundary."""

    a: np.ndarray
    u: np.ndarray
    settings: DarcySettings

    def grid(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.settings.resolution)


def sample_coefficients(n: int, resolution: int, rng: np.random.Generator, *, alpha: float = 2.0, tau: float = 3.0,
                        high: float = 12.0, low: float = 3.0) -> np.ndarray:
    """``n`` thresholded Gaussian random fields on ``resolution × resolution`` nodes of [0, 1]²,
    shape ``(n, resolution, resolution)``; values are ``high`` or ``low``.

    g(x) = Σ_{k ≠ 0} τ^(α−1) (π²|k|² + τ²)^(−α/2) ξ_k cos(πk₁x₁) cos(πk₂x₂), ξ_k ~ N(0, 1), with
    k ∈ {0 … resolution − 1}² (Li et al. 2021's sampler; the scale τ^(α−1) does not change the sign)."""
    s = int(resolution)
    k = np.arange(s)
    k1, k2 = np.meshgrid(k, k, indexing="ij")
    sqrt_eig = tau ** (alpha - 1) * (np.pi ** 2 * (k1 ** 2 + k2 ** 2) + tau ** 2) ** (-alpha / 2)
    sqrt_eig[0, 0] = 0.0  # mean-zero field
    x = np.linspace(0.0, 1.0, s)
    basis = np.cos(np.pi * np.outer(k, x))  # (k, node): an explicit cosine sum on the nodes
    xi = rng.standard_normal((n, s, s))
    g = np.einsum("ka,nkl,lb->nab", basis, xi * sqrt_eig, basis, optimize=True)
    return np.where(g >= 0, high, low).astype(np.float64)


def _harmonic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 2.0 * a * b / (a + b)


def darcy_matrix(a: np.ndarray) -> scipy.sparse.csr_matrix:
    """The FD operator of −∇·(a∇·) on the interior nodes of the ``s × s`` grid of ``a`` (all
    nodes, boundary included), zero Dirichlet values; shape ``(m², m²)`` with m = s − 2,
    unknowns in row-major order of (i, j). Symmetric positive definite when a > 0.

    Raises ``ValueError`` if ``a`` is not a square 2-D array of finite positive values."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(f"coefficient field must be a square 2-D array of ≥ 3×3 nodes, got shape {a.shape}")
    if not (np.all(np.isfinite(a)) and np.all(a > 0)):
        raise ValueError("coefficient field must be finite and > 0 everywhere")
    s = a.shape[0]
    m = s - 2
    h2 = (1.0 / (s - 1)) ** 2
    ax = _harmonic(a[:-1, :], a[1:, :])  # faces (i+½, j), shape (s−1, s)
    ay = _harmonic(a[:, :-1], a[:, 1:])  # faces (i, j+½), shape (s, s−1)
    east, west = ax[1:, 1:-1], ax[:-1, 1:-1]  # for interior node (i, j): faces i+½ and i−½
    north, south = ay[1:-1, 1:], ay[1:-1, :-1]
    idx = np.arange(m * m).reshape(m, m)
    rows, cols, vals = [idx.ravel()], [idx.ravel()], [(east + west + north + south).ravel() / h2]
    for coef, di, dj in ((east, 1, 0), (west, -1, 0), (north, 0, 1), (south, 0, -1)):
        i0, i1 = max(0, -di), m - max(0, di)
        j0, j1 = max(0, -dj), m - max(0, dj)
        rows.append(idx[i0:i1, j0:j1].ravel())
        cols.append(idx[i0 + di:i1 + di, j0 + dj:j1 + dj].ravel())
        vals.append(-coef[i0:i1, j0:j1].ravel() / h2)
    return scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m * m, m * m))


def solve_darcy(a: np.ndarray, f: float | np.ndarray = 1.0) -> np.ndarray:
    """u on all ``s × s`` nodes (0 on the boundary) with −∇·(a∇u) = f, u|∂Ω = 0 (second-order FD).

    ``f``: a number or an ``(s, s)`` array of nodal values (only the interior ones are used).
    Raises ``ValueError`` for a malformed or non-positive ``a`` or a mis-shaped ``f``."""
    A = darcy_matrix(a)
    s = np.asarray(a).shape[0]
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 0:
        rhs = np.full((s - 2) ** 2, float(f))
    elif f.shape == (s, s):
        rhs = f[1:-1, 1:-1].ravel()
    else:
        raise ValueError(f"forcing must be a number or an array of shape {(s, s)}, got shape {f.shape}")
    u = np.zeros((s, s))
    u[1:-1, 1:-1] = scipy.sparse.linalg.spsolve(A.tocsc(), rhs).reshape(s - 2, s - 2)
    return u


def generate(settings: DarcySettings, *, progress: bool = False) -> DarcyData:
    """The data set of ``settings`` (deterministic in ``settings.seed``)."""
    settings.validate()
    rng = np.random.default_rng(settings.seed)
    a = sample_coefficients(settings.n_samples, settings.resolution, rng, alpha=settings.alpha, tau=settings.tau,
                            high=settings.high, low=settings.low)
    it = range(settings.n_samples)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="darcy data (FD solves)", dynamic_ncols=True)
    u = np.stack([solve_darcy(a[i], settings.forcing) for i in it]) if settings.n_samples else np.zeros_like(a)
    return DarcyData(a, u, settings)


def load_or_generate(path: str | Path | None, settings: DarcySettings, *, progress: bool = False) -> DarcyData:
    """The data set of ``settings``, read from ``path`` (an ``.npz`` written here before) when its
    settings match, else generated and (when ``path`` is given) written there. Raises
    ``ValueError`` if ``path`` exists but is not such a file."""
    path = None if path is None else Path(path)
    want = json.dumps(asdict(settings), sort_keys=True)
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["settings"]) == want:
                    return DarcyData(np.array(z["a"]), np.array(z["u"]), settings)
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a Darcy data file written by deqdiff ({type(err).__name__})") from None
    data = generate(settings, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, a=data.a, u=data.u, settings=np.array(want))
        tmp.replace(path)
    return data
