"""A negative-binomial (NB2) distribution on the log-mean scale, cheap to differentiate.

NumPyro's :class:`~numpyro.distributions.NegativeBinomial2` goes through
``GammaPoisson`` and ``betaln``: accurate, but its value and gradient cost several
special functions per observation, and a model that computes ``log_mean`` first pays
for ``exp`` and ``log`` again. :class:`NegativeBinomialLogMean` writes the same log
pmf as

``log p(y) = c(y, phi) - y softplus(log phi - eta) - phi softplus(eta - log phi)``

with ``eta = log mean``: the two softplus terms are small for every row (no
cancellation between large terms in float32), their gradient in ``eta`` is one
sigmoid, and ``c(y, phi) = lgamma(y + phi) - lgamma(phi) - lgamma(y + 1)``
(:func:`log_negbin_coefficient`) is evaluated by a Stirling difference that stays
accurate in float32 for counts in the millions, with a hand-written derivative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln
from numpyro.distributions import constraints
from numpyro.distributions.util import promote_shapes, validate_sample

__all__ = ["NegativeBinomialLogMean", "log_negbin_coefficient"]

#: Counts below this are summed exactly (one log per unit); above, Stirling.
_SMALL = 8


def _stirling_correction(x):
    # lgamma(x) - [(x - 1/2) log x - x + log(2 pi) / 2]; error < 3e-8 at x >= 8.
    inv = 1.0 / x
    return inv * (1.0 / 12.0 - inv * inv / 360.0)


def _coefficient_and_derivative(y, phi):
    """``c(y, phi)`` and ``dc/dphi``: shared pieces, two logs per observation."""
    phi = jnp.asarray(phi)
    dtype = jnp.result_type(phi, jnp.float32)
    y = jnp.asarray(y).astype(dtype)
    big = y >= _SMALL
    # Large counts: the difference of two Stirling series, written with log1p.
    yb = jnp.where(big, y, float(_SMALL))
    a, b = yb + phi, yb + 1.0
    log_a = jnp.log(a)
    inv_a = 1.0 / a
    value_big = (
        (yb + 0.5) * jnp.log1p((phi - 1.0) / b)
        + (phi - 1.0) * (log_a - 1.0)
        + _stirling_correction(a)
        - _stirling_correction(b)
        - gammaln(phi)
    )
    # digamma(a) by its asymptotic series (error < 1e-8 at a >= 8), minus digamma(phi).
    inv_a2 = inv_a * inv_a
    deriv_big = (
        log_a - 0.5 * inv_a - inv_a2 * (1.0 / 12.0 - inv_a2 / 120.0) - digamma(phi)
    )
    # Small counts: exact finite sums, looked up in tables of _SMALL + 1 entries
    # that depend on phi only.
    k = jnp.arange(_SMALL, dtype=dtype)
    value_table = jnp.concatenate(
        [
            jnp.zeros(jnp.shape(phi) + (1,), dtype),
            jnp.cumsum(jnp.log((phi[..., None] + k) / (k + 1.0)), -1),
        ],
        -1,
    )
    deriv_table = jnp.concatenate(
        [
            jnp.zeros(jnp.shape(phi) + (1,), dtype),
            jnp.cumsum(1.0 / (phi[..., None] + k), -1),
        ],
        -1,
    )
    idx = jnp.where(big, 0, y).astype(jnp.int32)
    if jnp.ndim(phi) == 0:
        value_small, deriv_small = value_table[idx], deriv_table[idx]
    else:
        shape = jnp.broadcast_shapes(jnp.shape(idx), jnp.shape(phi))
        idx = jnp.broadcast_to(idx, shape)[..., None]
        value_small = jnp.take_along_axis(
            jnp.broadcast_to(value_table, shape + (_SMALL + 1,)), idx, -1
        )[..., 0]
        deriv_small = jnp.take_along_axis(
            jnp.broadcast_to(deriv_table, shape + (_SMALL + 1,)), idx, -1
        )[..., 0]
    return jnp.where(big, value_big, value_small), jnp.where(
        big, deriv_big, deriv_small
    )


@jax.custom_jvp
def log_negbin_coefficient(y, concentration):
    """``log Gamma(y + phi) - log Gamma(phi) - log Gamma(y + 1)``, accurate in float32.

    The log of the negative-binomial coefficient ``C(y + phi - 1, y)``. The plain
    lgamma difference loses about ``|lgamma(y)| * 6e-8`` (0.005 for ``y = 10^4``) to
    rounding in float32; here counts ``y >= 8`` use the difference of two Stirling
    series written with ``log1p``, and smaller counts the exact finite sum
    ``sum_{k < y} log((phi + k) / (k + 1))`` (a table lookup: the table depends on
    ``phi`` only). The derivative is hand-written the same way, so a gradient costs
    no special function per observation.

    Args:
        y: counts ``>= 0`` (any shape; integer or float dtype). Not differentiable.
        concentration: ``phi > 0``, broadcastable against ``y``.

    Returns:
        An array of the broadcast shape, in the floating dtype of ``concentration``.
        Its derivative in ``concentration`` is ``digamma(y + phi) - digamma(phi)``.

    Examples:
        >>> import numpy as np
        >>> from scipy.special import gammaln
        >>> v = log_negbin_coefficient(jnp.array([0.0, 3.0, 5000.0]), 2.5)
        >>> y = np.array([0, 3, 5000])
        >>> ref = gammaln(y + 2.5) - gammaln(2.5) - gammaln(y + 1)
        >>> bool(np.allclose(v, ref, rtol=1e-6))
        True
    """
    return _coefficient_and_derivative(y, concentration)[0]


@log_negbin_coefficient.defjvp
def _log_negbin_coefficient_jvp(primals, tangents):
    y, phi = primals
    _, dphi = tangents
    value, deriv = _coefficient_and_derivative(y, phi)
    return value, deriv * dphi


class NegativeBinomialLogMean(dist.Distribution):
    """Negative binomial with log mean ``log_mean`` and concentration ``phi`` (NB2).

    The same distribution as ``NegativeBinomial2(exp(log_mean), phi)``: mean
    ``mu = exp(log_mean)``, variance ``mu + mu**2 / phi``. Its :meth:`log_prob` is
    written for speed and float32 accuracy (see the module docstring); sampling
    delegates to NumPyro's ``NegativeBinomial2``.

    Args:
        log_mean: ``eta``, real, any batch shape.
        concentration: ``phi > 0``, broadcastable against ``log_mean``.

    References:
        Hilbe, J. M. (2011). Negative Binomial Regression, 2nd ed., Cambridge
        University Press (the NB2 parameterization).

    Examples:
        >>> import numpyro.distributions as dist
        >>> d = NegativeBinomialLogMean(jnp.log(jnp.array([3.0, 4000.0])), 5.0)
        >>> ref = dist.NegativeBinomial2(jnp.array([3.0, 4000.0]), 5.0)
        >>> y = jnp.array([2, 3500])
        >>> bool(jnp.allclose(d.log_prob(y), ref.log_prob(y), rtol=1e-6))
        True
    """

    arg_constraints = {
        "log_mean": constraints.real,
        "concentration": constraints.positive,
    }
    support = constraints.nonnegative_integer
    is_discrete = True

    def __init__(self, log_mean, concentration, *, validate_args=None):
        self.log_mean, self.concentration = promote_shapes(log_mean, concentration)
        batch_shape = jax.lax.broadcast_shapes(
            jnp.shape(log_mean), jnp.shape(concentration)
        )
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @property
    def mean(self):
        return jnp.broadcast_to(jnp.exp(self.log_mean), self.batch_shape)

    @property
    def variance(self):
        mu = jnp.exp(self.log_mean)
        return jnp.broadcast_to(mu + mu * mu / self.concentration, self.batch_shape)

    def sample(self, key, sample_shape=()):
        return dist.NegativeBinomial2(
            jnp.exp(self.log_mean), self.concentration
        ).sample(key, sample_shape)

    @validate_sample
    def log_prob(self, value):
        eta, phi = self.log_mean, self.concentration
        log_phi = jnp.log(phi)
        y = jnp.asarray(value).astype(jnp.result_type(eta, phi, jnp.float32))
        u = eta - log_phi
        # softplus(u) and softplus(-u) share log1p(exp(-|u|)).
        shared = jnp.log1p(jnp.exp(-jnp.abs(u)))
        return (
            log_negbin_coefficient(value, phi)
            - y * (jnp.maximum(-u, 0.0) + shared)
            - phi * (jnp.maximum(u, 0.0) + shared)
        )
