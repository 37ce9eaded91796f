"""Vectorized inference for a batch of independent models (pure JAX / NumPyro).

A batch holds ``B`` models of the same structure with different data (padded to
the same length; padded steps are missing observations, which leave an HMM's
likelihood unchanged). NUTS runs on ``B x C`` lanes with ``jax.vmap``: every lane
(one chain of one model) has its own state, step size and mass matrix, adapted
from its own draws only; nothing is shared between models or chains.

Initialization: a short vmapped Adam run to the MAP of each model (unconstrained
space), then a small jitter per chain. Sampling runs to a target: after the first
``num_samples`` draws, models whose bulk/tail ESS or R-hat miss the target get more
draws (up to ``max_extensions`` times).

No Ray here; :class:`raybayes.fleet.worker.FleetBatchWorker` calls these functions.

References:
    Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.
    Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), Rank-normalization,
    folding, and localization: an improved R-hat, Bayesian Analysis 16(2).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from numpyro.infer.hmc import hmc
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy

__all__ = ["BatchSampler", "BatchDraws", "diagnostics"]


class BatchDraws(NamedTuple):
    """Draws of a batch of models.

    Attributes:
        draws: site -> ``(B, C, S, *site_shape)`` constrained draws.
        diverging: ``(B, C, S)`` bool.
        num_steps: ``(B, C, S)`` leapfrog steps per draw.
        step_size: ``(B, C)`` adapted step size of each chain.
        num_gradients: total gradient evaluations per model ``(B,)``.
    """

    draws: dict
    diverging: np.ndarray
    num_steps: np.ndarray
    step_size: np.ndarray
    num_gradients: np.ndarray


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def diagnostics(draws: dict) -> dict:
    """Per-parameter R-hat, bulk/tail ESS, MCSE, mean, sd and 5/95% quantiles.

    Args:
        draws: site -> ``(C, S, *site_shape)`` draws of ONE model.

    Returns:
        dict of lists: ``parameter``, ``mean``, ``sd``, ``q05``, ``q95``,
        ``mcse_mean``, ``ess_bulk``, ``ess_tail``, ``r_hat`` (one entry per scalar).
    """
    az = _arviz()
    out = {k: [] for k in ("parameter", "mean", "sd", "q05", "q95", "mcse_mean",
                           "ess_bulk", "ess_tail", "r_hat")}
    for name, value in draws.items():
        value = np.asarray(value, np.float64)
        flat = value.reshape(value.shape[:2] + (-1,))
        for j in range(flat.shape[-1]):
            idx = np.unravel_index(j, value.shape[2:]) if value.ndim > 2 else ()
            x = flat[..., j]
            label = name + ("[" + ",".join(map(str, idx)) + "]" if idx else "")
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                out["parameter"].append(label)
                out["mean"].append(float(x.mean()))
                out["sd"].append(float(x.std(ddof=1)))
                out["q05"].append(float(np.quantile(x, 0.05)))
                out["q95"].append(float(np.quantile(x, 0.95)))
                out["mcse_mean"].append(float(az.mcse(x, method="mean")))
                out["ess_bulk"].append(float(az.ess(x, method="bulk")))
                out["ess_tail"].append(float(az.ess(x, method="tail")))
                out["r_hat"].append(float(az.rhat(x)))
    return out


def _is_constant(x):
    return np.ptp(x) == 0


class BatchSampler:
    """NUTS (or MAP / Laplace) for a batch of models sharing one structure.

    Args:
        model: a NumPyro model called as ``model(y, mask=mask, covariates=X,
            **model_kwargs)``; ``covariates`` is passed only when not ``None``.
        model_kwargs: static keyword arguments (e.g. ``num_states``).
        num_chains: chains per model.
        num_warmup: warmup iterations per chain.
        num_samples: draws per chain in the first round.
        target_ess: bulk ESS every parameter must reach.
        target_r_hat: R-hat every parameter must stay below.
        max_extensions: extra rounds of ``num_samples`` draws for models that miss.
        target_accept_prob, max_tree_depth: NUTS settings.
        map_steps: Adam steps of the MAP initialization.
    """

    def __init__(
        self,
        model,
        model_kwargs: dict | None = None,
        *,
        num_chains: int = 4,
        num_warmup: int = 300,
        num_samples: int = 300,
        target_ess: float = 400.0,
        target_r_hat: float = 1.01,
        max_extensions: int = 3,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        map_steps: int = 300,
        vectorize: bool | None = None,
    ):
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.num_chains = num_chains
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.target_ess = target_ess
        self.target_r_hat = target_r_hat
        self.max_extensions = max_extensions
        self.target_accept_prob = target_accept_prob
        self.max_tree_depth = max_tree_depth
        self.map_steps = map_steps
        # vmap over models x chains pays off on accelerators; on CPU the vmapped
        # NUTS tree (a while loop that runs as long as its slowest lane, with
        # masked selects on every lane) was measured slower than a loop over
        # lanes of the same jitted chain, so the default follows the platform.
        self.vectorize = jax.default_backend() != "cpu" if vectorize is None else vectorize
        self._fns = None

    # -- pieces ------------------------------------------------------------------------
    def _kwargs(self, mask, covariates):
        kw = dict(self.model_kwargs, mask=mask)
        if covariates is not None:
            kw["covariates"] = covariates
        return kw

    def _potential(self, z, y, mask, covariates):
        return potential_energy(self.model, (y,), self._kwargs(mask, covariates), z)

    def _constrain(self, z, y, mask, covariates):
        return constrain_fn(self.model, (y,), self._kwargs(mask, covariates), z)

    def _template(self, y, mask, covariates):
        info = initialize_model(
            jax.random.PRNGKey(0), self.model, model_args=(jnp.asarray(y[0]),),
            model_kwargs=self._kwargs(jnp.asarray(mask[0]),
                                      None if covariates is None else jnp.asarray(covariates[0])),
        )
        return info.param_info.z

    def _build(self, z_template):
        init_kernel, sample_kernel = hmc(
            potential_fn_gen=lambda y, mask, cov: (lambda z: self._potential(z, y, mask, cov)),
            algo="NUTS",
        )
        num_warmup, tap, mtd = self.num_warmup, self.target_accept_prob, self.max_tree_depth

        def find_map(z0, y, mask, cov):
            opt = optax.adam(0.05)

            def step(carry, _):
                z, s = carry
                g = jax.grad(self._potential)(z, y, mask, cov)
                g = jax.tree_util.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0), g)
                upd, s = opt.update(g, s, z)
                return (optax.apply_updates(z, upd), s), None

            (z, _), _ = lax.scan(step, (z0, opt.init(z0)), None, length=self.map_steps)
            return z

        def one_chain_run(key, z0, y, mask, cov, length):
            state = init_kernel(
                z0, num_warmup, model_args=(y, mask, cov), rng_key=key,
                target_accept_prob=tap, max_tree_depth=mtd,
            )
            return _advance(state, y, mask, cov, num_warmup, length)

        def _advance(state, y, mask, cov, warm, length):
            def body(s, _):
                s = sample_kernel(s, model_args=(y, mask, cov))
                return s, (s.z, s.diverging, s.num_steps)

            if warm:
                state, (_, _, wsteps) = lax.scan(body, state, None, length=warm)
                wgrads = jnp.sum(wsteps)
            else:
                wgrads = jnp.zeros((), jnp.int32)
            state, (zs, div, nst) = lax.scan(body, state, None, length=length)
            return state, zs, div, nst, wgrads

        def run_batch(keys, z_init, y, mask, cov, length):
            # keys (B, C, 2); z_init leaves (B, C, ...); y, mask (B, T); cov (B, T, P)|None
            def per_model(k, z0, yy, mm, cc):
                return jax.vmap(lambda kk, zz: one_chain_run(kk, zz, yy, mm, cc, length))(k, z0)

            return jax.vmap(per_model)(keys, z_init, y, mask, cov)

        def extend_batch(states, y, mask, cov, length):
            def per_model(st, yy, mm, cc):
                return jax.vmap(lambda s: _advance(s, yy, mm, cc, 0, length))(st)

            return jax.vmap(per_model)(states, y, mask, cov)

        def constrain_batch(zs, y, mask, cov):
            # zs leaves (B, C, S, ...)
            def per_model(z, yy, mm, cc):
                return jax.vmap(jax.vmap(lambda q: self._constrain(q, yy, mm, cc)))(z)

            return jax.vmap(per_model)(zs, y, mask, cov)

        if not self.vectorize:
            run_one = jax.jit(one_chain_run, static_argnums=5)
            extend_one = jax.jit(
                lambda st, yy, mm, cc, n: _advance(st, yy, mm, cc, 0, n), static_argnums=4
            )
            take = _take

            def run_batch(keys, z_init, y, mask, cov, length):  # noqa: F811
                return _stack([
                    _stack([
                        run_one(keys[b, i], take(z_init, b, i), y[b], mask[b],
                                take(cov, b), length)
                        for i in range(keys.shape[1])
                    ])
                    for b in range(keys.shape[0])
                ])

            def extend_batch(states, y, mask, cov, length):  # noqa: F811
                nb, nc = y.shape[0], jax.tree_util.tree_leaves(states)[0].shape[1]
                return _stack([
                    _stack([
                        extend_one(take(states, b, i), y[b], mask[b], take(cov, b), length)
                        for i in range(nc)
                    ])
                    for b in range(nb)
                ])

            run_fn, extend_fn = run_batch, extend_batch
        else:
            run_fn = jax.jit(run_batch, static_argnums=5)
            extend_fn = jax.jit(extend_batch, static_argnums=4)
        self._fns = dict(
            find_map=jax.jit(jax.vmap(find_map)),
            run=run_fn,
            extend=extend_fn,
            constrain=jax.jit(constrain_batch),
            potential=jax.jit(jax.vmap(self._potential)),
        )

    def _prepare(self, keys, y, mask, covariates):
        y = jnp.asarray(y, jnp.float32)
        mask = jnp.asarray(mask, bool)
        cov = None if covariates is None else jnp.asarray(covariates, jnp.float32)
        z_template = self._template(y, mask, covariates)
        if self._fns is None:
            self._build(z_template)
        num_models = y.shape[0]
        # Start the MAP search from the centre of the unconstrained space, jittered.
        k0 = jax.vmap(lambda k: jax.random.fold_in(k, 7))(jnp.asarray(keys))
        z0 = {
            name: jax.vmap(lambda k, v=v: 0.1 * jax.random.normal(k, jnp.shape(v)))(k0)
            for name, v in z_template.items()
        }
        z_map = self._fns["find_map"](z0, y, mask, cov)
        return y, mask, cov, z_map, num_models

    def find_map(self, keys, y, mask, covariates=None):
        """MAP estimates (unconstrained and constrained) of every model of the batch.

        Returns:
            ``(z_map, constrained)``: dicts of ``(B, *site_shape)`` arrays.
        """
        y, mask, cov, z_map, _ = self._prepare(keys, y, mask, covariates)
        z1 = jax.tree_util.tree_map(lambda a: a[:, None, None], z_map)
        con = self._fns["constrain"](z1, y, mask, cov)
        return z_map, {k: np.asarray(v[:, 0, 0]) for k, v in con.items()}

    def laplace(self, keys, y, mask, covariates=None, num_draws: int = 1000) -> BatchDraws:
        """Laplace approximation at the MAP (unconstrained space), as draws.

        Returns:
            :class:`BatchDraws` with one "chain" of ``num_draws`` draws per model.
        """
        y, mask, cov, z_map, num_models = self._prepare(keys, y, mask, covariates)
        flat0, unravel = jax.flatten_util.ravel_pytree(
            jax.tree_util.tree_map(lambda a: a[0], z_map)
        )

        def draws_one(key, z, yy, mm, cc):
            flat, _ = jax.flatten_util.ravel_pytree(z)
            hess = jax.hessian(lambda f: self._potential(unravel(f), yy, mm, cc))(flat)
            cov_mat = jnp.linalg.inv(hess + 1e-8 * jnp.eye(flat.shape[0]))
            chol = jnp.linalg.cholesky(0.5 * (cov_mat + cov_mat.T))
            eps = jax.random.normal(key, (num_draws, flat.shape[0]))
            return jax.vmap(unravel)(flat + eps @ chol.T)

        zs = jax.jit(jax.vmap(draws_one))(jnp.asarray(keys), z_map, y, mask, cov)
        zs = jax.tree_util.tree_map(lambda a: a[:, None], zs)
        con = self._fns["constrain"](zs, y, mask, cov)
        zeros = np.zeros((num_models, 1, num_draws))
        return BatchDraws(
            {k: np.asarray(v) for k, v in con.items()}, zeros.astype(bool),
            zeros.astype(np.int32), np.zeros((num_models, 1)), np.zeros(num_models),
        )

    def nuts(self, keys, y, mask, covariates=None, valid=None) -> BatchDraws:
        """Run NUTS on every model of the batch until the ESS/R-hat target is met.

        Args:
            keys: ``(B, 2)`` uint32 PRNG keys, one per model.
            y: ``(B, T)`` observations (NaN or ``mask == False`` = missing).
            mask: ``(B, T)`` bool.
            covariates: ``(B, T, P)`` or ``None``.
            valid: ``(B,)`` bool; padding lanes (``False``) are ignored by the
                extension rule.

        Returns:
            :class:`BatchDraws`.
        """
        y, mask, cov, z_map, num_models = self._prepare(keys, y, mask, covariates)
        c = self.num_chains
        keys = jnp.asarray(keys)
        chain_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(
            jnp.arange(c)))(keys)
        jit_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 99)))(chain_keys)
        z_init = {
            name: v[:, None] + 0.05 * jax.vmap(jax.vmap(
                lambda k, v=v: jax.random.normal(k, v.shape[1:])))(jit_keys)
            for name, v in z_map.items()
        }
        states, zs, div, nst, wgrads = self._fns["run"](
            chain_keys, z_init, y, mask, cov, self.num_samples
        )
        zs_all, div_all, nst_all = [zs], [div], [nst]
        valid = np.ones(num_models, bool) if valid is None else np.asarray(valid)
        for _ in range(self.max_extensions):
            con = self._fns["constrain"](_cat(zs_all), y, mask, cov)
            if all(
                self._meets_target({k: np.asarray(v[b]) for k, v in con.items()})
                for b in range(num_models) if valid[b]
            ):
                break
            states, zs, div, nst, _ = self._fns["extend"](states, y, mask, cov, self.num_samples)
            zs_all.append(zs)
            div_all.append(div)
            nst_all.append(nst)
        con = self._fns["constrain"](_cat(zs_all), y, mask, cov)
        nsteps = np.concatenate([np.asarray(n) for n in nst_all], axis=2)
        grads = np.asarray(wgrads).sum(axis=1) + nsteps.sum(axis=(1, 2))
        return BatchDraws(
            {k: np.asarray(v) for k, v in con.items()},
            np.concatenate([np.asarray(d) for d in div_all], axis=2),
            nsteps,
            np.asarray(states.adapt_state.step_size),
            grads,
        )

    def _meets_target(self, draws_one_model) -> bool:
        az = _arviz()
        for value in draws_one_model.values():
            flat = np.asarray(value, np.float64).reshape(value.shape[:2] + (-1,))
            for j in range(flat.shape[-1]):
                x = flat[..., j]
                if _is_constant(x):
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if (az.ess(x, method="bulk") < self.target_ess
                            or az.rhat(x) > self.target_r_hat):
                        return False
        return True


def _take(tree, *idx):
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _stack(items):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *items)


def _cat(parts):
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=2), *parts)
