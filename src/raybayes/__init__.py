"""raybayes: Bayesian inference for NumPyro models, on one machine or a Ray cluster.

The public functions are imported on first use, so that ``import raybayes`` (and
the ``raybayes`` command's ``--help``) does not load JAX or Ray.
"""

from typing import TYPE_CHECKING

from raybayes._lazy import lazy_exports
from raybayes.config import CheckpointConfig, ScalingConfig
from raybayes.errors import (
    ChainError,
    ClusterConnectionError,
    ConfigurationError,
    DataValidationError,
    RaybayesError,
    RaybayesWarning,
)

if TYPE_CHECKING:  # for type checkers and the API reference; at run time, _LAZY
    from raybayes.core import Partition
    from raybayes.fleet import aggregate, connect_results, fit_many, plot_group
    from raybayes.mcmc import load_draws, sample
    from raybayes.mcmc.subposterior import sample_subposteriors
    from raybayes.optim import (
        LaplaceResult,
        MAPResult,
        NestedLaplaceResult,
        find_map,
        fit_map,
        laplace,
        laplace_approximation,
        nested_laplace,
    )
    from raybayes.plan import Plan, plan
    from raybayes.results import print_summary, summary, to_inference_data
    from raybayes.svi import StoppingConfig, SVIResult, fit_svi

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "sample": "raybayes.mcmc",
    "load_draws": "raybayes.mcmc",
    "sample_subposteriors": "raybayes.mcmc.subposterior",
    "plan": "raybayes.plan",
    "Plan": "raybayes.plan",
    "Partition": "raybayes.core",
    "find_map": "raybayes.optim",
    "fit_map": "raybayes.optim",
    "MAPResult": "raybayes.optim",
    "LaplaceResult": "raybayes.optim",
    "laplace": "raybayes.optim",
    "laplace_approximation": "raybayes.optim",
    "nested_laplace": "raybayes.optim",
    "NestedLaplaceResult": "raybayes.optim",
    "fit_svi": "raybayes.svi",
    "SVIResult": "raybayes.svi",
    "StoppingConfig": "raybayes.svi",
    "fit_many": "raybayes.fleet",
    "aggregate": "raybayes.fleet",
    "plot_group": "raybayes.fleet",
    "connect_results": "raybayes.fleet",
    "summary": "raybayes.results",
    "print_summary": "raybayes.results",
    "to_inference_data": "raybayes.results",
}

__all__ = [
    "sample",
    "sample_subposteriors",
    "load_draws",
    "plan",
    "Plan",
    "Partition",
    "fit_map",
    "MAPResult",
    "find_map",
    "laplace",
    "laplace_approximation",
    "LaplaceResult",
    "nested_laplace",
    "NestedLaplaceResult",
    "ScalingConfig",
    "fit_svi",
    "SVIResult",
    "StoppingConfig",
    "CheckpointConfig",
    "fit_many",
    "aggregate",
    "plot_group",
    "connect_results",
    "summary",
    "print_summary",
    "to_inference_data",
    "RaybayesError",
    "RaybayesWarning",
    "ConfigurationError",
    "DataValidationError",
    "ChainError",
    "ClusterConnectionError",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
