"""Distributed MAP (L-BFGS over shard workers) and the Laplace approximation."""

from raybayes.optim.laplace import (
    LaplaceResult,
    laplace,
    laplace_approximation,
    newton_polish,
)
from raybayes.optim.map import MAPResult, constrained_values, find_map, fit_map

__all__ = [
    "MAPResult",
    "LaplaceResult",
    "find_map",
    "fit_map",
    "laplace",
    "laplace_approximation",
    "newton_polish",
    "constrained_values",
]
