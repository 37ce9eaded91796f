"""Distributed SVI: a parameter server for the globals, locals on their shards.

The driver is the parameter server. It holds the global variational parameters
theta and their optimizer state; each shard worker holds its data, the variational
parameters of its own entities and their optimizer state
(:class:`~raybayes.svi.worker.SVIShardWorker`). A step at clock ``c``:

1. the server sends theta (version ``v``) to a shard;
2. the shard draws the globals with the key of clock ``c`` (the same draw on every
   shard), subsamples its entities with its own key, updates their variational
   parameters, and returns its term of the ELBO gradient with respect to theta;
3. when all S shards have returned clock ``c``, the server adds the entropy
   gradient, takes one optimizer step, and theta becomes version ``c + 1``.

Consistency: with ``staleness=0`` (BSP) a shard computes clock ``c`` only with
version ``c``. With ``staleness=s`` (SSP; Ho et al., "More effective distributed ML
via a stale synchronous parallel parameter server", NeurIPS 2013) a shard may
compute clock ``c`` with any version ``>= c - s``: fast shards run up to ``s``
steps ahead on cached globals while slow ones catch up. Every update still sums
all S shards' gradients, each at most ``s`` versions old.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from raybayes.backends import Backend
from raybayes.checkpoint import (
    content_hash,
    data_fingerprint,
    load_checkpoint,
    open_run,
    save_checkpoint,
)
from raybayes.config import (
    CheckpointConfig,
    config_or_keywords,
    derive_key,
    reject_unknown_arguments,
    renamed_argument,
    resolve_scaling,
    split_model_arguments,
)
from raybayes.core.partition import Partition
from raybayes.distributed import (
    ShardedObjective,
    merge_shard_values,
    planned_objective,
    shard_count,
)
from raybayes.errors import (
    ConfigurationError,
    RaybayesWarning,
    WorkerLostError,
)
from raybayes.progress import LossProgress
from raybayes.results import draws_to_inference_data
from raybayes.svi.guides import GlobalGuide, resolve_guide
from raybayes.svi.worker import SVIShardWorker, SVIWorkerConfig

__all__ = ["SVIObjective", "SVIResult", "SVIStepInfo", "fit_svi"]

_MAX_RESTARTS = 5


class SVIObjective(ShardedObjective):
    """A :class:`~raybayes.distributed.ShardedObjective` whose workers run SVI steps
    (:class:`~raybayes.svi.worker.SVIShardWorker`)."""

    worker_class = SVIShardWorker


_SVIObjective = SVIObjective  # the former private name


@dataclass
class SVIResult:
    """The fitted variational posterior.

    Attributes:
        params: global variational parameters: ``loc`` ``(G,)``, ``scale`` ``(G,)``
            (per-coordinate, of the mean-field part; for a full-rank block the
            diagonal of ``scale_tril``), for a low-rank block ``cov_factor``
            ``(G, rank)`` (already multiplied by ``scale``), for a full-rank block
            (``guide="structured"``) ``scale_tril`` ``(G, G)``, the Cholesky factor
            of q's covariance; all in the unconstrained space; ``global_sites``
            gives the layout.
        local_params: ``loc`` and ``scale`` ``(P, k)`` of the per-entity block, in
            entity order of the split plate; for ``guide="structured"`` also
            ``scale_tril`` ``(P, k, k)`` (``L_i``) and ``coupling`` ``(P, k, G)``
            (``A_i``): with the globals ``g = loc + scale_tril @ eps``, entity
            ``i``'s locals are ``loc_i + A_i eps + L_i eps_i``, i.e.
            ``q(z_i | g) = N(loc_i + B_i (g - loc), L_i L_i^T)`` with ``B_i = A_i
            scale_tril^{-1}``.
        idata: ``arviz.InferenceData`` with ``num_samples`` draws from q (one
            chain), constrained, deterministic sites included.
        losses: ``(num_steps,)`` negative ELBO estimate of every step (nats).
        num_steps: optimizer steps taken.
        stop_reason: ``"converged"``, ``"max_steps"`` or ``"callback"``.
        time_s: wall time of the optimization, in seconds (set-up and final draws
            excluded; see ``setup_s`` and ``draws_s``).
        staleness: ``{s: count}``: how many gradients were computed with globals
            ``s`` versions old.
        restarts: workers restarted after being lost.
        data_bytes: bytes of data each shard holds.
        peak_rss_bytes: peak resident memory of each worker process (with the
            local backend, all are the driver's).
    """

    params: dict
    local_params: dict
    idata: Any
    losses: np.ndarray
    num_steps: int
    stop_reason: str
    time_s: float
    setup_s: float
    draws_s: float
    staleness: dict
    restarts: int
    data_bytes: list
    peak_rss_bytes: list
    global_sites: list
    family: str
    posterior_samples: dict = field(repr=False, default_factory=dict)

    def sample_posterior(self, num_draws=None, var_names=None) -> dict:
        """Draws made at the end of the fit: ``site -> (num_draws, *shape)``.

        Args:
            num_draws: at most the ``num_samples`` of :func:`fit_svi` (default all).
            var_names: sites to return (default all).
        """
        names = var_names or list(self.posterior_samples)
        return {k: self.posterior_samples[k][:num_draws] for k in names}


class SVIStepInfo:
    """What a ``callback`` sees: the fit so far, with live workers.

    Attributes:
        step: optimizer steps taken.
        loss: negative ELBO estimate of the last step.
        elapsed_s: wall seconds of the fit so far, time spent in callbacks excluded.
    """

    def __init__(self, run, step, loss, elapsed_s):
        self._run, self.step, self.loss, self.elapsed_s = run, step, loss, elapsed_s

    def sample_posterior(self, num_draws: int, seed: int = 0, var_names=None) -> dict:
        """``site -> (num_draws, *shape)`` constrained draws from the current q.

        The draws use ``derive_key(seed, "draws")``.
        """
        return self._run.draws(num_draws, derive_key(seed, "draws"), var_names)[0]


@dataclass(frozen=True)
class StoppingConfig:
    """When :func:`fit_svi` stops: a step budget and a convergence check.

    Args:
        num_steps: maximum optimizer steps.
        tol: relative change at which to stop (see ``convergence``); ``None``:
            never stop early.
        window: steps per window of the convergence check.
        convergence: ``"elbo"``: stop when the mean negative ELBO of the last
            ``window`` steps changes by at most ``tol`` relative to the window
            before; ``"params"``: when the global means moved by at most ``tol``
            relative over ``window`` steps.

    Raises:
        ConfigurationError: ``num_steps`` or ``window`` not an integer >= 1,
            ``tol`` negative, or an unknown ``convergence``.

    Examples:
        >>> StoppingConfig(num_steps=2000, tol=None).window
        200
    """

    num_steps: int = 10_000
    tol: float | None = 1e-5
    window: int = 200
    convergence: str = "elbo"

    def __post_init__(self):
        for name in ("num_steps", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigurationError(
                    f"{name}={value!r}; use an integer >= 1."
                )
        if self.convergence not in ("elbo", "params"):
            raise ConfigurationError(
                f"convergence={self.convergence!r}; use 'elbo' or 'params'."
            )
        if self.tol is not None and not self.tol >= 0:
            raise ConfigurationError(f"tol={self.tol!r}; use a number >= 0 or None.")


def _check_args(
    learning_rate,
    local_learning_rate,
    num_particles,
    staleness,
    subsample_size,
    num_steps,
    tol,
    window,
    convergence,
):
    for name, value in (
        ("learning_rate", learning_rate),
        ("local_learning_rate", local_learning_rate),
    ):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ConfigurationError(
                f"{name}={value!r}; the learning rate must be a finite number > 0 "
                "(e.g. 0.01)."
            )
    for name, value, low in (
        ("num_particles", num_particles, 1),
        ("staleness", staleness, 0),
        ("num_steps", num_steps, 1),
        ("window", window, 1),
    ):
        if int(value) != value or value < low:
            raise ConfigurationError(f"{name}={value!r}; use an integer >= {low}.")
    if subsample_size is not None and (
        int(subsample_size) != subsample_size or subsample_size < 1
    ):
        raise ConfigurationError(
            f"subsample_size={subsample_size!r}; use an integer >= 1 (entities per "
            "shard per step) or None for no subsampling."
        )
    if convergence not in ("elbo", "params"):
        raise ConfigurationError(
            f"convergence={convergence!r}; use 'elbo' or 'params'."
        )
    if tol is not None and not tol >= 0:
        raise ConfigurationError(f"tol={tol!r}; use a number >= 0 or None.")


class _Run:
    """The parameter server's state and loop."""

    def __init__(self, objective, cfg, guide, theta, optimizer, staleness, ckpt):
        self.obj, self.pool, self.cfg = objective, objective.pool, cfg
        self.S = objective.num_shards
        self.guide, self.theta, self.opt = guide, theta, optimizer
        self.opt_state = optimizer.init(theta)
        self.staleness = int(staleness)
        self.ckpt = ckpt
        self.version = 0
        self.losses: list[float] = []
        self.loc_history: list[np.ndarray] = []
        self.stale_counts: dict[int, int] = defaultdict(int)
        self.restarts = 0
        self._restarts_per_shard = defaultdict(int)
        neg_entropy = lambda th: -guide.entropy(th)  # noqa: E731
        self._entropy_vg = jax.jit(jax.value_and_grad(neg_entropy))
        self._update = jax.jit(self._update_impl)

    def _update_impl(self, theta, opt_state, grad):
        updates, opt_state = self.opt.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    # ------------------------------------------------------------ checkpoints
    def save(self):
        if self.ckpt is None:
            return
        self.pool_call_all("save_checkpoint", self.version)
        record = dict(
            version=self.version,
            theta=jax.tree.map(np.asarray, self.theta),
            opt_state=jax.tree.map(np.asarray, self.opt_state),
            losses=np.asarray(self.losses),
            fingerprint=self.cfg["fingerprint"],
        )
        save_checkpoint(os.path.join(self.ckpt, "global.npz"), record)

    def resume(self) -> bool:
        path = None if self.ckpt is None else os.path.join(self.ckpt, "global.npz")
        record = None if path is None else load_checkpoint(path)
        if record is None:
            return False
        if record["fingerprint"] != self.cfg["fingerprint"]:
            raise ConfigurationError(
                f"checkpoint_dir {self.ckpt!r} holds a run with other settings "
                f"({record['fingerprint']}) than this one ({self.cfg['fingerprint']}); "
                "use a new checkpoint_dir or the same settings."
            )
        self.theta = jax.tree.map(jnp.asarray, record["theta"])
        self.opt_state = jax.tree.map(jnp.asarray, record["opt_state"])
        self.version = int(record["version"])
        self.losses = list(record["losses"])
        versions = self.pool_call_all("load_checkpoint")
        if any(v is not None and v != self.version for v in versions):
            warnings.warn(
                f"shard checkpoints are at versions {versions} and the server's at "
                f"{self.version} (a run stopped while checkpointing); resuming with "
                "each shard's own locals.",
                RaybayesWarning,
                stacklevel=3,
            )
        return True

    def pool_call_all(self, method, *args):
        return self.obj.call_all(method, *args)

    # ------------------------------------------------------------ workers
    def _restart(self, shard):
        self._restarts_per_shard[shard] += 1
        self.restarts += 1
        if self._restarts_per_shard[shard] > _MAX_RESTARTS:
            raise WorkerLostError(
                shard,
                f"shard worker {shard} was lost {_MAX_RESTARTS + 1} times; giving up. "
                "Check the cluster's logs for the cause (memory, preemption).",
            )
        self.obj.restart_shard(shard)
        self.obj.call(shard, "configure_svi", self.cfg["worker"])
        if self.ckpt is not None:
            self.obj.call(shard, "load_checkpoint")

    # ------------------------------------------------------------ sampling
    def draws(self, num_draws, key, var_names=None):
        """Constrained draws from q: the globals here (noise from
        ``fold_in(key, 0)``), the locals on their shards (noise keyed by entity id,
        :meth:`~raybayes.svi.worker.SVIShardWorker.local_draws`)."""
        noise = (num_draws, self.guide.noise_size)
        eps = jax.random.normal(jax.random.fold_in(key, 0), noise)
        globals_ = np.asarray(self.guide.sample(self.theta, eps))
        out, axes = {}, {}
        # Each draw evaluates the model on a shard's rows: bound the memory.
        chunk = max(1, min(50, int(5e7 // max(self.cfg.get("max_rows", 1), 1))))
        for lo in range(0, num_draws, chunk):
            hi = min(num_draws, lo + chunk)
            results = self.pool_call_all(
                "q_constrained_values", globals_[lo:hi], key, lo, hi, num_draws,
                np.asarray(eps[lo:hi]),
            )
            values, axes = merge_shard_values(results)
            for k, v in values.items():
                if var_names is None or k in var_names:
                    out.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in out.items()}, axes

    # ------------------------------------------------------------ the loop
    def run(
        self,
        num_steps,
        tol,
        window,
        convergence,
        callback,
        callback_every,
        progress,
        checkpoint_every,
    ):
        S, s_max = self.S, self.staleness
        clocks = [self.version] * S
        inflight: dict[int, Any] = {}
        pending: dict[int, dict[int, tuple]] = defaultdict(dict)
        theta_ref = self.obj.put(jax.tree.map(np.asarray, self.theta))
        stop_reason, elapsed, t0 = "max_steps", 0.0, time.perf_counter()
        callback_s = 0.0
        while self.version < num_steps:
            for s in range(S):
                if (
                    s not in inflight
                    and clocks[s] < num_steps
                    and (clocks[s] - self.version <= s_max)
                ):
                    inflight[s] = (
                        self.obj.submit(s, "step", theta_ref, clocks[s]),
                        self.version,
                    )
            done = self.obj.wait([f for f, _ in inflight.values()])
            for fut in done:
                s = fut.tag
                _, used = inflight.pop(s)
                try:
                    loss, grad, clock = self.obj.result(fut)
                except WorkerLostError:
                    self._restart(s)
                    for c in [
                        c for c in pending if c >= self.version and s in pending[c]
                    ]:
                        del pending[c][s]
                    clocks[s] = self.version
                    continue
                pending[clock][s] = (loss, grad)
                self.stale_counts[clock - used] += 1
                clocks[s] = clock + 1
            while len(pending.get(self.version, {})) == S:
                parts = pending.pop(self.version)
                loss = sum(p[0] for p in parts.values())
                grad = jax.tree.map(
                    lambda *g: np.sum(g, axis=0), *[p[1] for p in parts.values()]
                )
                neg_ent, ent_grad = self._entropy_vg(self.theta)
                grad = jax.tree.map(lambda a, b: a + b, grad, ent_grad)
                loss = float(loss + neg_ent)
                if self.version == 0 and not np.isfinite(loss):
                    self._explain_nonfinite(loss)
                self.theta, self.opt_state = self._update(
                    self.theta, self.opt_state, grad
                )
                self.version += 1
                self.losses.append(loss)
                theta_ref = self.obj.put(jax.tree.map(np.asarray, self.theta))
                v = self.version
                if convergence == "params":
                    self.loc_history.append(np.asarray(self.theta["loc"]))
                    self.loc_history = self.loc_history[-(window + 1) :]
                progress.update(v, loss, f"stale<={max(self.stale_counts, default=0)}")
                if self.ckpt is not None and v % checkpoint_every == 0 and not inflight:
                    self.save()
                if callback is not None and v % callback_every == 0:
                    c0 = time.perf_counter()
                    stop = callback(SVIStepInfo(self, v, loss, c0 - t0 - callback_s))
                    callback_s += time.perf_counter() - c0
                    if stop:
                        stop_reason = "callback"
                        break
                if self._converged(tol, window, convergence):
                    stop_reason = "converged"
                    break
            if stop_reason != "max_steps":
                break
        self._drain(inflight)
        elapsed = time.perf_counter() - t0 - callback_s
        if self.ckpt is not None:
            self.save()
        return stop_reason, elapsed

    def _drain(self, inflight):
        for fut, _ in inflight.values():
            try:
                self.obj.result(fut)
            except WorkerLostError:
                pass
        inflight.clear()

    def _converged(self, tol, window, convergence):
        if not tol:
            return False
        if convergence == "elbo":
            if len(self.losses) < 2 * window:
                return False
            new = np.mean(self.losses[-window:])
            old = np.mean(self.losses[-2 * window : -window])
            return abs(new - old) <= tol * max(abs(old), 1e-12)
        if len(self.loc_history) <= window:
            return False
        old, new = self.loc_history[0], self.loc_history[-1]
        return np.linalg.norm(new - old) <= tol * max(np.linalg.norm(old), 1e-12)

    def _explain_nonfinite(self, loss):
        bad = self.pool_call_all("check_init", jax.tree.map(np.asarray, self.theta))
        sites = {}
        for shard, rows in enumerate(bad):
            for name, n, size in rows:
                sites.setdefault(name, (shard, n, size))
        if sites:
            name, (shard, n, size) = next(iter(sites.items()))
            detail = (
                f"site {name!r} has a non-finite log density in {n} of {size} entries "
                f"(first seen on shard {shard}) at the initial values"
            )
        else:
            detail = "no single site is non-finite at the initial means (a draw is)"
        raise ConfigurationError(
            f"the ELBO is not finite at the start ({loss}): {detail}. Check that the "
            "data are in the support of the likelihood and give init_params= inside "
            "the support of every prior."
        )


def fit_svi(
    model: Callable,
    *model_args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    num_shards: int | None = None,
    partition: Partition | None = None,
    source: Any = None,
    backend: str | Backend = "auto",
    num_workers: int | None = None,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    address: str | None = None,
    guide: Any = "normal",
    rank: int | None = None,
    init_scale: float = 0.1,
    init_params: Mapping[str, Any] | None = None,
    subsample_size: int | None = None,
    num_particles: int = 1,
    learning_rate: float = 0.01,
    optimizer: optax.GradientTransformation | None = None,
    local_learning_rate: float | None = None,
    local_optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 10_000,
    stopping: StoppingConfig | None = None,
    staleness: int = 0,
    tol: float | None = 1e-5,
    window: int = 200,
    convergence: str = "elbo",
    seed: int = 0,
    num_samples: int = 1000,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    overwrite: bool = False,
    checkpoint: CheckpointConfig | None = None,
    callback: Callable[[SVIStepInfo], bool | None] | None = None,
    callback_every: int = 100,
    progress_bar: bool = True,
    max_shard_bytes: int | None = None,
    x64: bool = False,
    _worker_slowdown: Mapping[int, float | tuple[float, float]] | None = None,
    **deprecated: Any,
) -> SVIResult:
    """Stochastic variational inference over shards of the data, on a backend.

    The model's data are split along one plate (``partition``, chosen by
    :func:`raybayes.plan` when not given) into ``num_shards`` shards, one worker
    each. The global latent variables get a mean-field (``AutoNormal``) or low-rank
    (``AutoLowRankMultivariateNormal``) Normal guide held by the parameter server
    (the driver); each entity of the split plate (a product, a store) gets a
    mean-field Normal guide held by the shard that owns it. With
    ``guide="structured"`` the globals get a full-rank Normal and each entity's
    block is a full-rank Normal conditioned on them,
    ``q(z_i | g) = N(m_i + B_i (g - mu), L_i L_i^T)``, still held by its shard
    (:mod:`raybayes.svi.guides`):
    hierarchical models get posterior sds that mean-field underestimates. Each
    step every shard subsamples ``subsample_size`` of its entities (all of them by
    default) and returns its unbiased term of the ELBO gradient; see
    :mod:`raybayes.svi.fit`.

    Args:
        model: a NumPyro model with continuous latent variables (discrete ones
            marked ``infer={"enumerate": "parallel"}`` are summed out).
        *model_args: its positional arguments (not split; ``model_args=`` is
            deprecated).
        model_kwargs: its keyword arguments (NumPy arrays and scalars), or ``None``
            with ``source``. Passing them as the second positional argument is
            deprecated.
        num_shards: S, shards and workers (one worker per shard); default
            ``num_workers``, else 1.
        partition: the split; by default :func:`raybayes.plan` chooses it.
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` read on the
            workers (each reads its own partitions; ``partition`` required).
        backend: ``"auto"`` (default; in-process unless the job has several
            shards and the machine several CPUs, or the scaling settings ask for a
            cluster: :func:`raybayes.config.resolve_backend_name`), ``"local"``,
            ``"ray"`` or a :class:`~raybayes.backends.Backend`.
        num_workers: Ray workers (:class:`~raybayes.config.ScalingConfig`); one
            worker per shard, so it sets ``num_shards`` when that is not given and
            must equal it otherwise.
        use_gpu: one GPU per worker (Ray).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        address: a Ray cluster address (``"HOST:PORT"``).
        guide: ``"normal"`` / ``AutoNormal``, ``"lowrank"`` /
            ``AutoLowRankMultivariateNormal`` (low-rank global block, mean-field
            local blocks), or ``"structured"`` (full-rank global block; each
            entity's ``k`` locals full-rank and linear in the globals, ``k (k - 1)
            / 2 + k G`` more parameters per entity, see ``SVIResult.local_params``);
            an autoguide instance built for ``model`` also works.
        rank: rank of the low-rank global factor (default ``round(sqrt(G))``; for
            ``"structured"`` the default ``None`` is a full-rank global block).
        init_scale: initial standard deviation of the guide (unconstrained).
        init_params: constrained initial means of some latent sites (local sites
            over the whole plate), e.g. a MAP; others start at 0 unconstrained.
        subsample_size: B, entities per shard per step (the entities' observations
            come with them); ``None`` uses the whole shard.
        num_particles: Monte Carlo draws of the latents per step.
        learning_rate: step size of the default global optimizer (Adam).
        optimizer: an optax transformation for the globals (overrides
            ``learning_rate``), e.g. with a schedule.
        local_learning_rate: step size of the per-entity Adam (default
            ``learning_rate``); ``local_optimizer`` overrides it.
        num_steps: maximum optimizer steps.
        stopping: ``num_steps``, ``tol``, ``window`` and ``convergence`` as one
            :class:`StoppingConfig` (then leave those keywords at their
            defaults).
        staleness: s of SSP; 0 is bulk-synchronous (BSP).
        tol: relative change at which to stop (see ``convergence``);
            ``tol=None``: never stop early.
        window: steps per window of the convergence check.
        convergence: ``"elbo"``: stop when the mean negative ELBO of the last
            ``window`` steps changes by at most ``tol`` relative to the window
            before; ``"params"``: when the global means moved by at most ``tol``
            relative over ``window`` steps.
        seed: the run's integer seed; the same seed gives the same fit for any
            backend. Step ``c`` uses ``fold_in(derive_key(seed), c)``, the final
            draws ``derive_key(seed, "draws")``.
        num_samples: draws from the fitted q in ``result.idata``
            (``num_draws=`` is the deprecated name).
        checkpoint_dir: where the server writes theta and each shard writes its
            locals every ``checkpoint_every`` steps (atomically); a rerun with the
            same settings resumes, and a lost worker restarts from its shard's
            checkpoint. On a cluster it must be storage every node can reach.
            The first run stores its configuration and a fingerprint of its input
            (content hashes of the model's arguments, the model's qualified name;
            for ``source``, its files' paths, sizes and modification times) in
            ``checkpoint_dir/run.json``; a rerun whose model, data, guide,
            ``rank``, ``init_scale``, ``init_params``, ``subsample_size``,
            ``num_particles``, learning rates, ``num_shards``, ``partition``,
            ``staleness``, ``seed`` or ``x64`` differ (or that passes an own
            ``optimizer`` where the first did not, or the reverse; two custom
            optimizers are not compared) is refused before any worker starts, with
            each change named. ``num_steps``, ``tol``, ``window``, ``convergence``,
            ``num_samples``, ``checkpoint_every``, ``callback``, ``progress_bar``,
            ``max_shard_bytes`` and the backend and worker settings may change.
        checkpoint_every: steps between checkpoints.
        overwrite: with ``checkpoint_dir``, delete the folder's checkpoint
            (``run.json``, ``global.npz``, ``shard-*.npz``) first and start fresh.
        checkpoint: ``checkpoint_dir``, ``checkpoint_every`` and ``overwrite`` as
            one :class:`~raybayes.config.CheckpointConfig` (then leave those
            keywords at their defaults).
        callback: called as ``callback(info)`` every ``callback_every`` steps;
            returning ``True`` stops the fit.
        progress_bar: show the loss and steps (rich).
        max_shard_bytes: the memory budget of one worker for its data; a shard
            larger than that raises before any step.
        x64: compute in float64 on the workers.

    Returns:
        :class:`SVIResult`.

    Raises:
        ConfigurationError: a learning rate <= 0, a subsample larger than a shard,
            ``stopping=`` or ``checkpoint=`` together with one of their keywords,
            ``num_workers`` different from ``num_shards``, an unknown argument,
            a guide or ``init_params`` that does not match the model's sites, a
            shard over ``max_shard_bytes``, or a non-finite ELBO at the start (the
            message names the site).
        ShardError: the model raised on a worker (names the shard, with the
            worker's traceback).
        WorkerLostError: a worker was lost more than 5 times.

    References:
        Hoffman, Blei, Wang & Paisley (2013). Stochastic variational inference. JMLR.
        Hoffman & Blei (2015). Structured stochastic variational inference.
        AISTATS. https://arxiv.org/abs/1404.4114
        Agrawal & Domke (2021). Amortized variational inference for simple
        hierarchical models. NeurIPS. https://arxiv.org/abs/2111.03144
        Kucukelbir et al. (2017). Automatic differentiation variational inference.
        Ho et al. (2013). More effective distributed ML via a stale synchronous
        parallel parameter server. NeurIPS.
    """
    model_args, model_kwargs = split_model_arguments(
        model_args, model_kwargs, deprecated
    )
    num_samples = renamed_argument(deprecated, "num_draws", "num_samples",
                                   num_samples, default=1000)
    progress_bar = renamed_argument(deprecated, "progress", "progress_bar",
                                    progress_bar, default=True)
    reject_unknown_arguments(deprecated, "fit_svi")
    stopping = config_or_keywords("stopping", stopping, StoppingConfig, dict(
        num_steps=("num_steps", num_steps), tol=("tol", tol),
        window=("window", window), convergence=("convergence", convergence),
    ))
    num_steps, tol = stopping.num_steps, stopping.tol
    window, convergence = stopping.window, stopping.convergence
    checkpoint = config_or_keywords("checkpoint", checkpoint, CheckpointConfig, dict(
        directory=("checkpoint_dir", checkpoint_dir),
        every=("checkpoint_every", checkpoint_every),
        overwrite=("overwrite", overwrite),
    ))
    checkpoint_dir, checkpoint_every = checkpoint.directory, checkpoint.every
    overwrite = checkpoint.overwrite
    scaling, backend = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address
    )
    num_shards = shard_count(num_shards, scaling)
    family, rank, init_scale = resolve_guide(guide, model, rank, init_scale)
    _check_args(
        learning_rate,
        local_learning_rate,
        num_particles,
        staleness,
        subsample_size,
        num_steps,
        tol,
        window,
        convergence,
    )
    if not init_scale > 0:
        raise ConfigurationError(f"init_scale={init_scale!r}; use a number > 0.")
    custom_optimizer, custom_local = optimizer is not None, local_optimizer is not None
    if optimizer is None:
        optimizer = optax.adam(learning_rate)
    if local_optimizer is None:
        local_optimizer = optax.adam(local_learning_rate or learning_rate)
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        _open_run(checkpoint_dir, overwrite, dict(
            **data_fingerprint(model, model_args, model_kwargs),
            source=_source_fingerprint(source),
            guide=family, rank=rank, init_scale=init_scale,
            init_params={k: content_hash(v) for k, v in (init_params or {}).items()},
            subsample_size=subsample_size, num_particles=num_particles,
            optimizer="custom" if custom_optimizer else "adam",
            learning_rate=None if custom_optimizer else learning_rate,
            local_optimizer="custom" if custom_local else "adam",
            local_learning_rate=None if custom_local else (
                local_learning_rate or learning_rate),
            num_shards=num_shards, partition=repr(partition), staleness=staleness,
            seed=seed, x64=bool(x64),
        ))
    start = time.perf_counter()
    objective = planned_objective(
        model,
        model_kwargs,
        num_shards,
        partition=partition,
        backend=backend,
        source=source,
        model_args=model_args,
        objective_class=SVIObjective,
        x64=x64,
        scaling=scaling,
    )
    progress = None
    x64_context = jax.enable_x64(x64)
    x64_context.__enter__()
    try:
        slow = {
            int(k): (v if isinstance(v, tuple) else (float(v), 1.0))
            for k, v in (_worker_slowdown or {}).items()
        }
        worker_cfg = SVIWorkerConfig(
            family=family,
            rank=rank,
            init_scale=init_scale,
            subsample_size=subsample_size,
            num_particles=num_particles,
            seed=seed,
            local_optimizer=local_optimizer,
            checkpoint_dir=checkpoint_dir,
            init_params=dict(init_params or {}),
        )
        infos = objective.gather(
            "configure_svi",
            lambda s: (dataclasses.replace(worker_cfg, slowdown=slow.get(s)),),
        )
        data_bytes = [int(i["data_bytes"]) for i in infos]
        if max_shard_bytes is not None and max(data_bytes) > max_shard_bytes:
            worst = int(np.argmax(data_bytes))
            raise ConfigurationError(
                f"shard {worst} holds {data_bytes[worst]:,} bytes of data, over "
                f"max_shard_bytes={max_shard_bytes:,}; use more shards (at least "
                f"{int(np.ceil(sum(data_bytes) / max_shard_bytes))})."
            )
        gguide = GlobalGuide(objective.num_global, family, rank, init_scale)
        dtype = np.float64 if x64 else np.float32
        theta = jax.tree.map(jnp.asarray, gguide.init(infos[0]["init_global"], dtype))
        fingerprint = dict(
            family=family,
            rank=gguide.rank,
            num_shards=objective.num_shards,
            num_global=objective.num_global,
            subsample_size=subsample_size,
            num_particles=num_particles,
            seed=seed,
        )
        cfg = dict(worker=worker_cfg, fingerprint=fingerprint,
                   max_rows=max(int(i["num_rows"]) for i in infos))
        run = _Run(objective, cfg, gguide, theta, optimizer, staleness, checkpoint_dir)
        run.resume()
        setup_s = time.perf_counter() - start
        progress = LossProgress(num_steps, "SVI", enabled=progress_bar)
        progress.update(run.version, float("nan"))
        stop_reason, elapsed = run.run(
            num_steps,
            tol,
            window,
            convergence,
            callback,
            callback_every,
            progress,
            checkpoint_every,
        )
        progress.close()
        progress = None
        t1 = time.perf_counter()
        samples, axes = run.draws(num_samples, derive_key(seed, "draws"))
        idata = draws_to_inference_data(
            samples,
            axes,
            objective.partition.plate if objective.partition is not None else None,
            attrs={
                "inference": f"svi ({family})",
                "num_steps": run.version,
                "stop_reason": stop_reason,
            },
        )
        memory = run.pool_call_all("memory_usage")
        locals_ = run.pool_call_all("local_params")
        local_params = _merge_locals(locals_)
        params = {
            "loc": np.asarray(run.theta["loc"]),
            "scale": np.asarray(jax.nn.softplus(run.theta["scale_raw"])),
        }
        if gguide.block == "lowrank":
            params["cov_factor"] = (
                np.asarray(run.theta["cov_factor"]) * params["scale"][:, None]
            )
        elif gguide.block == "full":
            params["scale_tril"] = np.asarray(gguide.scale_tril(run.theta))
        return SVIResult(
            params=params,
            local_params=local_params,
            idata=idata,
            losses=np.asarray(run.losses),
            num_steps=run.version,
            stop_reason=stop_reason,
            time_s=elapsed,
            setup_s=setup_s,
            draws_s=time.perf_counter() - t1,
            staleness=dict(sorted(run.stale_counts.items())),
            restarts=run.restarts,
            data_bytes=data_bytes,
            peak_rss_bytes=[m["peak_rss_bytes"] for m in memory],
            global_sites=objective.global_sites,
            family=family,
            posterior_samples=samples,
        )
    finally:
        x64_context.__exit__(None, None, None)
        if progress is not None:
            progress.close()
        objective.close()


# -- reruns: the settings a resumed run must share with the first ---------------------
_RESUME_KEYS = (
    "model", "data", "source", "guide", "rank", "init_scale", "init_params",
    "subsample_size", "num_particles", "optimizer", "learning_rate",
    "local_optimizer", "local_learning_rate", "num_shards", "partition",
    "staleness", "seed", "x64",
)


def _open_run(checkpoint_dir, overwrite, config):
    """Store or check the run's configuration (see ``checkpoint_dir`` of fit_svi)."""
    open_run(
        checkpoint_dir, config, keys=_RESUME_KEYS, overwrite=overwrite,
        checkpoint_files=("global.npz", "global.pkl", "shard-*.npz", "shard-*.pkl"),
    )


def _source_fingerprint(source):
    """A ``source``'s files (paths, sizes, modification times), or ``None``."""
    if source is None:
        return None
    files = list(getattr(source, "files", None) or [])
    root = getattr(source, "path", None)
    if root is not None and os.path.isdir(root):
        files += sorted(
            os.path.join(d, f) for d, _, names in os.walk(root) for f in names
        )
    stats = []
    for f in files:
        st = os.stat(f) if os.path.exists(f) else None
        stats.append((f, st and st.st_size, st and st.st_mtime_ns))
    return dict(
        type=type(source).__qualname__,
        partition_column=getattr(source, "partition_column", None),
        columns=getattr(source, "columns", None),
        files=content_hash(stats),
    )


def _merge_locals(parts):
    ids = np.concatenate([p["entity_ids"] for p in parts])
    if sum(len(p["loc"]) for p in parts) != len(ids):  # no local sites (row split)
        ids = np.zeros(0, ids.dtype)
    order = np.argsort(ids, kind="stable")
    out = {
        name: np.concatenate([p[name] for p in parts])[order]
        for name in parts[0]
        if name != "entity_ids"
    }
    out["entity_ids"] = ids[order]
    return out
