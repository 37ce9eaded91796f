"""Distributed stochastic variational inference (see :func:`fit_svi`)."""

from raybayes.svi.fit import SVIResult, SVIStepInfo, StoppingConfig, fit_svi
from raybayes.svi.guides import GlobalGuide

__all__ = ["GlobalGuide", "SVIResult", "SVIStepInfo", "StoppingConfig", "fit_svi"]
