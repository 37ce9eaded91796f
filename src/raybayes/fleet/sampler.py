"""Vectorized inference for a batch of independent models (pure JAX / NumPyro).

A batch holds ``B`` models of the same structure with different data (padded to
the same length; padded steps are missing observations, which leave an HMM's
likelihood unchanged). NUTS runs on ``B x C`` lanes with ``jax.vmap``: every lane
(one chain of one model) has its own state, step size and mass matrix, adapted
from its own draws only; nothing is shared between models or chains.

Initialization: a short vmapped Adam run towards the MAP of each model
(unconstrained space), polished by a few damped Newton steps. The Hessian ``H`` at
the MAP gives the Laplace approximation ``N(z*, H^{-1})``. Each chain starts from
its own draw of that approximation, so the starts are dispersed on the posterior's
own scale, which R-hat needs.

Mass matrix (``mass_matrix=``):

* ``"laplace"`` (default): the dense inverse mass matrix of every chain is
  ``H^{-1}`` of its own model, fixed; warmup adapts only the step size, by one
  uninterrupted run of dual averaging per chain, and the chains of one model then
  share the median of their step sizes (log scale). A model
  fitted to thousands of points has a nearly Gaussian posterior, for which
  ``H^{-1}`` is the ideal preconditioner, so a short warmup suffices and NUTS
  trajectories are short (a few leapfrog steps). The Hessian is made positive
  definite by clipping its eigenvalues.
* ``"adapt"``: NumPyro's windowed adaptation of a diagonal mass matrix (Stan's
  schedule), from each chain's own draws; for posteriors far from Gaussian.

Sampling runs to a target: after the first ``num_samples`` draws, models whose
bulk ESS or R-hat miss the target get more draws (up to ``max_extensions`` times);
models that still miss, or whose run failed, are run again from a new multi-start
MAP search (``max_restarts``).

No Ray here; :class:`raybayes.fleet.worker.FleetBatchWorker` calls these functions.

References:
    Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.
    Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), Rank-normalization,
    folding, and localization: an improved R-hat, Bayesian Analysis 16(2).
    Girolami & Calderhead (2011), Riemann manifold Langevin and Hamiltonian Monte
    Carlo methods, JRSS B 73(2) (the Hessian as mass matrix).
    Tierney & Kadane (1986), Accurate approximations for posterior moments and
    marginal densities, JASA 81(393) (the Laplace approximation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from numpyro.infer.hmc import hmc
from numpyro.infer.hmc_util import dual_averaging
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy
from scipy import stats

from raybayes.config import renamed_argument

__all__ = [
    "BatchSampler",
    "BatchDraws",
    "diagnostics",
    "SeriesModel",
    "NutsSettings",
    "MapState",
    "MapInfo",
    "LaplaceApproximation",
    "WarmupState",
    "NutsInfo",
    "map_init",
    "map_step",
    "find_map",
    "positive_definite_hessian",
    "laplace_fit",
    "start_points",
    "nuts_kernel",
    "warmup_init",
    "warmup_step",
    "warmup",
    "nuts_step",
    "nuts_draws",
    "compile_batch_functions",
]

# Jitted functions of BatchSampler, shared by samplers with the same model and
# settings in one process, so that repeated fits (every batch of a fleet, nightly
# refits in a long-lived worker) compile once. jit compiles again per shape.
_COMPILED: dict = {}


class BatchDraws(NamedTuple):
    """Draws of a batch of models.

    Models of one batch may have different numbers of draws ``S_b`` (a model
    that misses its target gets more), so the per-draw fields are lists with one
    entry per model.

    Attributes:
        draws: list of ``B`` dicts, site -> ``(C, S_b, *site_shape)`` constrained
            draws.
        diverging: list of ``B`` bool arrays ``(C, S_b)``.
        num_steps: list of ``B`` arrays ``(C, S_b)``: leapfrog steps per draw.
        step_size: ``(B, C)`` step size of each chain after warmup.
        num_gradients: ``(B,)`` gradient evaluations per model (warmup and
            restarts included; the MAP search is not counted).
        num_restarts: ``(B,)`` restarts per model (0: the first run was kept or
            met the target; see :meth:`BatchSampler.nuts`).
        met_target: ``(B,)`` bool, whether the kept draws of each model meet the
            ESS/R-hat target (NUTS; ``None`` for Laplace draws).
    """

    draws: list
    diverging: list
    num_steps: list
    step_size: np.ndarray
    num_gradients: np.ndarray
    num_restarts: np.ndarray | None = None
    met_target: np.ndarray | None = None


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
        num_warmup: warmup iterations per chain (default 60 with
            ``mass_matrix="laplace"``, 300 with ``"adapt"``).
        num_samples: draws per chain in the first round.
        target_ess: bulk ESS every parameter must reach.
        target_rhat: R-hat every parameter must stay below (``target_r_hat`` is
            a deprecated alias).
        max_extensions: extra rounds of ``extension_samples`` draws for models
            that miss.
        extension_samples: draws per chain per extra round (default
            ``num_samples // 2``).
        target_accept_prob, max_tree_depth: NUTS settings.
        map_steps: Adam steps of the MAP initialization (then ``newton_steps``
            damped Newton steps).
        mass_matrix: ``"laplace"`` (dense ``H^{-1}`` at the MAP, fixed; warmup
            adapts the step size only) or ``"adapt"`` (NumPyro's windowed
            diagonal adaptation).
        max_restarts: fresh runs (multi-start MAP, new chains) for a model that
            misses the target after its extensions, or whose first draws show a
            failed run (R-hat > 1.1, mean tree size above ``2**(max_tree_depth -
            2)`` leapfrog steps, or more than 10% divergent draws).
        vectorize: vmap over models x chains (default: on accelerators only).

    Raises:
        ValueError: an unknown ``mass_matrix``.
    """

    def __init__(
        self,
        model,
        model_kwargs: dict | None = None,
        *,
        num_chains: int = 4,
        num_warmup: int | None = None,
        num_samples: int = 250,
        target_ess: float = 400.0,
        target_rhat: float = 1.01,
        max_extensions: int = 3,
        extension_samples: int | None = None,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        map_steps: int = 300,
        newton_steps: int = 5,
        mass_matrix: str = "laplace",
        max_restarts: int = 1,
        vectorize: bool | None = None,
        **deprecated,
    ):
        target_rhat = renamed_argument(deprecated, "target_r_hat", "target_rhat",
                                       target_rhat, default=1.01)
        if deprecated:
            raise TypeError(f"unexpected keyword arguments {sorted(deprecated)}")
        if mass_matrix not in ("laplace", "adapt"):
            raise ValueError(f"mass_matrix={mass_matrix!r}; use 'laplace' or 'adapt'.")
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.num_chains = num_chains
        self.num_warmup = (60 if mass_matrix == "laplace" else 300) if num_warmup is None \
            else num_warmup
        self.num_samples = num_samples
        self.target_ess = target_ess
        self.target_rhat = target_rhat
        self.max_extensions = max_extensions
        self.extension_samples = max(1, extension_samples or num_samples // 2)
        self.target_accept_prob = target_accept_prob
        self.max_tree_depth = max_tree_depth
        self.map_steps = map_steps
        self.newton_steps = newton_steps
        self.mass_matrix = mass_matrix
        self.max_restarts = max_restarts
        # vmap over models x chains pays off on accelerators; on CPU the vmapped
        # NUTS tree (a while loop that runs as long as its slowest lane, with
        # masked selects on every lane) was measured slower than a loop over
        # lanes of the same jitted chain, so the default follows the platform.
        self.vectorize = jax.default_backend() != "cpu" if vectorize is None else vectorize
        self._fns = None
        self._templates = {}

    # -- pieces ------------------------------------------------------------------------
    def _kwargs(self, mask, covariates):
        kw = dict(self.model_kwargs, mask=mask)
        if covariates is not None:
            kw["covariates"] = covariates
        return kw

    def _template(self, y, mask, covariates):
        """Zeros shaped like one model's unconstrained latent sites.

        Found by abstract evaluation (``jax.eval_shape``) of NumPyro's
        ``initialize_model``: nothing is compiled or run (run eagerly, it took
        seconds per batch, op by op). Cached per data shape.
        """
        cov0 = None if covariates is None else covariates[0]
        shape_key = (np.shape(y)[1:], None if cov0 is None else np.shape(cov0))
        if shape_key not in self._templates:

            def unconstrained(y0, m0, c0):
                return initialize_model(
                    jax.random.PRNGKey(0), self.model, model_args=(y0,),
                    model_kwargs=self._kwargs(m0, c0),
                ).param_info.z

            shapes = jax.eval_shape(unconstrained, y[0], mask[0], cov0)
            self._templates[shape_key] = {
                k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
        return self._templates[shape_key]

    def _cache_key(self, z_template):
        """Settings and shapes that determine the compiled functions (or None)."""
        try:
            key = (
                self.model, tuple(sorted(self.model_kwargs.items())), self.num_chains,
                self.num_warmup, self.num_samples, self.extension_samples,
                self.target_accept_prob, self.max_tree_depth, self.map_steps,
                self.newton_steps, self.mass_matrix, self.vectorize,
                tuple((k, jnp.shape(v)) for k, v in sorted(z_template.items())),
            )
            hash(key)
        except TypeError:  # unhashable model arguments: no reuse
            return None
        return key

    def _build(self, z_template):
        """Compile the batch functions of :func:`compile_batch_functions`."""
        self._fns = compile_batch_functions(
            SeriesModel(self.model, self.model_kwargs), z_template,
            NutsSettings(self.num_warmup, self.target_accept_prob, self.max_tree_depth,
                         self.mass_matrix == "laplace"),
            map_steps=self.map_steps, newton_steps=self.newton_steps,
            vectorize=self.vectorize,
        )

    def _prepare(self, keys, y, mask, covariates):
        # Host arrays: jitted calls take them as they are, and per-model slices
        # of them cost nothing.
        y = np.asarray(y, np.float32)
        mask = np.asarray(mask, bool)
        cov = None if covariates is None else np.asarray(covariates, np.float32)
        z_template = self._template(y, mask, covariates)
        if self._fns is None:
            key = self._cache_key(z_template)
            if key is not None and key in _COMPILED:
                self._fns = _COMPILED[key]
            else:
                self._build(z_template)
                if key is not None:
                    _COMPILED[key] = self._fns
        num_models = y.shape[0]
        # Start the MAP search from the centre of the unconstrained space, jittered.
        k0 = jax.vmap(lambda k: jax.random.fold_in(k, 7))(jnp.asarray(keys))
        z0 = {
            name: jax.vmap(lambda k, v=v: 0.1 * jax.random.normal(k, jnp.shape(v)))(k0)
            for name, v in z_template.items()
        }
        z_adam = self._fns["find_map"](z0, y, mask, cov)
        f_map, lam, vec, converged = self._fns["laplace_fit"](z_adam, y, mask, cov)
        laplace = tuple(np.array(a) for a in (f_map, lam, vec))
        # Where the search stopped short of a mode (typically at the saddle
        # between relabelled modes of a mixture or HMM, close to the centre), search
        # again from dispersed starts.
        todo = np.flatnonzero(~np.asarray(converged))
        if len(todo):
            new = self._multistart_laplace(todo, np.asarray(keys), y, mask, cov, laplace, 0)
            for a, n in zip(laplace, new, strict=True):
                a[todo] = n
        z_map = self._fns["unravel"](laplace[0])
        return y, mask, cov, z_map, num_models, laplace

    def _sub_batch_size(self, num_models):
        # Restarts run on sub-batches of one size (one shape to compile): one model
        # at a time on CPU, where chains are looped anyway; up to 8 at a time when
        # vectorized (padded with copies).
        return min(num_models, 8) if self.vectorize else 1

    def _constrain_model(self, b, zs, y, mask, cov):
        out = self._fns["constrain"](zs, y[b], mask[b], _take(cov, b))
        return {k: np.asarray(v) for k, v in out.items()}

    def find_map(self, keys, y, mask, covariates=None):
        """MAP estimates (unconstrained and constrained) of every model of the batch.

        Returns:
            ``(z_map, constrained)``: dicts of ``(B, *site_shape)`` arrays.
        """
        y, mask, cov, z_map, num_models, _ = self._prepare(keys, y, mask, covariates)
        con = [
            self._constrain_model(b, _take(z_map, slice(b, b + 1), None), y, mask, cov)
            for b in range(num_models)
        ]
        return z_map, {k: np.stack([c[k][0, 0] for c in con]) for k in con[0]}

    def laplace(self, keys, y, mask, covariates=None, num_draws: int = 1000) -> BatchDraws:
        """Laplace approximation at the MAP (unconstrained space), as draws.

        Returns:
            :class:`BatchDraws` with one "chain" of ``num_draws`` draws per model.
        """
        y, mask, cov, _, num_models, (f_map, lam, vec) = self._prepare(
            keys, y, mask, covariates)
        eps = jax.vmap(lambda k: jax.random.normal(k, (num_draws, f_map.shape[1])))(
            jnp.asarray(keys))
        zs = self._fns["unravel"](_laplace_draws(f_map, lam, vec, eps)[:, None])
        draws = [self._constrain_model(b, _take(zs, b), y, mask, cov)
                 for b in range(num_models)]
        zeros = np.zeros((1, num_draws))
        return BatchDraws(
            draws, [zeros.astype(bool)] * num_models, [zeros.astype(np.int32)] * num_models,
            np.zeros((num_models, 1)), np.zeros(num_models, np.int64),
        )

    def nuts(self, keys, y, mask, covariates=None, valid=None) -> BatchDraws:
        """Run NUTS on every model of the batch until the ESS/R-hat target is met.

        Warmup runs first on every chain. With ``mass_matrix="laplace"`` the chains
        of one model then share one step size, the geometric median of their
        dual-averaging estimates (the median of the log step sizes): the chains of
        a model share its mass matrix (nothing is shared between models), the
        pooled estimate is steadier than one chain's after a short warmup, and a
        median ignores one chain whose warmup went wrong. Then ``num_samples``
        draws per chain; a model whose draws miss the target gets
        ``extension_samples`` more, up to ``max_extensions`` times; on CPU only
        the models that miss are advanced.

        A model that still misses the target, or whose first draws show a failed
        run (see ``max_restarts``), is run again from scratch, up to
        ``max_restarts`` times: its MAP is searched again from ``num_chains``
        dispersed starts (uniform on ``(-2, 2)`` in the unconstrained space, as
        NumPyro's ``init_to_uniform``) and the previous MAP, the best is kept, and
        new chains start from that Laplace approximation. Of its runs the model
        keeps the one that met the target, else the one with the lowest maximum
        R-hat; draws of different runs are never mixed. Typical causes: the first
        MAP search ended in a minor mode, or a chain started in a region where the
        Laplace mass matrix does not fit.

        Args:
            keys: ``(B, 2)`` uint32 PRNG keys, one per model.
            y: ``(B, T)`` observations (NaN or ``mask == False`` = missing).
            mask: ``(B, T)`` bool.
            covariates: ``(B, T, P)`` or ``None``.
            valid: ``(B,)`` bool; padding lanes (``False``) are never extended or
                restarted.

        Returns:
            :class:`BatchDraws` (draws per model, chains x draws).
        """
        y, mask, cov, _, num_models, laplace = self._prepare(keys, y, mask, covariates)
        keys = np.asarray(keys)
        valid = np.ones(num_models, bool) if valid is None else np.asarray(valid, bool)
        runs = self._run(np.arange(num_models), keys, y, mask, cov, laplace, 0, valid)
        restarts = np.zeros(num_models, np.int64)
        size = self._sub_batch_size(num_models)
        for attempt in range(1, self.max_restarts + 1):
            todo = [b for b in range(num_models) if valid[b] and not runs[b].ok]
            for start in range(0, len(todo), size):
                part = todo[start:start + size]
                idx = np.array(part + [part[-1]] * (size - len(part)))
                lap = self._multistart_laplace(idx, keys, y, mask, cov, laplace, attempt)
                new = self._run(idx, keys, y, mask, cov, lap, attempt,
                                np.arange(size) < len(part))
                for j, b in enumerate(part):
                    old = runs[b]
                    keep = new[j] if (new[j].ok, -new[j].max_r_hat) >= (
                        old.ok, -old.max_r_hat) else old
                    runs[b] = keep._replace(num_gradients=old.num_gradients
                                            + new[j].num_gradients)
                    restarts[b] = attempt
        return BatchDraws(
            [r.draws for r in runs], [r.diverging for r in runs],
            [r.num_steps for r in runs], np.stack([r.step_size for r in runs]),
            np.array([r.num_gradients for r in runs], np.int64), restarts,
            np.array([r.ok for r in runs], bool),
        )

    def _run(self, idx, keys, y, mask, cov, laplace, attempt, valid):
        """One run (warmup, draws, extensions) for the models ``idx`` of the batch.

        ``laplace`` is ``(f_map, lam, vec)`` of the models ``idx`` (attempt > 0) or of
        the whole batch (attempt 0, ``idx`` = all). Returns a list of :class:`_Run`.
        """
        f_map, lam, vec = (a[idx] for a in laplace) if attempt == 0 else laplace
        y, mask = y[idx], mask[idx]
        cov = None if cov is None else cov[idx]
        n, c = len(idx), self.num_chains
        mkeys = jnp.asarray(keys[idx])
        if attempt:
            mkeys = jax.vmap(lambda k: jax.random.fold_in(k, 1000 + attempt))(mkeys)
        chain_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(
            jnp.arange(c)))(mkeys)
        jit_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 99)))(chain_keys)
        # Each chain starts from its own draw of the Laplace approximation.
        eps = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, f_map.shape[1:])))(jit_keys)
        z_init = self._fns["unravel"](
            self._fns["start_points"](f_map, lam, vec, eps, y, mask, cov))
        inv_mass = jnp.einsum("bij,bj,bkj->bik", vec, 1.0 / lam, vec)
        if not self.vectorize:  # host arrays for the lane-by-lane calls
            chain_keys, z_init, inv_mass = jax.device_get((chain_keys, z_init, inv_mass))
        states, wgrads = self._fns["warm"](chain_keys, z_init, inv_mass, y, mask, cov)
        if self.mass_matrix == "laplace":
            step = np.asarray(states.adapt_state.step_size)
            pooled = np.exp(np.median(np.log(step), axis=1, keepdims=True))
            states = _with_step_size(states, np.broadcast_to(pooled, step.shape))
        states, zs, div, nst = self._fns["sample"](states, y, mask, cov, self.num_samples)
        zs = jax.device_get(zs)
        parts = [[(_take(zs, b), np.asarray(div[b]), np.asarray(nst[b]))] for b in range(n)]
        draws = [self._constrain_model(b, parts[b][0][0], y, mask, cov) for b in range(n)]
        checks = [self._check(draws[b]) for b in range(n)]
        # A failed run is restarted rather than extended.
        failed = [checks[b][1] > 1.1 or parts[b][0][2].mean() > 2 ** (self.max_tree_depth - 2)
                  or parts[b][0][1].mean() > 0.1 for b in range(n)]
        for _ in range(self.max_extensions):
            todo = [b for b in range(n) if valid[b] and not checks[b][0] and not failed[b]]
            if not todo:
                break
            if self.vectorize:
                states, zs, div, nst = self._fns["sample"](
                    states, y, mask, cov, self.extension_samples)
                zs = jax.device_get(zs)
                new = {b: (_take(zs, b), np.asarray(div[b]), np.asarray(nst[b]))
                       for b in todo}
            else:
                sub = self._fns["sample"](states, y, mask, cov, self.extension_samples, todo)
                st_new, zs, div, nst = sub
                states = _set_rows(states, np.asarray(todo), st_new)
                new = {b: (_take(zs, j), np.asarray(div[j]), np.asarray(nst[j]))
                       for j, b in enumerate(todo)}
            for b, part in new.items():
                parts[b].append(part)
                draws[b] = self._constrain_model(b, _cat([p[0] for p in parts[b]]),
                                                 y, mask, cov)
                checks[b] = self._check(draws[b])
        step_size = np.asarray(states.adapt_state.step_size)
        wgrads = np.asarray(wgrads).sum(axis=1)
        out = []
        for b in range(n):
            divs = np.concatenate([p[1] for p in parts[b]], axis=1)
            nsteps = np.concatenate([p[2] for p in parts[b]], axis=1)
            out.append(_Run(draws[b], divs, nsteps, step_size[b],
                            int(wgrads[b] + nsteps.sum()), checks[b][0], checks[b][1]))
        return out

    def _multistart_laplace(self, idx, keys, y, mask, cov, laplace, attempt):
        """``(f_map, lam, vec)`` of the models ``idx``: the best of a new MAP search
        from ``num_chains`` dispersed starts each and the first run's MAP.

        The ``len(idx) x num_chains`` searches run in chunks of the batch's own
        size ``B`` (padded with copies), the shape the MAP functions were compiled
        for, so that no new compilation is needed.
        """
        n, c = len(idx), self.num_chains
        skeys = np.asarray(jax.vmap(lambda k: jax.random.split(
            jax.random.fold_in(k, 2000 + attempt), c))(jnp.asarray(keys[idx]))).reshape(n * c, -1)
        f_old, lam_old, vec_old = (a[idx] for a in laplace)
        draw = jax.vmap(lambda k: jax.random.uniform(
            k, f_old.shape[1:], minval=-2.0, maxval=2.0))

        def search(sel, ys, ms, cs):
            z0 = self._fns["unravel"](draw(skeys[sel]))
            f, lam, vec, _ = self._fns["laplace_fit"](
                self._fns["find_map"](z0, ys, ms, cs), ys, ms, cs)
            u = self._fns["potential"](self._fns["unravel"](f), ys, ms, cs)
            return f, lam, vec, u

        f, lam, vec, u = self._by_lanes(search, np.repeat(idx, c), y, mask, cov)
        (u_old,) = self._by_lanes(
            lambda sel, ys, ms, cs: (self._fns["potential"](
                self._fns["unravel"](f_old[sel]), ys, ms, cs),), idx, y, mask, cov)
        u = np.where(np.isfinite(u), u, np.inf).reshape(n, c)
        best = np.argmin(u, axis=1)
        f, lam, vec = (a.reshape((n, c) + a.shape[1:])[np.arange(n), best]
                       for a in (f, lam, vec))
        use_old = ~(u[np.arange(n), best] < np.where(np.isfinite(u_old), u_old, np.inf))
        pick = lambda new, old: np.where(  # noqa: E731
            use_old.reshape((-1,) + (1,) * (new.ndim - 1)), np.asarray(old), new)
        return pick(f, f_old), pick(lam, lam_old), pick(vec, vec_old)

    @staticmethod
    def _by_lanes(fn, rows, y, mask, cov):
        """``fn(sel, y[rows[sel]], mask[...], cov[...])`` over chunks of ``B`` lanes
        (``B = len(y)``, the compiled batch size; the last chunk padded with copies),
        concatenated; ``sel`` indexes ``rows``. ``fn`` returns a tuple of arrays."""
        size, total, outs = y.shape[0], len(rows), []
        for start in range(0, total, size):
            sel = np.arange(start, min(start + size, total))
            keep = len(sel)
            sel = np.concatenate([sel, np.full(size - keep, sel[-1])])
            r = rows[sel]
            res = fn(sel, y[r], mask[r], None if cov is None else cov[r])
            outs.append([np.asarray(a)[:keep] for a in res])
        return tuple(np.concatenate(a) for a in zip(*outs, strict=True))

    def _check(self, draws_one_model) -> tuple[bool, float]:
        """``(meets the ESS and R-hat target, max R-hat)`` of one model's draws."""
        az = _arviz()
        ok, worst = True, 1.0
        for value in draws_one_model.values():
            flat = np.asarray(value, np.float64).reshape(value.shape[:2] + (-1,))
            for j in range(flat.shape[-1]):
                x = flat[..., j]
                if _is_constant(x):
                    continue
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    r = float(az.rhat(x))
                    worst = max(worst, r if np.isfinite(r) else np.inf)
                    if ok and (az.ess(x, method="bulk") < self.target_ess
                               or not r <= self.target_rhat):
                        ok = False
        return ok, worst


class _Run(NamedTuple):
    """One model's draws from one run of :meth:`BatchSampler._run`."""

    draws: dict
    diverging: np.ndarray
    num_steps: np.ndarray
    step_size: np.ndarray
    num_gradients: int
    ok: bool
    max_r_hat: float


def _looped(fn):
    """``fn`` (jitted, one model) mapped over the leading axis by a Python loop:
    one compiled shape whatever the number of models (``None`` passes through).
    On CPU this was measured 6x faster than ``vmap`` for the MAP search of the
    HMM (T = 10,000): vmapped scans over lanes run serially and add selects."""

    def mapped(*args):
        n = len(jax.tree_util.tree_leaves(args[0])[0])
        return _stack([fn(*(None if a is None else _take(a, b) for a in args))
                       for b in range(n)])

    return mapped


def _laplace_draws(f_map, lam, vec, eps):
    """``f_map + H^{-1/2} eps`` for ``H = vec diag(lam) vec^T``.

    Shapes: ``f_map (B, D)``, ``lam (B, D)``, ``vec (B, D, D)``, ``eps (B, C, D)``;
    returns ``(B, C, D)``.
    """
    return f_map[:, None] + jnp.einsum("bij,bcj->bci", vec, eps / jnp.sqrt(lam)[:, None])


def _unravel_leading(unravel, template):
    """``unravel`` for flat vectors with any leading batch dimensions."""

    def fn(flat):
        lead = flat.shape[:-1]
        tree = jax.vmap(unravel)(flat.reshape((-1, flat.shape[-1])))
        return {k: v.reshape(lead + jnp.shape(template[k])) for k, v in tree.items()}

    return fn


# Between jitted calls, the looped (CPU) path keeps states and draws as host NumPy
# arrays: slicing a lane out of a device array is an eager JAX op per leaf, and
# those dispatches cost more than the chains themselves.


def _with_step_size(state, step_size):
    """An HMC state with another step size (the adapted one is read from there)."""
    old = state.adapt_state.step_size
    xp = np if isinstance(old, np.ndarray) else jnp
    return state._replace(adapt_state=state.adapt_state._replace(
        step_size=xp.asarray(step_size, old.dtype).reshape(old.shape)))


def _set_rows(tree, idx, new):
    def put(a, n):
        a = np.array(a)
        a[idx] = n
        return a

    return jax.tree_util.tree_map(put, tree, new)


def _take(tree, *idx):
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _stack(items):
    items = jax.device_get(items)
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *items)


def _cat(parts):
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=1), *parts)


# -- the algorithm, as pure functions of one model's data ------------------------------
#
# Contracts follow BlackJAX and Optax: an iterative method is ``init(...) -> State``
# and ``step(..., state) -> (State, Info)``, with NamedTuple states and infos, and no
# hidden state. NUTS keeps its PRNG key inside NumPyro's ``HMCState`` (as NumPyro's
# kernels do), so its step takes no separate key. Every function here takes one
# model's data ``(y, mask, covariates)``: ``y`` ``(T,)``, ``mask`` ``(T,)`` bool,
# ``covariates`` ``(T, P)`` or ``None``; the batch over models is added by
# ``jax.vmap`` or a Python loop in :func:`compile_batch_functions`.


class SeriesModel(NamedTuple):
    """A NumPyro model of one series with its static keyword arguments.

    Attributes:
        model: called as ``model(y, mask=mask, covariates=X, **model_kwargs)``
            (``covariates`` only when not ``None``).
        model_kwargs: static keyword arguments (e.g. ``num_states``).
    """

    model: Callable
    model_kwargs: dict

    def kwargs(self, mask, covariates) -> dict:
        """The model's keyword arguments for one series."""
        kw = dict(self.model_kwargs, mask=mask)
        if covariates is not None:
            kw["covariates"] = covariates
        return kw

    def potential(self, z, y, mask, covariates):
        """Potential energy (negative log joint density) at unconstrained ``z``."""
        return potential_energy(self.model, (y,), self.kwargs(mask, covariates), z)

    def constrain(self, z, y, mask, covariates):
        """Constrained values of the latent sites at unconstrained ``z``."""
        return constrain_fn(self.model, (y,), self.kwargs(mask, covariates), z)


class NutsSettings(NamedTuple):
    """Settings of one chain's NUTS warmup (hashable, static under jit).

    Attributes:
        num_warmup: warmup iterations.
        target_accept_prob: dual averaging's target acceptance probability.
        max_tree_depth: NUTS maximum tree depth.
        laplace_mass: ``True``: fixed dense inverse mass matrix, step size adapted by
            one run of dual averaging; ``False``: NumPyro's windowed adaptation.
    """

    num_warmup: int
    target_accept_prob: float
    max_tree_depth: int
    laplace_mass: bool


class MapState(NamedTuple):
    """State of the MAP search (Adam, Optax): position and optimizer state."""

    position: dict
    opt_state: optax.OptState


class MapInfo(NamedTuple):
    """Per-step information of the MAP search.

    Attributes:
        grad_is_finite: ``False`` when some gradient entry was not finite (it was
            replaced by 0 for the step).
    """

    grad_is_finite: jax.Array


class LaplaceApproximation(NamedTuple):
    """``N(position, H^-1)`` in the flattened unconstrained space of one model.

    Attributes:
        position: ``(D,)`` the mode.
        eigenvalues: ``(D,)`` of the Hessian ``H`` of the potential at the mode,
            clipped to be positive.
        eigenvectors: ``(D, D)``, columns.
        converged: ``()`` bool: positive curvature everywhere and a Newton decrement
            below 0.01 (a mode, not a saddle).
    """

    position: jax.Array
    eigenvalues: jax.Array
    eigenvectors: jax.Array
    converged: jax.Array


class WarmupState(NamedTuple):
    """State of one chain's warmup.

    Attributes:
        hmc: NumPyro's ``HMCState`` (position, step size, mass matrix, PRNG key).
        dual_averaging: dual averaging state (fixed mass matrix only, else ``None``).
    """

    hmc: Any
    dual_averaging: Any = None


class NutsInfo(NamedTuple):
    """Per-iteration information of NUTS.

    Attributes:
        position: the unconstrained draw (a dict of site arrays).
        diverging: ``()`` bool.
        num_steps: ``()`` leapfrog steps of the trajectory.
        accept_prob: ``()`` mean Metropolis acceptance probability.
    """

    position: dict
    diverging: jax.Array
    num_steps: jax.Array
    accept_prob: jax.Array


def map_init(position: dict, learning_rate: float = 0.05) -> MapState:
    """Start the MAP search (Adam) at an unconstrained ``position``."""
    return MapState(position, optax.adam(learning_rate).init(position))


def map_step(series: SeriesModel, data: tuple, state: MapState,
             learning_rate: float = 0.05) -> tuple[MapState, MapInfo]:
    """One Adam step on the potential; non-finite gradient entries count as 0.

    Args:
        series: the model.
        data: ``(y, mask, covariates)`` of one series.
        state: the current :class:`MapState`.
        learning_rate: Adam's step size.

    Returns:
        ``(MapState, MapInfo)``.

    References:
        Kingma & Ba (2015), Adam: A method for stochastic optimization, ICLR.
    """
    g = jax.grad(series.potential)(state.position, *data)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a))
                                for a in jax.tree_util.tree_leaves(g)]))
    g = jax.tree_util.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0), g)
    upd, opt_state = optax.adam(learning_rate).update(g, state.opt_state, state.position)
    return MapState(optax.apply_updates(state.position, upd), opt_state), MapInfo(finite)


def find_map(series: SeriesModel, position: dict, data: tuple, num_steps: int,
             learning_rate: float = 0.05) -> dict:
    """``num_steps`` Adam steps towards the MAP from ``position`` (unconstrained)."""

    def body(state, _):
        return map_step(series, data, state, learning_rate)

    state, _ = lax.scan(body, map_init(position, learning_rate), None, length=num_steps)
    return state.position


def positive_definite_hessian(flat_potential: Callable, f: jax.Array):
    """Hessian of ``flat_potential`` at ``f``, eigenvalues clipped to be positive.

    A non-finite Hessian is replaced by the identity.

    Args:
        flat_potential: ``(D,) -> ()``.
        f: ``(D,)``.

    Returns:
        ``(eigenvalues (D,), eigenvectors (D, D), curved)``; ``curved`` is ``True``
        when the Hessian was finite and its smallest eigenvalue above the floor
        ``max(1e-6 max|lambda|, 1e-6)``.
    """
    h = jax.hessian(flat_potential)(f)
    h = 0.5 * (h + h.T)
    ok = jnp.all(jnp.isfinite(h))
    h = jnp.where(ok, h, jnp.eye(f.shape[0]))
    lam, vec = jnp.linalg.eigh(h)
    floor = jnp.maximum(1e-6 * jnp.max(jnp.abs(lam)), 1e-6)
    return jnp.maximum(lam, floor), vec, ok & (lam[0] > floor)


def laplace_fit(flat_potential: Callable, position: dict,
                num_newton_steps: int) -> LaplaceApproximation:
    """Damped Newton steps from ``position``, then the Laplace approximation there.

    A Newton step (with the clipped Hessian) is kept only if it lowers the
    potential and is finite.

    Args:
        flat_potential: ``(D,) -> ()`` potential of the flattened position.
        position: unconstrained start (a dict of site arrays).
        num_newton_steps: Newton steps.

    Returns:
        :class:`LaplaceApproximation`.

    References:
        Tierney & Kadane (1986), Accurate approximations for posterior moments
        and marginal densities, JASA 81(393).
    """
    f0, _ = jax.flatten_util.ravel_pytree(position)

    def newton(_, f):
        lam, vec, _ = positive_definite_hessian(flat_potential, f)
        g = jax.grad(flat_potential)(f)
        new = f - vec @ ((vec.T @ g) / lam)
        better = flat_potential(new) < flat_potential(f)
        return jnp.where(better & jnp.all(jnp.isfinite(new)), new, f)

    f = lax.fori_loop(0, num_newton_steps, newton, f0)
    lam, vec, curved = positive_definite_hessian(flat_potential, f)
    # A mode: positive curvature everywhere and a Newton decrement g' H^-1 g
    # (twice the decrease a Newton step promises) near zero.
    g = jax.grad(flat_potential)(f)
    decrement = jnp.sum((vec.T @ g) ** 2 / lam)
    return LaplaceApproximation(f, lam, vec, curved & (decrement < 1e-2))


_SHRINK = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)


def start_points(flat_potential: Callable, f_map, lam, vec, eps, max_rise: float):
    """Chain starts: Laplace draws ``f_map + H^{-1/2} eps`` pulled towards the mode.

    Each draw's deviation is halved (at most 5 times, then dropped) while its
    potential exceeds the mode's by more than ``max_rise`` (use the 99.9% point of
    the potential rise of a draw of the Gaussian itself, chi-square(D) / 2): a draw
    along a direction of clipped curvature can otherwise land where the density
    underflows, and such a chain never leaves.

    Args:
        flat_potential: ``(D,) -> ()``.
        f_map, lam: ``(D,)``; vec: ``(D, D)``: the Laplace approximation.
        eps: ``(C, D)`` standard normal draws.
        max_rise: the largest potential rise accepted.

    Returns:
        ``(C, D)`` starting points.
    """
    shrink = jnp.array(_SHRINK)
    u0 = flat_potential(f_map)
    dev = jnp.einsum("ij,cj->ci", vec, eps / jnp.sqrt(lam))

    def one(d):
        u = jax.vmap(lambda a: flat_potential(f_map + a * d))(shrink)
        ok = (jnp.isfinite(u) & (u - u0 <= max_rise)).at[-1].set(True)
        return f_map + shrink[jnp.argmax(ok)] * d

    return jax.vmap(one)(dev)


def nuts_kernel(series: SeriesModel):
    """NumPyro's functional NUTS ``(init_kernel, sample_kernel)`` for ``series``.

    Both kernels take ``model_args=(y, mask, covariates)``.

    References:
        Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.
    """
    return hmc(
        potential_fn_gen=lambda y, mask, cov: (lambda z: series.potential(z, y, mask, cov)),
        algo="NUTS",
    )


def warmup_init(kernel, settings: NutsSettings, rng_key, position: dict,
                inverse_mass_matrix, data: tuple) -> WarmupState:
    """Initialize one chain's warmup at ``position``.

    With ``settings.laplace_mass`` the dense ``inverse_mass_matrix`` ``(D, D)`` is
    fixed and the step size starts at 1 (the scale of a preconditioned Gaussian);
    dual averaging starts at ``log(10 * step size)``. Otherwise NumPyro's windowed
    adaptation of a diagonal mass matrix runs (``inverse_mass_matrix`` unused).
    """
    init_kernel, _ = kernel
    s = settings
    if not s.laplace_mass:
        return WarmupState(init_kernel(
            position, s.num_warmup, model_args=data, rng_key=rng_key,
            target_accept_prob=s.target_accept_prob, max_tree_depth=s.max_tree_depth,
        ))
    state = init_kernel(
        position, 0, step_size=1.0, inverse_mass_matrix=inverse_mass_matrix,
        dense_mass=True, adapt_step_size=False, adapt_mass_matrix=False, model_args=data,
        rng_key=rng_key, target_accept_prob=s.target_accept_prob,
        max_tree_depth=s.max_tree_depth,
    )
    da_init, _ = dual_averaging()
    return WarmupState(state, da_init(jnp.log(10.0 * state.adapt_state.step_size)))


def warmup_step(kernel, settings: NutsSettings, state: WarmupState,
                data: tuple) -> tuple[WarmupState, NutsInfo]:
    """One warmup iteration (the PRNG key is carried in ``state.hmc``).

    With a fixed mass matrix, one uninterrupted run of dual averaging over the whole
    warmup (Hoffman & Gelman 2014, Sec. 3.2): NumPyro's warmup would restart it at
    the end of its mass-matrix windows even when the mass matrix is not adapted.
    """
    _, sample_kernel = kernel
    s = sample_kernel(state.hmc, model_args=data)
    info = NutsInfo(s.z, s.diverging, s.num_steps, s.accept_prob)
    if not settings.laplace_mass:
        return WarmupState(s), info
    _, da_update = dual_averaging()
    d = da_update(settings.target_accept_prob - s.accept_prob, state.dual_averaging)
    return WarmupState(_with_step_size(s, jnp.exp(d[0])), d), info


def warmup(kernel, settings: NutsSettings, rng_key, position: dict, inverse_mass_matrix,
           data: tuple):
    """One chain's whole warmup; returns ``(HMCState, num_gradients)``.

    With a fixed mass matrix the final step size is dual averaging's averaged one.
    """
    state = warmup_init(kernel, settings, rng_key, position, inverse_mass_matrix, data)
    if not settings.num_warmup:
        return state.hmc, jnp.zeros((), jnp.int32)

    def body(st, _):
        st, info = warmup_step(kernel, settings, st, data)
        return st, info.num_steps

    state, steps = lax.scan(body, state, None, length=settings.num_warmup)
    hmc_state = state.hmc
    if settings.laplace_mass:
        hmc_state = _with_step_size(hmc_state, jnp.exp(state.dual_averaging[1]))
    return hmc_state, jnp.sum(steps)


def nuts_step(kernel, state, data: tuple):
    """One NUTS draw: ``(HMCState, NutsInfo)`` (the PRNG key is in ``state``)."""
    _, sample_kernel = kernel
    s = sample_kernel(state, model_args=data)
    return s, NutsInfo(s.z, s.diverging, s.num_steps, s.accept_prob)


def nuts_draws(kernel, state, data: tuple, num_draws: int):
    """``num_draws`` NUTS draws of one chain.

    Returns:
        ``(state, positions, diverging, num_steps)``: positions a dict of
        ``(num_draws, *site_shape)`` arrays, the others ``(num_draws,)``.
    """

    def body(s, _):
        s, info = nuts_step(kernel, s, data)
        return s, (info.position, info.diverging, info.num_steps)

    state, (zs, div, nst) = lax.scan(body, state, None, length=num_draws)
    return state, zs, div, nst


def compile_batch_functions(series: SeriesModel, z_template: dict,
                            settings: NutsSettings, *, map_steps: int,
                            newton_steps: int, vectorize: bool) -> dict:
    """The jitted batch functions of :class:`BatchSampler`, from the pure ones above.

    With ``vectorize`` every function is ``vmap``-ed over models (and chains);
    otherwise the same jitted one-model (one-chain) function is called model by
    model (chain by chain), with host NumPy arrays between calls.

    Returns:
        dict of callables over a batch: ``find_map``, ``start_points``,
        ``laplace_fit``, ``unravel``, ``warm``, ``sample``, ``constrain``,
        ``potential``.
    """
    _, unravel = jax.flatten_util.ravel_pytree(z_template)
    kernel = nuts_kernel(series)
    dim = int(sum(np.size(v) for v in jax.tree_util.tree_leaves(z_template)))
    max_rise = 0.5 * float(stats.chi2.ppf(0.999, max(dim, 1)))

    def flat(y, mask, cov):
        return lambda f: series.potential(unravel(f), y, mask, cov)

    def map_one(z0, y, mask, cov):
        return find_map(series, z0, (y, mask, cov), map_steps)

    def laplace_one(z, y, mask, cov):
        return tuple(laplace_fit(flat(y, mask, cov), z, newton_steps))

    def starts_one(f_map, lam, vec, eps, y, mask, cov):
        return start_points(flat(y, mask, cov), f_map, lam, vec, eps, max_rise)

    def warm_one(key, z0, inv_mass, y, mask, cov):
        return warmup(kernel, settings, key, z0, inv_mass, (y, mask, cov))

    def sample_one(state, y, mask, cov, length):
        return nuts_draws(kernel, state, (y, mask, cov), length)

    def constrain_one(zs, y, mask, cov):  # zs leaves (C, S, ...) of one model
        return jax.vmap(jax.vmap(lambda q: series.constrain(q, y, mask, cov)))(zs)

    if vectorize:
        def warm_fn(keys, z_init, inv_mass, y, mask, cov):
            def per_model(k, z0, im, yy, mm, cc):
                return jax.vmap(lambda kk, zz: warm_one(kk, zz, im, yy, mm, cc))(k, z0)

            return jax.vmap(per_model)(keys, z_init, inv_mass, y, mask, cov)

        def sample_batch(states, y, mask, cov, length):
            def per_model(st, yy, mm, cc):
                return jax.vmap(lambda s: sample_one(s, yy, mm, cc, length))(st)

            return jax.vmap(per_model)(states, y, mask, cov)

        warm_fn = jax.jit(warm_fn)
        sample_fn = jax.jit(sample_batch, static_argnums=4)
    else:
        warm_lane = jax.jit(warm_one)
        sample_lane = jax.jit(sample_one, static_argnums=4)

        def warm_fn(keys, z_init, inv_mass, y, mask, cov):
            return _stack([_stack([
                warm_lane(keys[b, i], _take(z_init, b, i), inv_mass[b], y[b], mask[b],
                          _take(cov, b))
                for i in range(keys.shape[1])]) for b in range(keys.shape[0])])

        def sample_fn(states, y, mask, cov, length, models=None):
            models = range(y.shape[0]) if models is None else models
            nc = jax.tree_util.tree_leaves(states)[0].shape[1]
            return _stack([_stack([
                sample_lane(_take(states, b, i), y[b], mask[b], _take(cov, b), length)
                for i in range(nc)]) for b in models]) if len(models) else None

    def batched(fn):
        return jax.jit(jax.vmap(fn)) if vectorize else _looped(jax.jit(fn))

    return dict(
        find_map=batched(map_one),
        start_points=batched(starts_one),
        laplace_fit=jax.jit(jax.vmap(laplace_one)),
        unravel=jax.jit(_unravel_leading(unravel, z_template)),
        warm=warm_fn,
        sample=sample_fn,
        constrain=jax.jit(constrain_one),
        potential=jax.jit(jax.vmap(series.potential)),
    )
