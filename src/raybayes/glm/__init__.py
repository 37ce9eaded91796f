"""Generalized linear models fitted on data-sharded workers.

``LogisticRegression`` and ``PoissonRegression`` are scikit-learn compatible
estimators. The rows of the data are split over shard workers (Ray actors, or
in-process); each worker returns the loss, gradient and Hessian of its rows, and the
driver runs L-BFGS, OWL-QN (L1 / elastic net) or Newton's method on their sum.
"""

from raybayes.glm.estimators import LogisticRegression, PoissonRegression
from raybayes.glm.families import GLMShard, logistic_nll, poisson_nll
from raybayes.glm.optim import (
    OptimizeResult,
    minimize_lbfgs,
    minimize_newton,
    minimize_owlqn,
)
from raybayes.glm.sharded import ShardedGLMData, ShardedGLMObjective, shard_bounds

__all__ = [
    "LogisticRegression",
    "PoissonRegression",
    "ShardedGLMData",
    "GLMShard",
    "ShardedGLMObjective",
    "shard_bounds",
    "logistic_nll",
    "poisson_nll",
    "OptimizeResult",
    "minimize_lbfgs",
    "minimize_owlqn",
    "minimize_newton",
]
