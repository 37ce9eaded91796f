"""Embarrassingly parallel MCMC: NUTS on every shard's subposterior, then combined.

The data are split along one plate into M shards (:func:`raybayes.plan`). Shard m's
subposterior is the model run on shard m's data with every global site (outside the
split plate) scaled by ``1/M`` (:class:`~raybayes.core.scale_global_sites`): the
shard log density of the core, whose sum over shards is the full log joint. Each
subposterior is sampled by the chain-parallel NUTS of :func:`raybayes.sample`, so
its chains are chunked over workers, survive a lost worker, checkpoint, and can run
to a target ESS/R-hat; shards never communicate. All shards' chains share one
worker pool and run at once. The global draws are then
combined by a rule of :mod:`raybayes.core.combination`, in the unconstrained space,
and checked by :func:`~raybayes.core.combination.diagnose_combination`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raybayes.errors import (
    ConfigurationError,
    RaybayesWarning,
    RemoteTaskError,
    ShardError,
)

__all__ = [
    "COMBINATION_RULES",
    "SubposteriorModel",
    "sample_subposteriors",
    "unconstrained_global_draws",
]

#: Names accepted by ``sample_subposteriors(combination=...)``.
COMBINATION_RULES = (
    "consensus",
    "consensus_diagonal",
    "gaussian_product",
    "semiparametric",
    "nonparametric",
)


class SubposteriorModel:
    """One shard's subposterior as a NumPyro model: global sites scaled by ``1/M``.

    Calling it runs ``model`` under
    :class:`~raybayes.core.shard_density.scale_global_sites`, so NUTS on it targets
    ``p(theta)^(1/M) p(y_m | theta)`` (in the unconstrained space, the log Jacobians
    of global sites are scaled by ``1/M`` too, so the M subposteriors multiply to the
    full posterior there).

    Args:
        model: the NumPyro model.
        num_shards: M.
        local_plates: plates whose sites belong to a shard (not scaled).
    """

    def __init__(self, model: Callable, num_shards: int, local_plates=frozenset()):
        self.model = model
        self.num_shards = int(num_shards)
        self.local_plates = frozenset(local_plates)
        name = getattr(model, "__qualname__", type(model).__name__)
        # A stable name: checkpoints compare it between runs.
        self.__qualname__ = f"subposterior[{name}, 1/{self.num_shards}]"

    def __call__(self, *args, **kwargs):
        from raybayes.core.shard_density import scale_global_sites

        scaled = scale_global_sites(
            self.model, 1.0 / self.num_shards, self.local_plates
        )
        return scaled(*args, **kwargs)


def _resolve(ref):
    """The value behind an object-store reference (Ray), or the value itself."""
    if type(ref).__name__ == "ObjectRef":
        import ray

        return ray.get(ref)
    return ref


class _ShardRunners:
    """One worker's NUTS runners, one per shard it has run a chain of.

    A worker receives references to every shard's arguments but fetches a shard's
    arrays only when it first runs one of that shard's chains; the scheduler keeps
    each worker on the shards it already holds whenever they have work.
    """

    accepts_worker_index = True

    def __init__(
        self,
        model,
        shard_args,
        num_warmup,
        chunk_size,
        kernel_kwargs,
        model_args=(),
        *,
        worker_index=0,
    ):
        self.model = model
        self.shard_args = list(shard_args)
        self.num_warmup = num_warmup
        self.chunk_size = chunk_size
        self.kernel_kwargs = kernel_kwargs
        self.model_args = tuple(model_args)
        self.worker_index = worker_index
        self.runners = {}
        self.data = {}

    def _data(self, shard):
        """``(model_args, model_kwargs, entity_ids)`` of a shard, read once."""
        if shard not in self.data:
            value = _resolve(self.shard_args[shard])
            if hasattr(value, "read_shard"):  # a Parquet source: read here only
                kwargs, ids = value.read_shard(shard, len(self.shard_args))
                self.data[shard] = (self.model_args, kwargs, np.asarray(ids))
            else:
                self.data[shard] = (*value, None)
        return self.data[shard]

    def _runner(self, shard):
        if shard not in self.runners:
            from raybayes.mcmc.sampler import _make_runner

            args, kwargs, _ = self._data(shard)
            self.runners[shard] = _make_runner(
                self.model,
                (args, kwargs),
                self.num_warmup,
                self.chunk_size,
                self.kernel_kwargs,
                worker_index=self.worker_index,
            )
        return self.runners[shard]

    def describe(self, shard, partition):
        """What the driver needs of a shard it does not read: the latent sites,
        ArviZ dims, a data fingerprint (checkpoints), the entity ids and rows."""
        from raybayes.checkpoint import data_fingerprint
        from raybayes.core.shard_density import trace_latent_sites
        from raybayes.core.validation import check_observed_data
        from raybayes.results import model_site_info

        args, kwargs, ids = self._data(shard)
        check_observed_data(self.model.model, args, kwargs)
        sites, _ = trace_latent_sites(self.model.model, kwargs, partition, args)
        site_dims, _, observed = model_site_info(self.model, args, kwargs)
        lengths = [np.shape(v)[0] for v in kwargs.values() if np.ndim(v) >= 1]
        return dict(
            sites=sites,
            site_dims=site_dims,
            observed_names=sorted(observed),
            fingerprint=data_fingerprint(self.model, args, kwargs),
            entity_ids=ids,
            num_rows=int(max(lengths, default=0)),
        )

    def ping(self) -> bool:
        return True

    def init_chain(self, shard, *args):
        return self._runner(shard).init_chain(*args)

    def advance(self, shard, *args):
        return self._runner(shard).advance(*args)


class _ShardPoolView:
    """The shared pool as one shard's scheduler sees it: calls carry the shard."""

    def __init__(self, pool, shard):
        self.pool, self.shard, self.size = pool, shard, pool.size

    def submit(self, worker, method, *args, tag=None):
        if method == "ping":
            return self.pool.submit(worker, method, tag=tag)
        return self.pool.submit(worker, method, self.shard, *args, tag=tag)

    def result(self, fut):
        return self.pool.result(fut)

    def restart(self, worker):
        self.pool.restart(worker)

    def wait(self, futures, timeout_s=None):
        return self.pool.wait(futures, timeout_s=timeout_s)


def _run_shards(pool, schedulers, specs, partition):
    """Run every shard's chains on one pool, all shards at once.

    Each shard keeps its own :class:`~raybayes.mcmc.sampler._ChainScheduler`
    (stopping rule, checkpoints, keys); this loop hands each free worker the
    chain that is furthest behind among the shards that worker already holds,
    else among all shards. A chain's draws depend only on its key and the chunk
    size, so they are the ones a shard-by-shard run gives.

    Returns:
        ``(outcomes, finished_s, worker_s)`` per shard: the scheduler's outcome,
        seconds from the start until the shard stopped, and the worker-seconds
        its chunks took.
    """
    from raybayes.errors import WorkerLostError

    num = len(schedulers)
    for sched in schedulers:
        sched._resume()
        sched._pool_if_ready()
    idle = list(range(pool.size))
    pending: list = []
    for sched in schedulers:
        sched.pending = pending
    owner: dict[int, tuple[int, float]] = {}
    holds = [set() for _ in range(pool.size)]
    done = [False] * num
    start = time.perf_counter()
    finished = [0.0] * num
    worker_s = [0.0] * num
    try:
        while True:
            for m, sched in enumerate(schedulers):
                if not done[m] and (
                    sched.outcome.get("stop_reason") or sched._evaluate()
                ):
                    done[m] = True
                    finished[m] = time.perf_counter() - start
            if all(done):
                break
            for worker in list(idle):
                best = None
                for m, sched in enumerate(schedulers):
                    if done[m]:
                        continue
                    chain = sched._pick(worker)
                    if chain is None:
                        continue
                    total = sched.num_warmup + sched.limit
                    rank = (
                        m not in holds[worker],
                        (chain.warmup_done + chain.samples_done) / total,
                        m,
                        chain.chain_id,
                    )
                    if best is None or rank < best[0]:
                        best = (rank, m, chain)
                if best is None:
                    continue
                _, m, chain = best
                sched = schedulers[m]
                method, args = sched._next_work(chain)
                idle.remove(worker)
                chain.running = True
                holds[worker].add(m)
                t0 = time.perf_counter()
                fut = sched.pool.submit(worker, method, *args, tag=chain.chain_id)
                owner[id(fut)] = (m, t0)
                pending.append(fut)
            if not pending:
                if not idle:
                    raise WorkerLostError(
                        -1,
                        "every worker was lost and could not be restarted; last "
                        f"error: {[s.last_loss for s in schedulers]}",
                    )
                continue
            for fut in pool.wait(pending):
                pending.remove(fut)
                if fut.tag == "__ping__":
                    schedulers[0]._handle(fut, idle)
                    continue
                m, t0 = owner.pop(id(fut))
                worker_s[m] += time.perf_counter() - t0
                sched = schedulers[m]
                if done[m]:  # a speculative chunk past the shard's stopping point
                    sched.chains[fut.tag].running = False
                    try:
                        pool.result(fut)
                        idle.append(fut.worker_index)
                    except WorkerLostError as err:
                        holds[fut.worker_index].clear()
                        sched._restart(fut.worker_index, err)
                    continue
                try:
                    sched._handle(fut, idle)
                except RemoteTaskError as err:
                    spec = specs[m]
                    raise ShardError(
                        m,
                        f"{err.kind} {err.unit_id} of shard {m} (entities "
                        f"{spec.entity_start}..{spec.entity_stop - 1} of plate "
                        f"{partition.plate!r}): {err.message}",
                        err.remote_traceback,
                    ) from None
                if fut.worker_index not in idle:  # lost: restarted, holds nothing
                    holds[fut.worker_index].clear()
    finally:
        for sched in schedulers:
            sched.bar.close()
    outcomes = []
    for sched in schedulers:
        if sched.outcome["draws_per_chain"] == 0:
            raise RuntimeError(
                f"the run stopped ({sched.outcome['stop_reason']}) before any chain "
                "finished a sampling chunk."
            )
        sched.outcome["worker_restarts"] = int(sum(sched.restarts))
        outcomes.append(sched.outcome)
    return outcomes, finished, worker_s


def _sample_shards(
    engine,
    owns_engine,
    sub_model,
    model_args,
    model_kwargs,
    partition,
    specs,
    checkpoint_dir,
    nuts,
    source=None,
):
    """NUTS on every shard's subposterior, all shards' chains on one worker pool.

    The set-up of :func:`raybayes.sample`, once per shard (settings with the key
    stream ``(m,)``, stopping rule, checkpoint store in ``shard_<m>``), then one
    pool over shards x chains (:func:`_run_shards`). Each shard's arguments are
    put in the object store once and fetched only by the workers that run that
    shard's chains.

    With ``source`` (a :class:`~raybayes.datasets.parquet.ParquetShards`), no
    arrays pass through the driver: each shard's partitions are read by the first
    worker that runs one of its chains, which also describes the shard (sites,
    dims, a fingerprint for checkpoints) before sampling starts.

    Returns:
        ``(idatas, finished_s, worker_s, num_workers, descriptions)``;
        ``descriptions`` is ``None`` without ``source``.
    """
    from raybayes.checkpoint import data_fingerprint
    from raybayes.core.partition import shard_model_kwargs
    from raybayes.core.validation import check_observed_data
    from raybayes.mcmc.sampler import (
        _ChainScheduler,
        _check_arguments,
        _default_chunk_size,
        _open_store,
        _RunSettings,
        _StoppingRule,
        _to_inference_data,
        _trace_model,
    )

    _check_arguments(
        sub_model,
        num_chains=nuts["num_chains"],
        num_warmup=nuts["num_warmup"],
        num_samples=nuts["num_samples"],
        chunk_size=nuts["chunk_size"],
        target_accept_prob=nuts["target_accept_prob"],
        kernel_kwargs=None,
        target_ess=nuts["target_ess"],
        target_rhat=nuts["target_rhat"],
        target_var_names=None,
        max_samples=nuts["max_samples"],
        max_time_s=None,
        cross_chain_adaptation=False,
        scheduling="dynamic",
    )
    if source is None:
        check_observed_data(sub_model.model, model_args, model_kwargs)
    num_chains, num_warmup = int(nuts["num_chains"]), int(nuts["num_warmup"])
    num_samples = int(nuts["num_samples"])
    chunk_size = nuts["chunk_size"] or _default_chunk_size(num_warmup, num_samples)
    kernel_kwargs = dict(
        target_accept_prob=nuts["target_accept_prob"],
        max_tree_depth=nuts["max_tree_depth"],
        dense_mass=nuts["dense_mass"],
    )
    target_ess, target_rhat = nuts["target_ess"], nuts["target_rhat"]
    has_target = target_ess is not None or target_rhat is not None
    max_samples = nuts["max_samples"]
    stopping = _StoppingRule(
        target_ess=target_ess,
        target_rhat=target_rhat,
        var_names=None,
        num_samples=num_samples,
        max_samples=(max_samples or 10 * num_samples) if has_target else num_samples,
        max_time_s=None,
        step=chunk_size,
    )
    engine.start()
    try:
        num_workers = nuts["num_workers"]
        if num_workers is None:
            num_workers = max(
                1, min(num_chains * len(specs), engine.default_num_workers())
            )
        if source is None:
            shard_kwargs = [
                shard_model_kwargs(model_kwargs, partition, spec) for spec in specs
            ]
            shard_args = [engine.put((model_args, k)) for k in shard_kwargs]
        else:
            shard_args = [engine.put(source)] * len(specs)
        pool = engine.create_pool(
            _ShardRunners,
            (sub_model, shard_args, num_warmup, chunk_size, kernel_kwargs, model_args),
            num_workers=num_workers,
            name="subposterior-nuts",
        )
        try:
            descriptions = None
            if source is not None:
                futs = [
                    pool.submit(m % pool.size, "describe", m, partition, tag=m)
                    for m in range(len(specs))
                ]
                descriptions = []
                for m, fut in enumerate(futs):
                    while fut not in pool.wait([fut]):
                        pass
                    try:
                        descriptions.append(pool.result(fut))
                    except RemoteTaskError as err:
                        raise ShardError(
                            m,
                            f"shard {m} could not be read: {err.message}",
                            err.remote_traceback,
                        ) from None
                if all(s.is_local for s in descriptions[0]["sites"].values()):
                    raise ConfigurationError(
                        f"splitting plate {partition.plate!r} leaves no global site "
                        "to combine: every latent site belongs to a shard."
                    )
            per_shard = []
            for spec in specs:
                m = spec.shard_id
                settings = _RunSettings(
                    num_chains=num_chains,
                    num_warmup=num_warmup,
                    seed=nuts["seed"],
                    chunk_size=chunk_size,
                    kernel_kwargs=kernel_kwargs,
                    init_params=None,
                    cross_chain_adaptation=False,
                    static_scheduling=False,
                    worker_slowdown=None,
                    progress_bar=nuts["progress_bar"],
                    key_stream=(m,),
                )
                if source is None:
                    site_dims, site_coords, observed = _trace_model(
                        sub_model, model_args, shard_kwargs[m], None, None, None
                    )
                    fingerprint = data_fingerprint(
                        sub_model, model_args, shard_kwargs[m]
                    )
                else:
                    site_dims = descriptions[m]["site_dims"]
                    site_coords, observed = {}, {}
                    fingerprint = descriptions[m]["fingerprint"]
                store = None
                if checkpoint_dir is not None:
                    store = _open_store(
                        str(Path(checkpoint_dir) / f"shard_{m:03d}"),
                        settings,
                        num_samples,
                        sub_model,
                        site_dims,
                        site_coords,
                        rerun=dict(
                            **fingerprint,
                            init_params=None,
                            target_ess=target_ess,
                            target_rhat=target_rhat,
                            target_var_names=None,
                        ),
                        overwrite=False,
                    )
                per_shard.append(
                    (None, settings, site_dims, site_coords, observed, store)
                )
            schedulers = [
                _ChainScheduler(
                    _ShardPoolView(pool, m),
                    num_chains=num_chains,
                    num_warmup=num_warmup,
                    seed=settings.seed,
                    chunk_size=chunk_size,
                    init_params=None,
                    stopping=stopping,
                    store=store,
                    progress_bar=settings.progress_bar,
                    key_stream=settings.key_stream,
                )
                for m, (_, settings, _, _, _, store) in enumerate(per_shard)
            ]
            outcomes, finished, worker_s = _run_shards(
                pool, schedulers, specs, partition
            )
        finally:
            pool.shutdown()
    finally:
        if owns_engine:
            engine.shutdown()
    idatas = [
        _to_inference_data(
            sched.chains,
            outcome,
            observed,
            site_dims,
            site_coords,
            settings,
            num_workers,
            engine.name,
        )
        for sched, outcome, (_, settings, site_dims, site_coords, observed, _) in zip(
            schedulers, outcomes, per_shard, strict=True
        )
    ]
    return idatas, finished, worker_s, num_workers, descriptions


def _entity_counts(partition, model_kwargs):
    num = partition.num_entities(model_kwargs)
    if partition.index_arg is None:
        return num
    index = np.asarray(model_kwargs[partition.index_arg])
    return np.bincount(index, minlength=num)


def _labels(name, shape):
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def _flatten_globals(posterior, global_sites, num_draws):
    """``(num_chains * num_draws, dim)`` unconstrained global draws, and labels."""
    import jax.numpy as jnp

    cols, labels = [], []
    for s in global_sites:
        value = np.asarray(posterior[s.name].values)[:, :num_draws]
        c, n = value.shape[:2]
        u = np.asarray(s.transform.inv(jnp.asarray(value)), np.float64)
        cols.append(u.reshape(c * n, -1))
        labels += _labels(s.name, s.unconstrained_shape)
    return np.concatenate(cols, axis=1), labels


def _unflatten_globals(flat, global_sites, num_chains, num_draws):
    import jax.numpy as jnp

    out, offset = {}, 0
    for s in global_sites:
        size = int(np.prod(s.unconstrained_shape, dtype=int))
        u = flat[:, offset : offset + size].reshape(
            num_chains, num_draws, *s.unconstrained_shape
        )
        out[s.name] = np.asarray(s.transform(jnp.asarray(u)))
        offset += size
    return out


def _shard_diagnostics(idata, var_names):
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = idata.posterior[var_names]
        out = {
            "ess_bulk_min": float(
                min(np.nanmin(v) for v in az.ess(ds).data_vars.values())
            )
        }
        if ds.sizes["chain"] > 1:
            rhat = {k: float(np.nanmax(v)) for k, v in az.rhat(ds).data_vars.items()}
            worst = max(rhat, key=rhat.get)
            out["r_hat_max"], out["r_hat_max_site"] = rhat[worst], worst
    return out


def unconstrained_global_draws(idata, model, *model_args, model_kwargs=None):
    """The flattened, unconstrained global draws of a :func:`sample_subposteriors` run.

    What the combination rules and diagnostics of :mod:`raybayes.core.combination`
    take, to try another rule or other thresholds on the same draws.

    Args:
        idata: the result of :func:`sample_subposteriors` (``num_shards > 1``).
        model: the model.
        *model_args: its positional arguments.
        model_kwargs: its keyword arguments (traced once, for the supports of the
            global sites).

    Returns:
        ``(draws, combined, labels)``: ``draws`` ``(num_shards, num_chains *
        num_draws, dim)`` per shard, ``combined`` ``(num_chains * num_draws, dim)``,
        and the ``dim`` parameter labels (``"beta[0]"``, ...).

    Raises:
        ConfigurationError: ``idata`` is not the result of a split run.
    """
    from raybayes.core.shard_density import trace_latent_sites

    if "global_sites" not in idata.attrs:
        raise ConfigurationError(
            "idata has no global_sites attribute: pass the result of "
            "sample_subposteriors with num_shards > 1."
        )
    sites, _ = trace_latent_sites(model, dict(model_kwargs or {}), None, model_args)
    names = list(np.atleast_1d(idata.attrs["global_sites"]))
    global_sites = [sites[n] for n in names]
    n = int(idata.attrs["draws_per_chain"])
    draws = np.stack(
        [
            _flatten_globals(idata[f"shard_{m}"], global_sites, n)[0]
            for m in range(int(idata.attrs["num_shards"]))
        ]
    )
    combined, labels = _flatten_globals(idata.posterior, global_sites, n)
    return draws, combined, labels


def sample_subposteriors(
    model: Callable,
    *model_args,
    model_kwargs: dict | None = None,
    num_shards: int = 2,
    partition=None,
    source=None,
    combination: str = "consensus",
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    seed: int = 0,
    backend: Any = "auto",
    num_workers: int | None = None,
    address: str | None = None,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    chunk_size: int | None = None,
    target_ess: float | None = None,
    target_rhat: float | None = None,
    max_samples: int | None = None,
    checkpoint_dir: str | None = None,
    progress_bar: bool = True,
):
    """Embarrassingly parallel MCMC: NUTS on each shard's subposterior, combined.

    The data are split into ``num_shards`` shards along one plate (chosen by
    :func:`raybayes.plan`, or ``partition``). Shard m's subposterior, the model on
    shard m's data with every global site (prior included) scaled by
    ``1/num_shards``, is sampled by the chain-parallel NUTS of
    :func:`raybayes.sample`: chains chunked over workers, a lost worker's chains
    resumed elsewhere, checkpoints, run to a target ESS/R-hat. Shards never
    communicate. All shards' chains run at once on one pool of workers: a free
    worker takes the chain furthest behind among the shards it already holds,
    else among all shards, so each shard's arrays (put once in the object store,
    or read from its Parquet partitions) reach only the workers that run its
    chains. Chain c of shard m uses the key ``derive_key(seed, m, c)``, so the
    draws do not depend on the number of workers, the backend, or which shards
    ran beside it.

    The global sites' draws are combined in the unconstrained space (every site
    mapped to the real line by ``biject_to(support).inv``): there the M
    subposteriors multiply exactly to the full posterior, and they are nearest to
    Gaussian, which consensus and the Gaussian product assume. Draw ``s`` of chain
    ``c`` of every shard forms combined draw ``(c, s)``; with targets, every shard
    is cut to the fewest draws per chain among shards. Local sites (inside the split
    plate) belong to one shard and are reported from it, concatenated along their
    plate: they are that shard's draws under its own subposterior, not redrawn
    given the combined globals. Deterministic sites stay in the shards' groups.

    With ``num_shards=1`` this is :func:`raybayes.sample` (ordinary NUTS on the
    full posterior), with a note.

    Args:
        model: a NumPyro model.
        *model_args: positional model arguments (never split; every shard gets them).
        model_kwargs: keyword model arguments; the split plate's arrays are among
            them.
        num_shards: M, the number of shards (>= 1).
        partition: a :class:`raybayes.Partition` saying how to split; by default
            :func:`raybayes.plan` chooses (required with ``source``).
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` instead of
            ``model_kwargs``: shard m is a contiguous block of the partitions,
            balanced by rows (see
            :meth:`~raybayes.datasets.parquet.ParquetShards.shard_blocks`), read (and turned into model arguments by the source's
            ``to_model_kwargs``) only by the workers that run shard m's chains;
            the driver lists the partitions (metadata) and never reads rows. The
            result then has no ``observed_data`` group, and the entity ranges of
            the shard groups count partitions.
        combination: ``"consensus"`` (Scott et al. 2016, full-covariance weights;
            default), ``"consensus_diagonal"``, ``"gaussian_product"`` (parametric,
            Neiswanger et al. 2014), ``"semiparametric"`` or ``"nonparametric"``
            (kernel products of Neiswanger et al. 2014, no Gaussian assumption, up to
            about 10 global parameters).
        num_chains: chains per shard.
        num_warmup: warmup iterations per chain.
        num_samples: draws per chain (the minimum, with a target).
        seed: integer root seed.
        backend: ``"auto"`` (Ray when there are several chains and CPUs),
            ``"local"``, ``"ray"`` or a backend instance (reused, not shut down).
        num_workers: worker count (default: one per chain of every shard, at most
            the CPUs).
        address: Ray cluster address, e.g. ``"10.0.0.1:6379"``.
        use_gpu: one GPU per worker.
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        target_accept_prob: NUTS target acceptance probability, in (0, 1).
        max_tree_depth: maximum NUTS tree depth.
        dense_mass: adapt a dense mass matrix.
        chunk_size: iterations per unit of remote work (see :func:`raybayes.sample`).
        target_ess: run each shard until the bulk and tail ESS of its sites reach
            this (as in :func:`raybayes.sample`).
        target_rhat: run each shard until the R-hat of its sites is at most this.
        max_samples: the most draws per chain with a target.
        checkpoint_dir: each shard checkpoints in ``checkpoint_dir/shard_<m>``;
            calling again with the same arguments resumes every shard.
        progress_bar: one progress bar per chain.

    Returns:
        ``arviz.InferenceData``. ``posterior``: the combined draws of the global
        sites, ``(num_chains, num_draws, *site_shape)``, and the local sites from
        their shards. ``sample_stats``: NUTS statistics with a ``shard`` dimension.
        One group per shard, ``shard_0`` ... ``shard_<M-1>``, with that shard's
        posterior draws (its ``attrs`` hold its entity range, ``r_hat_max``,
        ``ess_bulk_min``, ``finished_s``, the seconds from the start until it
        stopped, and ``worker_s``, the worker-seconds its chunks took). ``attrs``:
        the rule, the split plate, ``worker_restarts`` (workers replaced because a
        call to them was lost; their chains resumed elsewhere),
        ``combination_summary`` ("combination reliable" or the parameter and
        reason), and the diagnostic figures of
        :meth:`~raybayes.core.combination.CombinationDiagnostics.to_attrs`.

    Raises:
        ConfigurationError: a bad argument, more shards than entries of the split
            plate (or than Parquet partitions), ``source`` without ``partition``
            or with ``model_kwargs``, or a model with no plate to split (checked
            before sampling).
        DataValidationError: the split arrays disagree in length.
        ShardError: a chain of a shard failed; names the shard and the chain, and
            carries the worker's traceback.

    Warns:
        RaybayesWarning: ``num_shards=1`` (ordinary NUTS), or a diagnostic fired
            (the warning repeats ``combination_summary``; see docs/consensus.md).

    References:
        Scott, Blocker, Bonassi, Chipman, George & McCulloch (2016), Bayes and big
        data: the consensus Monte Carlo algorithm, IJMSEM 11(2).
        Neiswanger, Wang & Xing (2014), Asymptotically exact, embarrassingly parallel
        MCMC, UAI. https://arxiv.org/abs/1311.4780
        Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.

    Examples:
        >>> import numpyro, numpyro.distributions as dist, raybayes
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> y = np.random.default_rng(0).normal(1.0, 1.0, 200)
        >>> idata = raybayes.sample_subposteriors(model, model_kwargs={"y": y},
        ...     num_shards=2, num_chains=2, num_warmup=200, num_samples=200,
        ...     backend="local", progress_bar=False)
        >>> idata.posterior["mu"].shape, idata.attrs["combination_summary"]
        ((2, 200), 'combination reliable')
    """
    from raybayes.backends import Backend, get_backend
    from raybayes.config import resolve_scaling
    from raybayes.core.combination import (
        consensus,
        diagnose_combination,
        gaussian_product,
        kernel_product,
    )
    from raybayes.core.partition import ShardSpec, assign_entities
    from raybayes.core.shard_density import trace_latent_sites
    from raybayes.mcmc.sampler import sample
    from raybayes.plan import check_partition, plan
    from raybayes.results import model_site_info, to_inference_data

    if (
        isinstance(num_shards, bool)
        or not isinstance(num_shards, (int, np.integer))
        or (num_shards < 1)
    ):
        raise ConfigurationError(
            f"num_shards={num_shards!r} is not an integer >= 1; pass e.g. num_shards=4."
        )
    num_shards = int(num_shards)
    if combination not in COMBINATION_RULES:
        raise ConfigurationError(
            f"combination={combination!r} is not known; use one of {COMBINATION_RULES}."
        )
    if not callable(model):
        raise ConfigurationError(
            f"model={model!r} is not callable; pass a NumPyro model."
        )
    if source is not None:
        from raybayes.mcmc.sharded import check_source

        check_source(source, partition, model_kwargs)
        if num_shards == 1:
            raise ConfigurationError(
                "num_shards=1 with source=: there is nothing to combine; read the "
                "data and call raybayes.sample, or use num_shards >= 2."
            )
    model_kwargs = dict(model_kwargs or {})
    nuts = dict(
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        seed=seed,
        num_workers=num_workers,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        dense_mass=dense_mass,
        chunk_size=chunk_size,
        target_ess=target_ess,
        target_rhat=target_rhat,
        max_samples=max_samples,
        progress_bar=progress_bar,
    )
    scaling, name = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address,
        parallel_work=int(num_chains) * num_shards,
    )
    if num_shards == 1:
        warnings.warn(
            "num_shards=1: there is nothing to combine; running ordinary NUTS on the "
            "full posterior (raybayes.sample).",
            RaybayesWarning,
            stacklevel=2,
        )
        idata = sample(
            model,
            *model_args,
            model_kwargs=model_kwargs,
            backend=name,
            address=address,
            use_gpu=use_gpu,
            resources_per_worker=resources_per_worker,
            checkpoint_dir=checkpoint_dir,
            **nuts,
        )
        idata.attrs["note"] = "num_shards=1: ordinary NUTS on the full posterior"
        idata.attrs["num_shards"] = 1
        return idata

    # -- the split, checked before anything runs ---------------------------------
    if source is None:
        if partition is None:
            chosen = plan(model, model_kwargs, num_shards, model_args=model_args)
            partition = chosen.partition
            if partition is None:
                raise ConfigurationError(
                    f"num_shards={num_shards} but the model has no plate that can be "
                    "split (see the plan's warning); pass partition=, or use "
                    "num_shards=1."
                )
        else:  # the user's split, checked against shard traces like a planned one
            check_partition(model, model_args, model_kwargs, partition, num_shards)
        partition.validate(model_kwargs)
        specs = assign_entities(
            _entity_counts(partition, model_kwargs), num_shards, partition.plate
        )
        sites, _ = trace_latent_sites(model, model_kwargs, partition, model_args)
        if all(s.is_local for s in sites.values()):
            raise ConfigurationError(
                f"splitting plate {partition.plate!r} leaves no global site to "
                "combine: every latent site belongs to a shard. Sample each group on "
                "its own (raybayes.fit_many)."
            )
        site_dims, site_coords, observed = model_site_info(
            model, model_args, model_kwargs
        )
    else:
        # The rows stay on the workers: the driver lists partitions (metadata only).
        # more shards than partitions: raises
        specs = [
            ShardSpec(m, num_shards, int(a), int(b))
            for m, (a, b) in enumerate(source.shard_blocks(num_shards))
        ]

    engine = get_backend(name, scaling)
    owns_engine = not isinstance(backend, Backend)
    sub_model = SubposteriorModel(model, num_shards, partition.local_plates)
    shards, finished, worker_s, num_workers_used, described = _sample_shards(
        engine,
        owns_engine,
        sub_model,
        model_args,
        model_kwargs,
        partition,
        specs,
        checkpoint_dir,
        nuts,
        source=source,
    )
    if described is not None:
        sites = described[0]["sites"]
        site_dims, site_coords, observed = described[0]["site_dims"], {}, {}
    global_sites = [s for s in sites.values() if not s.is_local]
    local_sites = [s for s in sites.values() if s.is_local]

    # -- combination ---------------------------------------------------------------
    num_draws = min(int(s.posterior.sizes["draw"]) for s in shards)
    num_chains_ = int(shards[0].posterior.sizes["chain"])
    flat, labels = [], None
    for idata_m in shards:
        f, labels = _flatten_globals(idata_m.posterior, global_sites, num_draws)
        flat.append(f)
    flat = np.stack(flat)
    from raybayes.config import derive_key

    key = derive_key(seed, "combination")
    if combination == "consensus":
        combined = consensus(flat)
    elif combination == "consensus_diagonal":
        combined = consensus(flat, diagonal=True)
    elif combination == "gaussian_product":
        combined = gaussian_product(key, flat)
    else:
        combined = kernel_product(
            key, flat, semiparametric=combination == "semiparametric"
        )
    diagnostics = diagnose_combination(flat, combined, labels, seed=seed)

    posterior = _unflatten_globals(combined, global_sites, num_chains_, num_draws)
    for s in local_sites:
        axis = 2 + s.constrained_entity_axis
        posterior[s.name] = np.concatenate(
            [np.asarray(sh.posterior[s.name].values)[:, :num_draws] for sh in shards],
            axis=axis,
        )
    from raybayes.mcmc.chain import SAMPLE_STATS

    sample_stats = {
        k: np.stack(
            [np.asarray(sh.sample_stats[k].values)[:, :num_draws] for sh in shards],
            axis=-1,
        )
        for k in SAMPLE_STATS
    }
    stat_dims = {k: ["shard"] for k in SAMPLE_STATS}
    shard_attrs = []
    for spec, sh, done_s, busy_s in zip(specs, shards, finished, worker_s, strict=True):
        attrs = dict(
            shard=spec.shard_id,
            entity_start=spec.entity_start,
            entity_stop=spec.entity_stop,
            finished_s=float(done_s),
            worker_s=float(busy_s),
            num_draws_per_chain=int(sh.posterior.sizes["draw"]),
            **_shard_diagnostics(sh, [s.name for s in sites.values()]),
        )
        shard_attrs.append(attrs)
    # A shard whose chains disagree undermines any combination: say so first.
    rhat_limit = target_rhat if target_rhat is not None else 1.05
    for attrs in reversed(shard_attrs):
        if attrs.get("r_hat_max", 1.0) > rhat_limit:
            diagnostics.problems.insert(
                0,
                f"{attrs['r_hat_max_site']}: the chains of shard {attrs['shard']} "
                f"disagree (R-hat {attrs['r_hat_max']:.2f} > {rhat_limit:g})",
            )
    idata = to_inference_data(
        posterior,
        sample_stats,
        observed,
        dims={**site_dims, **stat_dims},
        coords={**site_coords, "shard": np.arange(num_shards)},
        attrs={
            "inference_library": "raybayes",
            "sampler": "NUTS on subposteriors",
            "combination": combination,
            "combination_space": "unconstrained",
            "num_shards": num_shards,
            "split_plate": partition.plate,
            "global_sites": [s.name for s in global_sites],
            "num_warmup": num_warmup,
            "seed": seed,
            "draws_per_chain": num_draws,
            "num_workers": int(num_workers_used),
            "worker_restarts": int(
                sum(int(sh.attrs.get("worker_restarts", 0)) for sh in shards)
            ),
            "finished_s_per_shard": [float(t) for t in finished],
            "worker_s_per_shard": [float(t) for t in worker_s],
            "r_hat_max_per_shard": [a.get("r_hat_max", np.nan) for a in shard_attrs],
            "ess_bulk_min_per_shard": [a["ess_bulk_min"] for a in shard_attrs],
            **diagnostics.to_attrs(),
            "combination_report": str(diagnostics),
        },
    )
    groups = {}
    for sh, attrs in zip(shards, shard_attrs, strict=True):
        ds = sh.posterior.copy()
        ds.attrs = {**ds.attrs, **attrs}
        groups[f"shard_{attrs['shard']}"] = ds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # groups outside ArviZ's schema
        idata.add_groups(groups)
    if not diagnostics.reliable:
        warnings.warn(
            f"{diagnostics.summary}. See docs/consensus.md: fewer shards, NUTS on "
            "the full posterior, or the Laplace methods.",
            RaybayesWarning,
            stacklevel=2,
        )
    return idata
