"""Distributed stochastic variational inference (see :func:`fit_svi`)."""

from raybayes.svi.fit import SVIResult, SVIStepInfo, fit_svi
from raybayes.svi.guides import GlobalGuide

__all__ = ["GlobalGuide", "SVIResult", "SVIStepInfo", "fit_svi"]
