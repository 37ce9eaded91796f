"""Generalized linear models fitted on data-sharded workers.

``LogisticRegression`` and ``PoissonRegression`` are scikit-learn compatible
estimators. The rows of the data are split over shard workers (Ray actors, or
in-process); each worker returns the loss, gradient and Hessian of its rows, and the
driver runs L-BFGS, OWL-QN (L1 / elastic net) or Newton's method on their sum.

The names are imported on first use: a shard worker needs only
:mod:`raybayes.glm.families` (NumPy), so it starts without importing scikit-learn.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LogisticRegression": "raybayes.glm.estimators",
    "PoissonRegression": "raybayes.glm.estimators",
    "ShardedGLMData": "raybayes.glm.sharded",
    "ShardedGLMObjective": "raybayes.glm.sharded",
    "shard_bounds": "raybayes.glm.sharded",
    "GLMShard": "raybayes.glm.families",
    "logistic_nll": "raybayes.glm.families",
    "poisson_nll": "raybayes.glm.families",
    "OptimizeResult": "raybayes.glm.optim",
    "minimize_lbfgs": "raybayes.glm.optim",
    "minimize_owlqn": "raybayes.glm.optim",
    "minimize_newton": "raybayes.glm.optim",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raybayes.glm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
