"""The conjugate hierarchical normal model of the MAP, Laplace, VL-BFGS and SVI tests.

``mu ~ N(0, s0)``, ``theta_j ~ N(mu, tau)`` for ``j < J``, ``y_i ~ N(theta_{g(i)},
sigma)``. Every conditional is Gaussian, so the posterior of ``z = (mu, theta_1..J)``
is Gaussian and known in closed form: its precision is
``D'D / tau^2 + A'A / sigma^2 + e_0 e_0' / s0^2`` (``A`` maps ``z`` to the observations'
means, ``D z = theta - mu``), and its mean (= mode) solves ``prec m = A'y / sigma^2``.
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist

from raybayes.core import Partition


def hierarchical_normal_model(s0: float, tau: float, sigma: float):
    """The NumPyro model with these scales: ``model(group_idx, num_groups, y=None)``."""

    def hierarchical_normal(group_idx, num_groups, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, s0))
        with numpyro.plate("groups", num_groups):
            theta = numpyro.sample("theta", dist.Normal(mu, tau))
        with numpyro.plate("obs", group_idx.shape[0]):
            numpyro.sample("y", dist.Normal(theta[group_idx], sigma), obs=y)

    return hierarchical_normal


def simulate(num_groups, counts, theta_mean, tau, sigma, shuffle=False, seed=0):
    """Data from the model: ``counts = (low, high)`` observations per group (high
    excluded); ``shuffle`` puts the observations in random order.

    Returns:
        ``dict(group_idx, num_groups, y)``, the model's keyword arguments.
    """
    rng = np.random.default_rng(seed)
    group_idx = np.repeat(np.arange(num_groups), rng.integers(*counts, num_groups))
    group_idx = group_idx.astype(np.int32)
    if shuffle:
        rng.shuffle(group_idx)
    theta = theta_mean + tau * rng.standard_normal(num_groups)
    y = theta[group_idx] + sigma * rng.standard_normal(len(group_idx))
    return dict(group_idx=group_idx, num_groups=num_groups, y=y.astype(np.float32))


def posterior(kwargs, s0, tau, sigma):
    """``(mean, precision, A)`` of the exact posterior of ``(mu, theta_1..J)``."""
    group_idx, num_groups = kwargs["group_idx"], kwargs["num_groups"]
    y = np.asarray(kwargs["y"], np.float64)
    n = len(y)
    A = np.zeros((n, num_groups + 1))
    A[np.arange(n), 1 + group_idx] = 1.0
    D = np.zeros((num_groups, num_groups + 1))
    D[:, 0], D[:, 1:] = -1.0, np.eye(num_groups)
    prec = D.T @ D / tau**2 + A.T @ A / sigma**2
    prec[0, 0] += 1.0 / s0**2
    mean = np.linalg.solve(prec, A.T @ y / sigma**2)
    return mean, prec, A


#: How the tests split the model: groups (and their observations) over shards.
PARTITION = Partition(
    "groups",
    index_arg="group_idx",
    obs_args=("group_idx", "y"),
    obs_plate="obs",
    size_arg="num_groups",
)
