"""Choosing between centred and non-centred parameterizations from the data."""

from __future__ import annotations

import numpy as np

__all__ = ["centering_weight"]


def centering_weight(prior_scale, data_precision) -> np.ndarray:
    """Centring weight ``w = s^2 I / (1 + s^2 I)`` of a normal effect, in ``[0, 1)``.

    For ``theta ~ N(m, s)`` observed with data precision ``I`` (the Fisher
    information of the data about ``theta``; ``n / sigma^2`` for ``n`` normal
    observations with sd ``sigma``), the partially centred parameterization
    ``theta = m + s^(1-w) (theta~ - w m)``, ``theta~ ~ N(w m, s^w)`` (NumPyro's
    :class:`~numpyro.infer.reparam.LocScaleReparam` with ``centered=w``) makes
    ``theta~`` independent of ``m`` and ``s`` in the Gaussian case at this ``w``:
    data-rich effects get ``w`` near 1 (centred), sparse ones near 0 (non-centred).

    Args:
        prior_scale: ``s > 0``, scalar or array (a guess of the group scale is
            enough: the weight only chooses a parameterization).
        data_precision: ``I >= 0``, array broadcastable against ``prior_scale``.

    Returns:
        float32 array of the broadcast shape.

    Raises:
        ValueError: a negative or non-finite scale or precision.

    References:
        Papaspiliopoulos, O., Roberts, G. O. & Skold, M. (2007). A general framework
        for the parametrization of hierarchical models. Statistical Science 22(1),
        59-73. https://doi.org/10.1214/088342307000000014
        Gorinova, M., Moore, D. & Hoffman, M. (2020). Automatic reparameterisation
        of probabilistic programs. ICML. https://arxiv.org/abs/1906.03028

    Examples:
        >>> centering_weight(1.0, [0.0, 1.0, 99.0]).tolist()
        [0.0, 0.5, 0.9900000095367432]
    """
    s = np.asarray(prior_scale, dtype=np.float64)
    info = np.asarray(data_precision, dtype=np.float64)
    for name, v in (("prior_scale", s), ("data_precision", info)):
        bad = ~np.isfinite(v) | (v < 0)
        if bad.any():
            raise ValueError(
                f"{name} has {int(bad.sum())} negative or non-finite value(s) "
                f"(e.g. {v[bad].flat[0]}); pass scales and precisions >= 0."
            )
    r = s * s * info
    return (r / (1.0 + r)).astype(np.float32)
