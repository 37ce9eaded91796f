"""Ready-made NumPyro models for raybayes' use cases. Any user model works the same way."""

from raybayes.models.elasticity import (
    CENTERING_BLOCKS,
    elasticity_model,
    elasticity_sample_sites,
    elasticity_site_variances,
)
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
from raybayes.models.negbin import NegativeBinomialLogMean, log_negbin_coefficient
from raybayes.models.reparam import centering_weight

__all__ = [
    "elasticity_model",
    "elasticity_sample_sites",
    "elasticity_site_variances",
    "CENTERING_BLOCKS",
    "NegativeBinomialLogMean",
    "log_negbin_coefficient",
    "centering_weight",
    "poisson_hmm",
    "negbin_hmm",
    "PositiveOrdered",
    "forward_log_likelihood",
    "ffbs",
    "hmm_posterior_predictive",
    "seasonal_features",
    "HMM_REGISTRY",
]
