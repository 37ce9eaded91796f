"""Ready-made NumPyro models for raybayes' use cases. Any user model works the same way."""

from raybayes.models.elasticity import elasticity_model

__all__ = ["elasticity_model"]
