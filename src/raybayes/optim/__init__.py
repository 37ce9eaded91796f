"""Distributed MAP (L-BFGS over shard workers) and the Laplace approximation.

* :mod:`raybayes.optim.map`: :func:`find_map` (L-BFGS-B on the driver) and
  :func:`fit_map` (model and data in, MAP out).
* :mod:`raybayes.optim.vlbfgs`: :func:`find_map_vector_free` (the locals and their
  L-BFGS state stay on the workers).
* :mod:`raybayes.optim.newton`: :func:`find_map_newton` (an L-BFGS warm-up, then
  trust-region Newton steps on the arrowhead Hessian, vector-free).
* :mod:`raybayes.optim.newton_cg`: :func:`find_map_newton_cg` (trust-region
  Newton-CG on Hessian-vector products, preconditioned by a kept arrowhead
  Hessian, vector-free).
* :mod:`raybayes.optim.laplace`: :func:`newton_polish`, :func:`laplace` and
  :func:`laplace_approximation` on the arrowhead Hessian
  (:mod:`raybayes.core.arrowhead`).
* :mod:`raybayes.optim.nested_laplace`: :func:`nested_laplace`, the integrated
  nested Laplace approximation (INLA) of latent Gaussian models.
* :mod:`raybayes.optim.result`: :class:`MAPResult`, shared by the optimizers.
"""

from raybayes.distributed.objective import constrained_values
from raybayes.optim.laplace import (
    LaplaceResult,
    laplace,
    laplace_approximation,
    newton_polish,
)
from raybayes.optim.map import find_map, fit_map
from raybayes.optim.nested_laplace import NestedLaplaceResult, nested_laplace
from raybayes.optim.newton import NewtonMAPResult, NewtonObjective, find_map_newton
from raybayes.optim.newton_cg import NewtonCGMAPResult, find_map_newton_cg
from raybayes.optim.result import MAPResult
from raybayes.optim.vlbfgs import find_map_vector_free

__all__ = [
    "MAPResult",
    "LaplaceResult",
    "find_map",
    "find_map_newton",
    "find_map_newton_cg",
    "NewtonCGMAPResult",
    "NewtonMAPResult",
    "NewtonObjective",
    "find_map_vector_free",
    "fit_map",
    "laplace",
    "laplace_approximation",
    "newton_polish",
    "nested_laplace",
    "NestedLaplaceResult",
    "constrained_values",
]
