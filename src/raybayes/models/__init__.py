"""Ready-made NumPyro models for raybayes' use cases. Any user model works the same way."""

from raybayes.models.elasticity import elasticity_model
from raybayes.models.hmm import (
    HMM_REGISTRY,
    PositiveOrdered,
    ffbs,
    forward_log_likelihood,
    hmm_posterior_predictive,
    negbin_hmm,
    poisson_hmm,
    seasonal_features,
)

__all__ = [
    "elasticity_model",
    "poisson_hmm",
    "negbin_hmm",
    "PositiveOrdered",
    "forward_log_likelihood",
    "ffbs",
    "hmm_posterior_predictive",
    "seasonal_features",
    "HMM_REGISTRY",
]
