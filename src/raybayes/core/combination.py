"""Combination rules of embarrassingly parallel MCMC, and when not to trust them.

Split the data into M shards and draw from each shard's subposterior
``q_m(theta) ∝ p(theta)^(1/M) p(y_m | theta)``; the product of the M subposteriors is
the full posterior. The rules here turn the subposterior draws into draws from (an
approximation of) that product. They are pure NumPy/JAX functions on arrays of shape
``(num_shards, num_draws, dim)``: row ``(m, s)`` is draw ``s`` of shard ``m``,
flattened. raybayes flattens the global sites in the unconstrained space (every site
mapped to the real line by ``numpyro.distributions.biject_to(support).inv``): there
the subposteriors sampled by NUTS multiply exactly to the full posterior (the log
Jacobians are scaled by ``1/M`` like the sites they belong to), and they are closest
to Gaussian, which the Gaussian rules assume.

* :func:`consensus`: consensus Monte Carlo (Scott et al. 2016), full-covariance
  weights; exact when every subposterior is Gaussian.
* :func:`gaussian_product`: the parametric rule (Neiswanger et al. 2013): the product
  of the Gaussian approximations of the subposteriors, sampled afresh.
* :func:`kernel_product`: the nonparametric and semiparametric rules of Neiswanger et
  al. (2013): the product of kernel density estimates, sampled by independent
  Metropolis within Gibbs. They do not assume Gaussian subposteriors, but need many
  draws per dimension; past about 10 dimensions they degrade (Scott 2017).
* :func:`diagnose_combination`: agreement of the subposteriors (Cochran's Q of their
  means; their spreads), their Gaussianity (marginal skewness/kurtosis, Mardia's
  statistics), and the share of combined draws where some subposterior has
  negligible density (kernel density level sets of each margin). ``summary`` says
  "combination reliable", or names the parameter and the reason.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from raybayes.errors import ConfigurationError, DataValidationError, RaybayesWarning

__all__ = [
    "CombinationDiagnostics",
    "combined_mean_mcse",
    "consensus",
    "diagnose_combination",
    "gaussian_product",
    "gaussian_product_moments",
    "kernel_product",
    "subposterior_moments",
]

#: Past this dimension, kernel-density combinations lose their accuracy (Scott 2017).
KERNEL_MAX_DIM = 10


def _as_draws(draws, name="draws") -> np.ndarray:
    x = np.asarray(draws, dtype=np.float64)
    if x.ndim != 3:
        raise ConfigurationError(
            f"{name} has shape {x.shape}; pass an array of shape "
            "(num_shards, num_draws, dim), e.g. np.stack(per_shard_draws)."
        )
    m, n, d = x.shape
    if m < 1 or d < 1:
        raise ConfigurationError(
            f"{name} has shape {x.shape}: no shards or no parameters."
        )
    if n < d + 2:
        raise ConfigurationError(
            f"{name} has {n} draws per shard for {d} parameters; a covariance needs at "
            f"least dim + 2 = {d + 2} draws (hundreds in practice). Draw more."
        )
    bad = ~np.isfinite(x)
    if bad.any():
        shard, draw, j = (int(i[0]) for i in np.nonzero(bad))
        raise DataValidationError(
            f"{name}: {int(bad.sum())} values are not finite (first: shard {shard}, "
            f"draw {draw}, parameter {j}: {x[shard, draw, j]}); drop the chain that "
            "produced them or rerun it.",
            num_bad_rows=int(bad.any(axis=2).sum()),
            example={"shard": shard, "draw": draw, "parameter": j},
        )
    return x


def subposterior_moments(draws) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of each subposterior's draws.

    Args:
        draws: ``(num_shards, num_draws, dim)``.

    Returns:
        ``(means (num_shards, dim), covariances (num_shards, dim, dim))``.

    Raises:
        ConfigurationError: wrong shape, or fewer than ``dim + 2`` draws.
        DataValidationError: non-finite draws.
    """
    x = _as_draws(draws)
    means = x.mean(axis=1)
    centred = x - means[:, None, :]
    covs = np.einsum("mni,mnj->mij", centred, centred) / (x.shape[1] - 1)
    return means, covs


def _inv_spd(a):
    """Inverse of symmetric positive definite matrices (batched), via Cholesky."""
    chol = np.linalg.cholesky(a)
    eye = np.broadcast_to(np.eye(a.shape[-1]), a.shape)
    inv_chol = np.linalg.solve(chol, eye)
    return np.swapaxes(inv_chol, -1, -2) @ inv_chol


def _precisions(covs, diagonal):
    if diagonal:
        return np.stack([np.diag(1.0 / np.diag(c)) for c in covs])
    try:
        return _inv_spd(covs)
    except np.linalg.LinAlgError:
        raise DataValidationError(
            "a subposterior's draws have a singular covariance (a parameter that does "
            "not move, or two that move together exactly); check the shard's chains, "
            "or use diagonal=True."
        ) from None


def gaussian_product_moments(means, covs) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the product of Gaussians ``N(means[m], covs[m])``.

    ``cov = (sum_m covs[m]^-1)^-1``, ``mean = cov @ sum_m covs[m]^-1 means[m]``.

    Args:
        means: ``(num_shards, dim)``.
        covs: ``(num_shards, dim, dim)``, symmetric positive definite.

    Returns:
        ``(mean (dim,), cov (dim, dim))``.

    References:
        Neiswanger, Wang & Xing (2014), Asymptotically exact, embarrassingly parallel
        MCMC, UAI. https://arxiv.org/abs/1311.4780
    """
    means, covs = np.asarray(means, np.float64), np.asarray(covs, np.float64)
    precs = _precisions(covs, False)
    cov = _inv_spd(precs.sum(axis=0))
    mean = cov @ np.einsum("mij,mj->i", precs, means)
    return mean, (cov + cov.T) / 2


def consensus(draws, *, diagonal: bool = False) -> np.ndarray:
    """Consensus Monte Carlo: precision-weighted averages of the subposterior draws.

    Combined draw ``s`` is ``(sum_m W_m)^-1 sum_m W_m x[m, s]`` with ``W_m`` the
    inverse of shard m's sample covariance (its diagonal with ``diagonal=True``).
    When every subposterior is Gaussian and the draws independent across shards, the
    combined draws are exact draws from the full posterior; otherwise the rule is an
    approximation that :func:`diagnose_combination` checks.

    Args:
        draws: ``(num_shards, num_draws, dim)`` subposterior draws, paired by index
            (draw ``s`` of every shard forms combined draw ``s``).
        diagonal: weight by the inverse variances only.

    Returns:
        ``(num_draws, dim)`` combined draws.

    Raises:
        ConfigurationError: wrong shape, or fewer than ``dim + 2`` draws per shard.
        DataValidationError: non-finite draws, or a singular covariance.

    References:
        Scott, Blocker, Bonassi, Chipman, George & McCulloch (2016), Bayes and big
        data: the consensus Monte Carlo algorithm, International Journal of
        Management Science and Engineering Management 11(2), 78-88.
        https://doi.org/10.1080/17509653.2016.1142191

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(2, 500, 1)) + np.array([0.0, 2.0])[:, None, None]
        >>> round(float(consensus(x).mean()), 1)  # halfway between the two shards
        1.0
    """
    x = _as_draws(draws)
    _, covs = subposterior_moments(x)
    w = _precisions(covs, diagonal)
    total = w.sum(axis=0)
    weighted = np.einsum("mij,mnj->ni", w, x)
    return np.linalg.solve(total, weighted.T).T


def gaussian_product(rng_key, draws, num_draws: int | None = None) -> np.ndarray:
    """The parametric rule: fresh draws from the product of Gaussian approximations.

    Each subposterior is replaced by the Gaussian with its sample mean and covariance;
    their product (:func:`gaussian_product_moments`) is sampled ``num_draws`` times.

    Args:
        rng_key: a JAX PRNG key.
        draws: ``(num_shards, num_draws_per_shard, dim)`` subposterior draws.
        num_draws: combined draws wanted (default: ``num_draws_per_shard``).

    Returns:
        ``(num_draws, dim)`` draws.

    Raises:
        ConfigurationError: wrong shape, or too few draws per shard.
        DataValidationError: non-finite draws, or a singular covariance.

    References:
        Neiswanger, Wang & Xing (2014), Asymptotically exact, embarrassingly parallel
        MCMC, UAI (the parametric estimator). https://arxiv.org/abs/1311.4780

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(4, 400, 2))
        >>> gaussian_product(jax.random.PRNGKey(0), x, 100).shape
        (100, 2)
    """
    x = _as_draws(draws)
    n = x.shape[1] if num_draws is None else int(num_draws)
    mean, cov = gaussian_product_moments(*subposterior_moments(x))
    chol = np.linalg.cholesky(cov)
    eps = np.asarray(jax.random.normal(rng_key, (n, x.shape[2])), np.float64)
    return mean + eps @ chol.T


def kernel_product(
    rng_key,
    draws,
    num_draws: int | None = None,
    *,
    semiparametric: bool = True,
) -> np.ndarray:
    """Product of kernel density estimates of the subposteriors, sampled by IMG.

    Each subposterior is estimated by a Gaussian kernel density estimate of its
    draws; the product of the M estimates is a mixture of ``T^M`` Gaussians, sampled
    by independent Metropolis within Gibbs over the mixture index, with the bandwidth
    annealed as ``h_i = i^(-1/(4+d))`` (Neiswanger et al. 2014, Algorithm 1). The
    semiparametric estimator multiplies the parametric (Gaussian product) estimate by
    a nonparametric correction, and behaves better with few draws. Neither assumes
    Gaussian subposteriors; both are asymptotically exact as the draws per shard
    grow.

    Coordinates are first whitened by the average subposterior covariance, so the
    isotropic kernel of the paper matches the draws' scale.

    Dimension limits: the kernel estimates need a number of draws that grows
    exponentially with the dimension ``d``; beyond about 10 parameters they lose to
    the Gaussian rules (Scott 2017), and this function warns.

    Args:
        rng_key: a JAX PRNG key.
        draws: ``(num_shards, num_draws_per_shard, dim)`` subposterior draws.
        num_draws: combined draws (default: ``num_draws_per_shard``); the sampler
            runs as many burn-in sweeps (bandwidth annealed) and then this many
            kept sweeps (bandwidth fixed at ``n^(-1/(4+d))``); the kept draws are
            autocorrelated (one Metropolis proposal per shard per sweep).
        semiparametric: the semiparametric estimator (default) or the
            nonparametric one.

    Returns:
        ``(num_draws, dim)`` draws.

    Raises:
        ConfigurationError: wrong shape, or too few draws per shard.
        DataValidationError: non-finite draws, or a singular covariance.

    Warns:
        RaybayesWarning: more than 10 parameters.

    References:
        Neiswanger, Wang & Xing (2014), Asymptotically exact, embarrassingly parallel
        MCMC, UAI. https://arxiv.org/abs/1311.4780
        Scott (2017), Comparing consensus Monte Carlo strategies for distributed
        Bayesian computation, Brazilian Journal of Probability and Statistics 31(4).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(2, 300, 1))
        >>> kernel_product(jax.random.PRNGKey(0), x, 200).shape
        (200, 1)
    """
    x = _as_draws(draws)
    m, n, d = x.shape
    t_total = n if num_draws is None else int(num_draws)
    if d > KERNEL_MAX_DIM:
        warnings.warn(
            f"kernel_product on {d} parameters: kernel-density combinations lose "
            f"accuracy beyond about {KERNEL_MAX_DIM} (Scott 2017); prefer consensus "
            "or the Gaussian product, and check diagnose_combination.",
            RaybayesWarning,
            stacklevel=2,
        )
    means, covs = subposterior_moments(x)
    centre = means.mean(axis=0)
    chol = np.linalg.cholesky(covs.mean(axis=0))
    z = np.linalg.solve(chol, (x - centre).reshape(-1, d).T).T.reshape(m, n, d)
    zm, zc = subposterior_moments(z)
    mu, sigma = gaussian_product_moments(zm, zc)
    lam, q = np.linalg.eigh(sigma)
    # log N(z[m, t] | zm[m], zc[m]) for every draw: the semiparametric denominator.
    zc_chol = np.linalg.cholesky(zc)
    r = np.linalg.solve(zc_chol[:, None], (z - zm[:, None])[..., None])[..., 0]
    logq = (
        -0.5 * (r**2).sum(-1)
        - np.log(np.diagonal(zc_chol, axis1=1, axis2=2)).sum(-1)[:, None]
    )

    z_j, logq_j = jnp.asarray(z), jnp.asarray(logq)
    mu_j, lam_j, q_j = jnp.asarray(mu), jnp.asarray(lam), jnp.asarray(q)
    shards = jnp.arange(m)

    def log_weight(t, h2):
        pts = z_j[shards, t]
        bar = pts.mean(axis=0)
        lw = -0.5 / h2 * jnp.sum((pts - bar) ** 2)
        if semiparametric:
            var = lam_j + h2 / m
            proj = q_j.T @ (bar - mu_j)
            lw = lw - 0.5 * jnp.sum(proj**2 / var) - 0.5 * jnp.sum(jnp.log(var))
            lw = lw - jnp.sum(logq_j[shards, t])
        return lw, bar

    # Annealed bandwidth during burn-in (Algorithm 1), then fixed at its final value
    # n^(-1/(4+d)) for the kept draws, so they all come from one estimate.
    burn = t_total

    def sweep(carry, i):
        t, key = carry
        h2 = (i + 1.0) ** (-2.0 / (4.0 + d))
        key, k_idx, k_acc, k_draw = jax.random.split(key, 4)
        proposals = jax.random.randint(k_idx, (m,), 0, n)
        logu = jnp.log(jax.random.uniform(k_acc, (m,)))

        def gibbs(j, t):
            cand = t.at[j].set(proposals[j])
            accept = log_weight(cand, h2)[0] - log_weight(t, h2)[0] > logu[j]
            return jnp.where(accept, cand, t)

        t = jax.lax.fori_loop(0, m, gibbs, t)
        _, bar = log_weight(t, h2)
        eps = jax.random.normal(k_draw, (d,))
        if semiparametric:
            var = 1.0 / (m / h2 + 1.0 / lam_j)
            mean = q_j @ (var * (q_j.T @ (m / h2 * bar) + (q_j.T @ mu_j) / lam_j))
            draw = mean + q_j @ (jnp.sqrt(var) * eps)
        else:
            draw = bar + jnp.sqrt(h2 / m) * eps
        return (t, key), draw

    key, k0 = jax.random.split(rng_key)
    t0 = jax.random.randint(k0, (m,), 0, n)
    steps = jnp.where(
        jnp.arange(burn + t_total) < burn,
        jnp.arange(burn + t_total) * (n - 1.0) / max(burn - 1, 1),
        n - 1.0,
    )
    _, out = jax.lax.scan(sweep, (t0, key), steps)
    out = np.asarray(out[burn:], np.float64)
    return centre + out @ chol.T


# --------------------------------------------------------------------- diagnostics
@dataclasses.dataclass
class CombinationDiagnostics:
    """Whether a combination of subposteriors can be trusted, and why not.

    Attributes:
        parameter_names: ``dim`` labels of the flattened parameters.
        num_shards: M.
        mean_q: Cochran's Q of the subposterior means,
            ``sum_m (mu_m - mu)' S_m^-1 (mu_m - mu)`` with ``mu`` the Gaussian-product
            mean; about chi-square with ``(M - 1) dim`` degrees of freedom when the
            shards agree (Bernstein-von Mises).
        mean_dof: its degrees of freedom.
        mean_p_value: its upper-tail p-value.
        parameter_p_values: ``(dim,)`` p-values of the same test, one parameter at a
            time (chi-square with M - 1 degrees of freedom).
        standardized_offsets: ``(M, dim)``, ``(mu_mj - mu_j) / sd_mj``.
        sd_ratio: ``(M, dim)``, shard sd over ``sqrt(M)`` times the combined sd; about
            1 when the shards carry equal information.
        skewness: ``(M, dim)`` marginal skewness of each subposterior.
        excess_kurtosis: ``(M, dim)`` marginal excess kurtosis.
        mardia_skewness: ``(M,)`` Mardia's multivariate skewness ``b_1`` (0 for a
            Gaussian).
        mardia_kurtosis_ratio: ``(M,)`` Mardia's kurtosis ``b_2 / (d (d + 2))`` (1 for
            a Gaussian).
        outside_share: share of the combined draws that lie in a hole of some
            subposterior's margin (see check 4 of :func:`diagnose_combination`).
        outside_share_by_shard: ``(M,)`` the same, shard by shard.
        outside_share_by_parameter: ``(M, dim)`` the same, per shard and parameter.
        mean_mcse: ``(dim,)`` Monte Carlo standard error of the combined mean, in
            combined posterior sds, from a moving-block bootstrap of every shard's
            draws (check 5 of :func:`diagnose_combination`): the error of the shard
            means and of the covariances that weight them.
        problems: one line per finding, naming the parameter and the reason.
    """

    parameter_names: list[str]
    num_shards: int
    mean_q: float
    mean_dof: int
    mean_p_value: float
    parameter_p_values: np.ndarray
    standardized_offsets: np.ndarray
    sd_ratio: np.ndarray
    skewness: np.ndarray
    excess_kurtosis: np.ndarray
    mardia_skewness: np.ndarray
    mardia_kurtosis_ratio: np.ndarray
    outside_share: float
    outside_share_by_shard: np.ndarray
    outside_share_by_parameter: np.ndarray
    mean_mcse: np.ndarray
    problems: list[str]

    @property
    def reliable(self) -> bool:
        """True when no diagnostic fired."""
        return not self.problems

    @property
    def summary(self) -> str:
        """One line: "combination reliable", or the findings (parameter and reason)."""
        if not self.problems:
            return "combination reliable"
        shown = "; ".join(self.problems[:3])
        more = len(self.problems) - 3
        tail = f"; and {more} more finding(s)" if more > 0 else ""
        return f"combination unreliable: {shown}{tail}"

    def __str__(self) -> str:
        lines = [self.summary]
        lines.append(
            f"  mean agreement: Cochran's Q = {self.mean_q:.1f} on {self.mean_dof} dof "
            f"(p = {self.mean_p_value:.3g})"
        )
        lines.append(
            f"  spread: shard sd / (sqrt(M) combined sd) in "
            f"[{self.sd_ratio.min():.2f}, {self.sd_ratio.max():.2f}]"
        )
        lines.append(
            f"  Gaussianity: max |skewness| {np.abs(self.skewness).max():.2f}, max "
            f"|excess kurtosis| {np.abs(self.excess_kurtosis).max():.2f}, Mardia "
            f"kurtosis ratio in [{self.mardia_kurtosis_ratio.min():.2f}, "
            f"{self.mardia_kurtosis_ratio.max():.2f}]"
        )
        lines.append(
            f"  combined draws where some subposterior has negligible density: "
            f"{100 * self.outside_share:.1f}% (at most "
            f"{100 * self.outside_share_by_parameter.max():.1f}% for one parameter)"
        )
        j = int(np.argmax(self.mean_mcse))
        lines.append(
            f"  Monte Carlo error of the combined mean: at most "
            f"{self.mean_mcse[j]:.3f} posterior sd ({self.parameter_names[j]})"
        )
        return "\n".join(lines)

    def to_attrs(self) -> dict:
        """Scalars and strings for ``InferenceData.attrs`` (netCDF-safe)."""
        return {
            "combination_summary": self.summary,
            "combination_reliable": int(self.reliable),
            "combination_problems": "\n".join(self.problems),
            "combination_mean_q": float(self.mean_q),
            "combination_mean_dof": int(self.mean_dof),
            "combination_mean_p_value": float(self.mean_p_value),
            "combination_outside_share": float(self.outside_share),
            "combination_max_mean_mcse": float(np.max(self.mean_mcse)),
            "combination_max_abs_skewness": float(np.abs(self.skewness).max()),
            "combination_max_abs_excess_kurtosis": float(
                np.abs(self.excess_kurtosis).max()
            ),
        }


def _marginal_shape(x):
    centred = x - x.mean(axis=1, keepdims=True)
    var = (centred**2).mean(axis=1)
    skew = (centred**3).mean(axis=1) / var**1.5
    kurt = (centred**4).mean(axis=1) / var**2 - 3.0
    return skew, kurt


def _mardia(x, max_draws=2000):
    """Mardia's b_1 (skewness) and b_2 / (d(d+2)) per shard."""
    m, n, d = x.shape
    step = max(1, n // max_draws)
    b1, b2 = np.empty(m), np.empty(m)
    for k in range(m):
        xs = x[k, ::step]
        c = xs - xs.mean(axis=0)
        s = np.cov(c.T, bias=True).reshape(d, d)
        w = np.linalg.solve(np.linalg.cholesky(s), c.T).T
        g = w @ w.T
        b1[k] = (g**3).mean()
        b2[k] = (np.diag(g) ** 2).mean() / (d * (d + 2))
    return b1, b2


def _holes(x, combined, level, density_ratio, max_draws, rng):
    """Combined draws that fall in a hole of a subposterior's margin.

    A combined value of parameter j is in a hole of shard m when it lies within the
    central ``level`` range of shard m's draws of j, yet a kernel density estimate
    of that margin is below ``density_ratio`` times the density of shard m's
    Gaussian approximation there (a valley between modes, the inside of a bend).

    Returns:
        ``(holes (M, dim, num_used) bool, combined subset used)``.
    """
    from scipy import stats

    m, n, d = x.shape
    comb = combined
    if comb.shape[0] > max_draws:
        comb = comb[rng.choice(comb.shape[0], max_draws, replace=False)]
    holes = np.zeros((m, d, comb.shape[0]), bool)
    tail = (1.0 - level) / 2
    for s in range(m):
        ref = x[s]
        if n > max_draws:
            ref = ref[rng.choice(n, max_draws, replace=False)]
        for j in range(d):
            v, c = ref[:, j], comb[:, j]
            sd = v.std()
            if sd == 0:
                continue
            lo, hi = np.quantile(v, [tail, 1.0 - tail])
            inside = (c >= lo) & (c <= hi)
            if not inside.any():
                continue
            # Half of Scott's bandwidth: fine enough to resolve a valley between modes.
            kde = stats.gaussian_kde(v, bw_method=0.5 * len(v) ** -0.2)
            gauss = stats.norm.pdf(c[inside], v.mean(), sd)
            holes[s, j, inside] = kde(c[inside]) < density_ratio * gauss
    return holes, comb


def _combined_mean(x):
    """Gaussian-product mean of the subposterior draws ``(M, n, d)``: the mean that
    consensus and the Gaussian product give, from the same sample moments."""
    means = x.mean(axis=1)
    c = x - means[:, None, :]
    covs = np.swapaxes(c, 1, 2) @ c / (x.shape[1] - 1)
    return gaussian_product_moments(means, covs)[0]


def combined_mean_mcse(
    draws, *, num_bootstrap: int = 200, block_length: int | None = None, seed: int = 0
) -> np.ndarray:
    """Monte Carlo standard error of the combined mean, weights' error included.

    Consensus Monte Carlo and the Gaussian product weight each shard's draws by the
    inverse of its *sample* covariance. With ``n`` draws per shard and ``d``
    parameters those weights carry a relative error of about ``sqrt(d / n)``, and it
    multiplies the spread of the shard means, which is about ``sqrt(M)`` combined
    posterior sds each (every shard sees ``1/M`` of the data). The resulting error of
    the combined mean is about ``sqrt(d / n)`` combined sds per parameter, whatever
    M: with 1,000 draws and 21 parameters, 0.15 sd, and over 0.3 sd for the worst of
    the 21. The shards' own ESS does not show it. This function measures it by a
    moving-block bootstrap (Künsch 1989) of every shard's draws, recomputing the
    shard means and covariances and their Gaussian product each time.

    Args:
        draws: ``(num_shards, num_draws, dim)`` subposterior draws, each shard's
            chains one after another.
        num_bootstrap: bootstrap replicates (the relative error of the result is about
            ``1 / sqrt(2 num_bootstrap)``).
        block_length: draws per block (default ``num_draws ** (1/3)``, rounded), long
            enough to carry the autocorrelation of MCMC draws.
        seed: integer seed of the resampling.

    Returns:
        ``(dim,)`` standard errors of the combined mean, in units of the combined
        posterior sd (the sd of the Gaussian product of the subposteriors).

    Raises:
        ConfigurationError: wrong shape, or too few draws per shard.
        DataValidationError: non-finite draws, or a singular covariance.

    References:
        Künsch (1989), The jackknife and the bootstrap for general stationary
        observations, Annals of Statistics 17(3), 1217-1241.

    Examples:
        >>> rng = np.random.default_rng(0)  # 4 shards that agree, 21 parameters
        >>> x = rng.normal(size=(4, 1000, 21)) + rng.normal(size=(4, 1, 21))
        >>> bool(combined_mean_mcse(x, num_bootstrap=50).max() > 0.1)
        True
    """
    x = _as_draws(draws)
    m, n, d = x.shape
    length = block_length or max(1, int(round(n ** (1.0 / 3.0))))
    length = min(int(length), n)
    num_blocks = -(-n // length)
    rng = np.random.default_rng(seed)
    _, cov = gaussian_product_moments(*subposterior_moments(x))
    sd = np.sqrt(np.diag(cov))
    reps = np.empty((int(num_bootstrap), d))
    offsets = np.arange(length)
    for b in range(int(num_bootstrap)):
        starts = rng.integers(0, n - length + 1, size=(m, num_blocks))
        idx = (starts[:, :, None] + offsets).reshape(m, -1)[:, :n]
        reps[b] = _combined_mean(np.take_along_axis(x, idx[:, :, None], axis=1))
    return reps.std(axis=0, ddof=1) / sd


def diagnose_combination(
    draws,
    combined,
    parameter_names: Sequence[str] | None = None,
    *,
    alpha: float = 0.001,
    sd_ratio_bounds: tuple[float, float] = (0.5, 2.0),
    max_abs_skewness: float = 0.5,
    max_abs_excess_kurtosis: float = 1.0,
    level: float = 0.99,
    density_ratio: float = 0.1,
    max_outside_share: float = 0.05,
    max_draws: int = 2000,
    max_mean_mcse: float = 0.1,
    num_bootstrap: int = 200,
    seed: int = 0,
) -> CombinationDiagnostics:
    """Check whether combined subposterior draws can stand for the full posterior.

    Five checks, each of which names the parameter (and shard) that fails it:

    1. Agreement of the means: Cochran's Q, the heterogeneity statistic of
       meta-analysis, of the subposterior means around their precision-weighted mean.
       When the model fits every shard and the subposteriors are near Gaussian,
       shard m's mean varies around the truth with about its own covariance
       (Bernstein-von Mises), so Q is about chi-square with ``(M - 1) dim`` degrees of
       freedom; it fires when p < ``alpha`` overall, or p < ``alpha / dim`` for one
       parameter.
    2. Agreement of the spreads: each shard's sd should be about ``sqrt(M)`` times the
       combined sd (equal information per shard); fires outside ``sd_ratio_bounds``.
    3. Gaussianity of each subposterior, which consensus and the Gaussian product
       assume: marginal skewness and excess kurtosis beyond the thresholds (banana
       shapes skew a margin; two modes make it platykurtic). Mardia's multivariate
       skewness and kurtosis are reported too.
    4. Mass where some subposterior has none: a combined value of parameter j is
       in a hole of shard m when it lies within the central ``level`` range of
       shard m's draws of j, but a kernel density estimate of that margin is below
       ``density_ratio`` times the density of shard m's Gaussian approximation
       there (a valley between modes, the inside of a bend). It fires when more than
       ``max_outside_share`` of the combined draws are in a hole of some shard.
       Combined draws beyond a shard's range are left to check 1 (the means
       scatter by chance, so the combined mass may sit in a shard's tail, where a
       density estimate from the draws is poor); a hole that shows only jointly,
       not in any margin (the hollow of a crescent), is left to check 3.
    5. Monte Carlo error of the combined mean (:func:`combined_mean_mcse`): the
       Gaussian rules weight the shards by inverse *sample* covariances, whose error
       (about ``sqrt(dim / n)`` relative, with ``n`` draws per shard) multiplies the
       spread of the shard means; the combined mean then errs by about
       ``sqrt(dim / n)`` posterior sds per parameter, whatever M, and nothing in the
       shards' own ESS shows it. Fires when a parameter's standard error exceeds
       ``max_mean_mcse`` combined sds; the remedy is more draws per shard (the
       error falls as ``1 / sqrt(n)``).

    The Gaussianity thresholds allow for the Monte Carlo error of the sample
    moments: a margin fires when ``|skewness| - 3 sqrt(6 / n)`` exceeds
    ``max_abs_skewness`` or ``|excess kurtosis| - 3 sqrt(24 / n)`` exceeds
    ``max_abs_excess_kurtosis`` (``n`` draws per shard, taken as independent).

    Args:
        draws: ``(num_shards, num_draws, dim)`` subposterior draws (unconstrained).
        combined: ``(num_combined, dim)`` combined draws, same space.
        parameter_names: ``dim`` labels (default ``"x[j]"``).
        alpha: level of the agreement test.
        sd_ratio_bounds: accepted range of shard sd / (sqrt(M) combined sd).
        max_abs_skewness: largest accepted marginal |skewness|.
        max_abs_excess_kurtosis: largest accepted marginal |excess kurtosis|.
        level: central mass of each subposterior's range in check 4.
        density_ratio: a hole's density, relative to the Gaussian approximation's.
        max_outside_share: largest accepted share of combined draws in holes.
        max_draws: at most this many draws of each set enter check 4 and Mardia's
            statistics (a random subset, from ``seed``).
        max_mean_mcse: largest accepted Monte Carlo standard error of a combined
            mean, in combined posterior sds (check 5).
        num_bootstrap: bootstrap replicates of check 5.
        seed: seed of that subset and of the bootstrap.

    Returns:
        :class:`CombinationDiagnostics`; ``.summary`` is the one-line verdict.

    Raises:
        ConfigurationError: shapes that disagree, or too few draws.
        DataValidationError: non-finite draws.

    References:
        Cochran (1954), The combination of estimates from different experiments,
        Biometrics 10(1), 101-129.
        Mardia (1970), Measures of multivariate skewness and kurtosis with
        applications, Biometrika 57(3), 519-530.
        Scott (1992), Multivariate Density Estimation, Wiley (the kernel density
        bandwidth).
        Künsch (1989), The jackknife and the bootstrap for general stationary
        observations, Annals of Statistics 17(3) (the moving-block bootstrap).

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> x = rng.normal(size=(2, 1000, 2))
        >>> diagnose_combination(x, consensus(x)).summary
        'combination reliable'
    """
    from scipy import stats

    x = _as_draws(draws)
    m, n, d = x.shape
    comb = np.asarray(combined, np.float64)
    if comb.ndim != 2 or comb.shape[1] != d:
        raise ConfigurationError(
            f"combined has shape {comb.shape}; it must be (num_combined, {d}) to match "
            f"draws {x.shape}."
        )
    names = (
        list(parameter_names)
        if parameter_names is not None
        else [f"x[{j}]" for j in range(d)]
    )
    if len(names) != d:
        raise ConfigurationError(
            f"parameter_names has {len(names)} labels for {d} parameters."
        )
    rng = np.random.default_rng(seed)
    problems: list[tuple[float, str]] = []  # (severity, text)

    means, covs = subposterior_moments(x)
    mu, cov = gaussian_product_moments(means, covs)
    sds = np.sqrt(np.diagonal(covs, axis1=1, axis2=2))
    diff = means - mu
    precs = _precisions(covs, False)
    q = float(np.einsum("mi,mij,mj->", diff, precs, diff))
    dof = (m - 1) * d
    p_all = float(stats.chi2.sf(q, dof)) if dof > 0 else 1.0
    # One parameter at a time: marginal precision-weighted mean.
    w = 1.0 / sds**2
    mu_marg = (w * means).sum(0) / w.sum(0)
    q_j = (w * (means - mu_marg) ** 2).sum(0)
    p_j = stats.chi2.sf(q_j, m - 1) if m > 1 else np.ones(d)
    offsets = (means - mu_marg) / sds
    if m > 1 and (p_all < alpha or p_j.min() < alpha / d):
        j = int(np.argmin(p_j))
        s = int(np.argmax(np.abs(offsets[:, j])))
        problems.append(
            (
                5.0,
                f"{names[j]}: subposterior means disagree (Cochran's Q p = {p_all:.2g} "
                f"overall, {p_j[j]:.2g} for {names[j]}; shard {s} is "
                f"{offsets[s, j]:+.1f} of its sds from the combined mean)",
            )
        )

    comb_sd = np.sqrt(np.diag(cov))
    sd_ratio = sds / (np.sqrt(m) * comb_sd)
    lo, hi = sd_ratio_bounds
    if m > 1:
        bad = (sd_ratio < lo) | (sd_ratio > hi)
        if bad.any():
            s, j = np.unravel_index(np.argmax(np.abs(np.log(sd_ratio))), sd_ratio.shape)
            problems.append(
                (
                    3.0,
                    f"{names[j]}: subposterior spreads disagree (shard {s} sd is "
                    f"{sd_ratio[s, j]:.2f} x sqrt(M) x combined sd; accepted "
                    f"{lo}-{hi})",
                )
            )

    skew, kurt = _marginal_shape(x)
    se_skew, se_kurt = np.sqrt(6.0 / n), np.sqrt(24.0 / n)
    excess = np.maximum(
        (np.abs(skew) - 3 * se_skew) / max_abs_skewness,
        (np.abs(kurt) - 3 * se_kurt) / max_abs_excess_kurtosis,
    )
    if (excess > 1).any():
        s, j = np.unravel_index(np.argmax(excess), excess.shape)
        problems.append(
            (
                4.0,
                f"{names[j]}: subposterior {s} is not Gaussian (skewness "
                f"{skew[s, j]:+.2f}, excess kurtosis {kurt[s, j]:+.2f})",
            )
        )
    b1, b2 = _mardia(x, max_draws)

    holes, comb_sub = _holes(x, comb, level, density_ratio, max_draws, rng)
    hole_share = holes.mean(axis=2)  # (M, dim)
    share_by_shard = holes.any(axis=1).mean(axis=1)
    share = float(holes.any(axis=(0, 1)).mean())
    if m > 1 and hole_share.max() > max_outside_share:
        s, j = np.unravel_index(np.argmax(hole_share), hole_share.shape)
        problems.append(
            (
                4.5,
                f"{names[j]}: {100 * hole_share[s, j]:.0f}% of the combined draws lie "
                f"where subposterior {s} has negligible density (inside the range of "
                f"its draws of {names[j]}, at under {density_ratio:g} x the density "
                "of its Gaussian approximation)",
            )
        )

    mcse = combined_mean_mcse(x, num_bootstrap=num_bootstrap, seed=seed)
    if m > 1 and mcse.max() > max_mean_mcse:
        j = int(np.argmax(mcse))
        needed = int(np.ceil(n * (mcse[j] / max_mean_mcse) ** 2))
        problems.append(
            (
                4.2,
                f"{names[j]}: the combined mean is uncertain by +/-{mcse[j]:.2f} "
                f"posterior sd (Monte Carlo error of the shard covariances that weight "
                f"the shards: {n} draws per shard for {d} parameters); draw about "
                f"{needed} per shard for {max_mean_mcse:g}",
            )
        )

    problems.sort(key=lambda p: -p[0])
    return CombinationDiagnostics(
        parameter_names=names,
        num_shards=m,
        mean_q=q,
        mean_dof=dof,
        mean_p_value=p_all,
        parameter_p_values=np.asarray(p_j),
        standardized_offsets=offsets,
        sd_ratio=sd_ratio,
        skewness=skew,
        excess_kurtosis=kurt,
        mardia_skewness=b1,
        mardia_kurtosis_ratio=b2,
        outside_share=share,
        outside_share_by_shard=share_by_shard,
        outside_share_by_parameter=hole_share,
        mean_mcse=mcse,
        problems=[p[1] for p in problems],
    )
