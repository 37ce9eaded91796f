"""raybayes: Bayesian inference for NumPyro models, on one machine or a Ray cluster."""

from raybayes.errors import (
    ChainError,
    ClusterConnectionError,
    ConfigurationError,
    DataValidationError,
    RaybayesError,
    RaybayesWarning,
)
from raybayes.fleet import aggregate, connect_results, fit_many, plot_group
from raybayes.core import Partition
from raybayes.mcmc import load_draws, sample
from raybayes.optim import find_map, laplace, laplace_approximation
from raybayes.plan import Plan, plan
from raybayes.results import print_summary, summary, to_inference_data
from raybayes.svi import SVIResult, fit_svi

__version__ = "0.1.0"

__all__ = [
    "sample",
    "load_draws",
    "plan",
    "Plan",
    "Partition",
    "find_map",
    "laplace",
    "laplace_approximation",
    "fit_svi",
    "SVIResult",
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
