"""Distributed MAP (L-BFGS over shard workers) and the Laplace approximation."""

from raybayes.optim.laplace import (
    LaplaceResult,
    laplace,
    laplace_approximation,
    newton_polish,
)
from raybayes.optim.map import MAPResult, constrained_values, find_map, fit_map
from raybayes.optim.vlbfgs import find_map_vector_free

__all__ = [
    "MAPResult",
    "LaplaceResult",
    "find_map",
    "find_map_vector_free",
    "fit_map",
    "laplace",
    "laplace_approximation",
    "newton_polish",
    "constrained_values",
]
