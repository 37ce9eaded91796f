"""Variational families in the flat layout of :class:`~raybayes.core.ShardLogDensity`.

The global block (``G`` unconstrained global parameters) is either mean-field
Normal (NumPyro's ``AutoNormal``) or low-rank multivariate Normal (NumPyro's
``AutoLowRankMultivariateNormal``); the local block (one row of ``k`` values per
entity of the split plate) is mean-field Normal and lives on the shard that owns
the entity. Parameterization follows NumPyro: ``scale = softplus(scale_raw)``,
initial scale ``init_scale`` (0.1), low-rank ``cov = (W s)(W s)^T + diag(s^2)``.

The structured family (``"structured"``) conditions each entity's block on the
globals: ``g = mu + L eps`` with a full-rank (or, given ``rank``, low-rank)
factor ``L``, and for entity ``i``

    z_i = m_i + A_i eps + L_i eps_i,   i.e.   q(z_i | g) = N(m_i + B_i (g - mu),
                                                             L_i L_i^T),

with ``B_i = A_i L^{-1}`` (full rank), ``A_i`` ``(k, G)`` and ``L_i`` ``(k, k)``
lower triangular, held by the shard that owns ``i`` (Hoffman & Blei, "Structured
stochastic variational inference", AISTATS 2015; Agrawal & Domke, "Amortized
variational inference for simple hierarchical models", NeurIPS 2021). Given the
globals the entities stay independent, so the entropy is
``H[q(g)] + sum_i log|det L_i| + const`` and the ELBO still splits over shards.
The coupling is kept in the whitened globals ``eps`` (``A_i`` rather than
``B_i``) so that the locals need only the step's noise, never ``L^{-1}``.

Scaled parameterization: every off-diagonal factor is relative to its row's scale
``s`` and divided by the square root of its width, ``L = diag(s) (I +
tril(W, -1) / sqrt(G))``, ``L_i = diag(s_i) (I + tril(T_i, -1))``, ``A_i =
diag(s_i) C_i / sqrt(G + rank)``, all starting at 0 (the mean-field guide). One
Adam step then changes a row's variance by about ``lr^2`` relative, however many
globals there are; in the plain parameterization one step moves each of the ``G``
entries by ``lr`` and a few hundred globals blow up the variance in a few steps.

Pure JAX; no Ray.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal

from raybayes.errors import ConfigurationError

__all__ = [
    "GlobalGuide",
    "resolve_guide",
    "softplus_inv",
]


def softplus_inv(y):
    """Inverse of ``softplus``: ``log(expm1(y))``."""
    y = np.asarray(y, dtype=np.float64)
    return np.log(np.expm1(y))


class GlobalGuide:
    """The variational family of the global block.

    Args:
        num_global: G.
        family: ``"normal"`` (mean-field), ``"lowrank"`` or ``"structured"``
            (the global block of the structured guide: full-rank, or low-rank when
            ``rank`` is given).
        rank: rank of the low-rank factor (default ``round(sqrt(G))``, NumPyro's;
            for ``"structured"``, ``None`` means full rank).
        init_scale: initial standard deviation of every coordinate.

    Parameters (a dict of arrays, the pytree that the optimizer updates):
        ``loc`` ``(G,)``, ``scale_raw`` ``(G,)``; for a low-rank block
        ``cov_factor`` ``(G, rank)``; for a full-rank block ``tril`` ``(G, G)``
        (its strictly lower triangle is used: ``L = diag(scale) (I + tril(tril,
        -1) / sqrt(G))``, the family of NumPyro's ``AutoMultivariateNormal``).
    """

    def __init__(
        self, num_global: int, family: str = "normal", rank=None, init_scale=0.1
    ):
        self.num_global = int(num_global)
        self.family = family
        if family == "lowrank" or (family == "structured" and rank is not None):
            self.block = "lowrank"
            self.rank = (
                int(rank) if rank is not None else max(1, round(np.sqrt(num_global)))
            )
        else:
            self.block = "full" if family == "structured" else "normal"
            self.rank = 0
        self.init_scale = float(init_scale)

    @property
    def noise_size(self) -> int:
        """Standard-normal values per draw: ``G + rank``."""
        return self.num_global + self.rank

    def init(self, loc=None, dtype=np.float32) -> dict:
        G = self.num_global
        params = {
            "loc": np.zeros(G, dtype) if loc is None else np.asarray(loc, dtype),
            "scale_raw": np.full(G, softplus_inv(self.init_scale), dtype),
        }
        if self.block == "lowrank":
            params["cov_factor"] = np.zeros((G, self.rank), dtype)
        elif self.block == "full":
            params["tril"] = np.zeros((G, G), dtype)
        return params

    def scale_tril(self, params):
        """The full-rank block's Cholesky factor ``L`` ``(G, G)``."""
        scale = jax.nn.softplus(params["scale_raw"])
        G = self.num_global
        unit = jnp.eye(G, dtype=scale.dtype) + jnp.tril(params["tril"], -1) / np.sqrt(G)
        return scale[:, None] * unit

    def deviation(self, params, eps):
        """``g - loc`` ``(K, G)`` of the draws from noise ``eps`` ``(K, G + rank)``."""
        scale = jax.nn.softplus(params["scale_raw"])
        G = self.num_global
        if self.block == "full":
            return eps[:, :G] @ self.scale_tril(params).T
        dev = scale * eps[:, :G]
        if self.block == "lowrank":
            factor = params["cov_factor"] * scale[:, None]
            dev = dev + eps[:, G:] @ factor.T
        return dev

    def sample(self, params, eps):
        """Reparameterized draws ``(K, G)`` from noise ``eps`` ``(K, G + rank)``."""
        return params["loc"] + self.deviation(params, eps)

    def entropy(self, params):
        """Entropy of q (nats), the exact term of the ELBO."""
        scale = jax.nn.softplus(params["scale_raw"])
        if self.block == "lowrank":
            factor = params["cov_factor"] * scale[:, None]
            return dist.LowRankMultivariateNormal(
                params["loc"], factor, scale**2
            ).entropy()
        if self.block == "full":  # log det L = sum log diag(L)
            G = self.num_global
            return 0.5 * G * (1.0 + jnp.log(2 * jnp.pi)) + jnp.sum(jnp.log(scale))
        return jnp.sum(dist.Normal(params["loc"], scale).entropy())

    def marginal_scale(self, params):
        """Posterior standard deviation of each coordinate ``(G,)``."""
        scale = jax.nn.softplus(params["scale_raw"])
        if self.block == "full":
            return jnp.sqrt(jnp.sum(self.scale_tril(params) ** 2, axis=1))
        var = scale**2
        if self.block == "lowrank":
            var = var + jnp.sum((params["cov_factor"] * scale[:, None]) ** 2, axis=1)
        return jnp.sqrt(var)


_FAMILIES = {
    "normal": "normal",
    "autonormal": "normal",
    "meanfield": "normal",
    "lowrank": "lowrank",
    "autolowrankmultivariatenormal": "lowrank",
    "structured": "structured",
}


def resolve_guide(guide, model, rank=None, init_scale=0.1):
    """``(family, rank, init_scale)`` from a name, a NumPyro autoguide class or instance.

    Accepted: ``"normal"``/``AutoNormal`` (mean-field everywhere),
    ``"lowrank"``/``AutoLowRankMultivariateNormal`` (low-rank global block,
    mean-field local blocks) and ``"structured"`` (full-rank global block, each
    entity's block full-rank and conditioned on the globals; see the module). An
    instance must have been built for ``model``.

    Raises:
        ConfigurationError: another guide, an instance built for another model, or
            a ``rank`` that is not an integer >= 1.
    """
    if isinstance(guide, (AutoNormal, AutoLowRankMultivariateNormal)):
        if (
            guide.model is not model
            and getattr(guide.model, "__wrapped__", None) is not model
        ):
            name = getattr(guide.model, "__name__", repr(guide.model))
            raise ConfigurationError(
                f"guide={type(guide).__name__}({name}) was built for model {name!r}, "
                f"not for {getattr(model, '__name__', repr(model))!r}; its sites do not "
                "match the model's. Build the guide from the model you fit, or pass "
                "guide='normal' / 'lowrank'."
            )
        init_scale = float(getattr(guide, "_init_scale", init_scale))
        if isinstance(guide, AutoLowRankMultivariateNormal):
            rank = getattr(guide, "rank", rank)
        guide = type(guide)
    if isinstance(guide, type):
        guide = guide.__name__
    if not isinstance(guide, str) or guide.lower() not in _FAMILIES:
        raise ConfigurationError(
            f"guide={guide!r} is not supported by distributed SVI; use 'normal' "
            "(AutoNormal), 'lowrank' (AutoLowRankMultivariateNormal for the global "
            "block, mean-field for the per-entity block) or 'structured' (each "
            "entity's block conditioned on the globals)."
        )
    if rank is not None and (
        isinstance(rank, bool) or int(rank) != rank or rank < 1
    ):
        raise ConfigurationError(
            f"rank={rank!r}; use an integer >= 1 (the rank of the low-rank global "
            "factor) or None (lowrank: round(sqrt(G)); structured: full rank)."
        )
    return _FAMILIES[guide.lower()], rank, init_scale
