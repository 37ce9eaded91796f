"""Chain-parallel NUTS on any backend: the driver side.

The driver owns every chain's state. It hands chunks of iterations to whichever
worker is free, so chains may outnumber workers and a worker never waits for
another. The whole chain state comes back with each chunk, so a chain can move
between workers; since each chain's randomness lives in its own state (seeded by
``derive_key(seed, chain)``, that is ``fold_in(PRNGKey(seed), chain)``), the draws
are the same on any number of workers and on any backend.

:func:`sample` is three steps kept apart: checking the arguments
(:func:`_check_arguments`, before anything runs), building the frozen run
configuration (:class:`_RunSettings` for the chains and their scheduling,
:class:`_StoppingRule` for the run-to-target settings) and the work itself
(:func:`_run_chains`, then :func:`_to_inference_data`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raybayes.backends import Backend, get_backend
from raybayes.checkpoint import content_hash, data_fingerprint
from raybayes.config import resolve_scaling
from raybayes.core.validation import check_observed_data
from raybayes.errors import ChainError, ConfigurationError, WorkerLostError
from raybayes.mcmc.chain import SAMPLE_STATS, ChunkResult, NUTSChainRunner, chain_key
from raybayes.progress import ChainProgress
from raybayes.results import model_site_info, to_inference_data

__all__ = ["sample"]

#: Most eigenvectors of the low-rank mass matrix with ``low_rank_mass=True``.
DEFAULT_MAX_RANK = 16
#: Fewest warmup iterations with ``low_rank_mass``.
MIN_LOW_RANK_WARMUP = 100
#: Warmup phases with ``low_rank_mass``: the low-rank estimate is refreshed at the
#: end of each phase but the last (from the second half of the phase's draws).
LOW_RANK_PHASES = 3
#: Share of the warmup in the first low-rank phase (NumPyro's diagonal adaptation,
#: the slowest: it starts from the initial point's ``1 / |gradient|``); the later
#: phases share the rest equally. 1/6 (50 of 300) rather than 1/3: on the first 10
#: orange-juice stores it gave 2x the ESS per gradient (one run each, BENCHMARKS.md).
LOW_RANK_FIRST_SHARE = 1.0 / 6.0


@dataclass
class _Chain:
    chain_id: int
    state: Any = None
    warmup_done: int = 0
    samples_done: int = 0
    running: bool = False
    divergences: int = 0
    pooled_through: int = -1
    phase: int = 0
    switching: bool = False
    points: list = field(default_factory=list)
    draws: list = field(default_factory=list)
    stats: list = field(default_factory=list)


def _check_positive_int(name, value, allow_zero=False):
    ok = isinstance(value, (int, np.integer)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        low = ">= 0" if allow_zero else ">= 1"
        raise ConfigurationError(f"{name}={value!r} is not an integer {low}; pass e.g. {name}=1000.")


def _default_chunk_size(num_warmup, num_samples):
    # Small enough for a lively progress bar and fine-grained scheduling, large
    # enough that per-chunk overhead (a round trip, ~1 ms) is negligible.
    total = num_warmup + num_samples
    return int(min(100, max(10, math.ceil(total / 20))))


@dataclass(frozen=True)
class _RunSettings:
    """How the chains run: NUTS settings and scheduling, fixed before any work.

    Attributes:
        num_chains: number of Markov chains.
        num_warmup: warmup iterations per chain.
        seed: root seed; chain ``c`` uses ``derive_key(seed, c)``.
        chunk_size: iterations per unit of remote work.
        kernel_kwargs: arguments of :class:`numpyro.infer.NUTS` (the target
            acceptance probability, tree depth and mass-matrix choice included).
        init_params: initial unconstrained values, site -> array, or ``None``.
        cross_chain_adaptation: pool the mass-matrix adaptation over chains.
        static_scheduling: chain ``c`` always runs on worker ``c % num_workers``
            (for benchmarks); otherwise a free worker takes the chain that is
            furthest behind.
        worker_slowdown: worker index -> slowdown factor (for benchmarks).
        progress_bar: show one progress bar per chain.
        key_stream: stream ids between the seed and the chain index: chain ``c``
            uses ``derive_key(seed, *key_stream, c)`` (a shard index, so that the
            shards of one run share a seed without sharing a stream).
        low_rank_mass: the most eigenvectors of the low-rank plus diagonal mass
            matrix, or 0 for NumPyro's own mass-matrix adaptation.
    """

    num_chains: int
    num_warmup: int
    seed: int
    chunk_size: int
    kernel_kwargs: dict
    init_params: dict | None
    cross_chain_adaptation: bool
    static_scheduling: bool
    worker_slowdown: dict | None
    progress_bar: bool
    key_stream: tuple = ()
    low_rank_mass: int = 0


def _check_arguments(
    model,
    *,
    num_chains,
    num_warmup,
    num_samples,
    chunk_size,
    target_accept_prob,
    kernel_kwargs,
    target_ess,
    target_rhat,
    target_var_names,
    max_samples,
    max_time_s,
    cross_chain_adaptation,
    scheduling,
    low_rank_mass=False,
    dense_mass=False,
):
    """Raise :class:`ConfigurationError` for any bad argument of :func:`sample`.

    Runs before the model is traced and before any backend starts.
    """
    _check_positive_int("num_chains", num_chains)
    _check_positive_int("num_warmup", num_warmup, allow_zero=True)
    _check_positive_int("num_samples", num_samples)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    if not 0 < target_accept_prob < 1:
        raise ConfigurationError(
            f"target_accept_prob={target_accept_prob} must lie in (0, 1); 0.8 is usual."
        )
    if target_ess is not None and not (np.isfinite(target_ess) and target_ess > 0):
        raise ConfigurationError(
            f"target_ess={target_ess!r} must be a positive number of effective draws, "
            "e.g. target_ess=400."
        )
    if target_rhat is not None and not (np.isfinite(target_rhat) and target_rhat >= 1.0):
        raise ConfigurationError(
            f"target_rhat={target_rhat!r} is below 1; R-hat is >= 1 by construction. "
            "Use e.g. target_rhat=1.01."
        )
    has_target = target_ess is not None or target_rhat is not None
    if has_target and num_chains < 2 and target_rhat is not None:
        raise ConfigurationError(
            "target_rhat needs at least 2 chains (R-hat compares chains); "
            f"got num_chains={num_chains}."
        )
    if max_samples is not None:
        _check_positive_int("max_samples", max_samples)
        if not has_target:
            raise ConfigurationError(
                "max_samples only applies with target_ess= or target_rhat=; without a "
                "target, num_samples fixes the draws per chain. Drop max_samples or "
                "give a target."
            )
        if max_samples < num_samples:
            raise ConfigurationError(
                f"max_samples={max_samples} is below num_samples={num_samples} (the "
                "minimum draws per chain with a target). Raise max_samples."
            )
    if target_var_names is not None and not has_target:
        raise ConfigurationError(
            "target_var_names only applies with target_ess= or target_rhat=."
        )
    if max_time_s is not None and not max_time_s > 0:
        raise ConfigurationError(f"max_time_s={max_time_s!r} must be > 0 seconds.")
    if cross_chain_adaptation and num_chains < 2:
        raise ConfigurationError(
            "cross_chain_adaptation pools the warmup of several chains; it needs "
            f"num_chains >= 2, got {num_chains}."
        )
    if cross_chain_adaptation and (kernel_kwargs or {}).get("adapt_mass_matrix") is False:
        raise ConfigurationError(
            "cross_chain_adaptation pools the mass-matrix adaptation, but "
            "kernel_kwargs sets adapt_mass_matrix=False; drop one of the two."
        )
    if not (isinstance(low_rank_mass, (bool, np.bool_))
            or (isinstance(low_rank_mass, (int, np.integer)) and low_rank_mass >= 0)):
        raise ConfigurationError(
            f"low_rank_mass={low_rank_mass!r}; pass True (at most "
            f"{DEFAULT_MAX_RANK} eigenvectors), a positive int (the most "
            "eigenvectors) or False."
        )
    if low_rank_mass:
        if dense_mass:
            raise ConfigurationError(
                "low_rank_mass and dense_mass are two mass matrices; pass one of them."
            )
        if num_warmup < MIN_LOW_RANK_WARMUP:
            raise ConfigurationError(
                f"low_rank_mass needs num_warmup >= {MIN_LOW_RANK_WARMUP} (three warmup "
                f"phases), got {num_warmup}; raise num_warmup or drop low_rank_mass."
            )
        extra = set(kernel_kwargs or {}) - {"init_strategy", "inverse_mass_matrix"}
        if extra:
            raise ConfigurationError(
                "low_rank_mass takes no kernel_kwargs but init_strategy and "
                f"inverse_mass_matrix; got {sorted(extra)}."
            )
    if scheduling not in ("dynamic", "static"):
        raise ConfigurationError(f"_scheduling={scheduling!r}; use 'dynamic' or 'static'.")
    if not callable(model):
        raise ConfigurationError(f"model={model!r} is not callable; pass a NumPyro model function.")


def sample(
    model,
    *model_args,
    model_kwargs: dict | None = None,
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    seed: int = 0,
    backend: str | Backend = "auto",
    num_workers: int | None = None,
    address: str | None = None,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    init_params: dict | None = None,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    kernel_kwargs: dict | None = None,
    chunk_size: int | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
    progress_bar: bool = True,
    target_ess: float | None = None,
    target_rhat: float | None = None,
    target_var_names: list[str] | None = None,
    max_samples: int | None = None,
    max_time_s: float | None = None,
    checkpoint_dir: str | None = None,
    overwrite: bool = False,
    cross_chain_adaptation: bool = False,
    num_shards: int | None = None,
    plan: Any = None,
    partition: Any = None,
    source: Any = None,
    max_shard_bytes: int | None = None,
    low_rank_mass: bool | int = False,
    _scheduling: str = "dynamic",
    _worker_slowdown: dict[int, float] | None = None,
    _key_stream: tuple[int, ...] = (),
):
    """Draw from a NumPyro model's posterior with NUTS, chains spread over workers.

    Each chain's key is ``derive_key(seed, chain)`` (``fold_in(PRNGKey(seed),
    chain)``); the draws are bitwise identical (on CPU) whatever the backend and
    the number of workers.

    Args:
        model: a NumPyro model (a callable).
        *model_args: positional arguments of the model (arrays are sent to the
            workers once, through the object store).
        model_kwargs: keyword arguments of the model.
        num_chains: number of Markov chains, ``>= 1``.
        num_warmup: warmup (adaptation) iterations per chain, ``>= 0``.
        num_samples: kept draws per chain, ``>= 1``.
        seed: integer root seed of every chain's key.
        backend: ``"auto"`` (default), ``"local"`` (in-process), ``"ray"`` (an
            embedded local Ray instance unless ``address``/``RAY_ADDRESS`` names a
            cluster) or a :class:`~raybayes.backends.Backend` (left running).
            ``"auto"`` is resolved by :func:`raybayes.config.resolve_backend_name`
            with one piece of parallel work per chain (at most ``num_workers``):
            Ray when the scaling arguments ask for a cluster (``address``,
            ``RAY_ADDRESS``, ``use_gpu``, ``resources_per_worker``,
            ``num_workers > 1``) or when several chains could run at once on more
            than one CPU; in-process otherwise (one chain, ``num_workers=1`` or one
            CPU), so that such a job starts no workers it does not need.
        num_workers: worker count (default: ``min(num_chains, available CPUs)``;
            one in-process).
        address: Ray cluster address, e.g. ``"10.0.0.1:6379"``.
        use_gpu: one GPU per worker (Ray only).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        init_params: initial values in the unconstrained space, site -> array of
            the site's shape (the same for every chain). With ``num_shards``, a
            site may also be given one value per chain (a leading ``num_chains``
            axis), local sites are given over the whole split plate, and the sites
            left out are drawn uniformly in [-2, 2].
        target_accept_prob: NUTS target acceptance probability, in (0, 1).
        max_tree_depth: maximum NUTS tree depth (at most ``2**max_tree_depth - 1``
            leapfrog steps per draw).
        dense_mass: adapt a dense mass matrix instead of a diagonal one.
        kernel_kwargs: further arguments of :class:`numpyro.infer.NUTS`.
        chunk_size: iterations per unit of remote work (default: about 1/20 of a
            chain, between 10 and 100).
        coords: extra ArviZ coordinates, dimension name -> values (override the
            plate indices inferred from the model).
        dims: extra ArviZ dimensions, site name -> dimension names (override the
            plate names inferred from the model).
        progress_bar: show one progress bar per chain on the driver (stderr).
        target_ess: run until the bulk and the tail ESS (ArviZ, rank-normalised) of
            every parameter (or of ``target_var_names``) reach this value;
            ``num_samples`` is then the minimum number of draws per chain.
        target_rhat: run until the rank-normalised split R-hat of every such
            parameter is at most this value (e.g. 1.01).
        target_var_names: the sites the targets apply to (default: all latent
            sites).
        max_samples: the most draws per chain when a target is given (default
            ``10 * num_samples``).
        max_time_s: stop after this many seconds of wall time (the draws so far are
            returned, and the result says that the time limit stopped the run).
        checkpoint_dir: write every chain's state (adaptation included) and its
            draws there after each chunk, atomically. Calling ``sample`` again with
            the same arguments and directory resumes the run, and ends with the
            draws of an uninterrupted run. Draws stream there as Parquet files;
            :func:`raybayes.mcmc.load_draws` reads the run so far at any time.
            The first run stores its configuration and a fingerprint of the data
            (content hashes of the model's arguments, the model's qualified name)
            in ``checkpoint_dir/run.json``. A rerun whose model, data,
            ``num_chains``, ``num_warmup``, ``num_samples``, ``chunk_size``,
            ``seed``, kernel settings, ``init_params``, ``cross_chain_adaptation``,
            ``low_rank_mass`` or ``target_var_names`` differ, whose ``target_ess``
            is lower or whose ``target_rhat`` is higher (or that adds or drops a
            target), is refused before any chain runs, with each change named.
            ``max_samples``, ``max_time_s``, ``progress_bar``, ``coords``,
            ``dims`` and the backend and worker settings may change on resume.
        overwrite: with ``checkpoint_dir``, delete the folder's checkpoint
            (``run.json``, ``chain-*``) first and start a fresh run.
        cross_chain_adaptation: pool the mass-matrix adaptation over chains. At
            the end of each of NumPyro's slow adaptation windows every chain waits
            for the others, and each chain's running (Welford) estimate of the
            posterior covariance is replaced by the estimate from the draws of all
            chains in that window, so each chain's mass matrix is estimated from
            ``num_chains`` times as many draws. Chains wait at most a few times per
            warmup (once per window); the draws still do not depend on the number
            of workers. Helps most with many chains and a short warmup.
        num_shards: run data-sharded NUTS: split the data along a plate (chosen
            by :func:`raybayes.plan`) into this many shards, one worker each,
            instead of giving every chain the whole data set. The chains then run
            together on the driver and each leapfrog step sums the potential and
            its gradient over the shards (one round trip per step for all chains;
            see :mod:`raybayes.mcmc.sharded` and the "Data-sharded NUTS" guide).
            ``num_workers`` must be ``None`` or equal; the scheduling options are
            refused. ``None`` (default): chain-parallel.
        plan: a :class:`raybayes.Plan` from :func:`raybayes.plan` (the split to
            use, and its number of shards); implies data-sharded NUTS.
        partition: with ``num_shards``, the split (a :class:`raybayes.Partition`)
            instead of the one :func:`raybayes.plan` chooses; required with
            ``source``.
        source: with ``num_shards``, a
            :class:`~raybayes.datasets.parquet.ParquetShards` instead of
            ``model_kwargs``: shard ``s`` is a contiguous block of the sorted
            partitions, the blocks balanced by rows (footer metadata; see
            :meth:`~raybayes.datasets.parquet.ParquetShards.shard_blocks`), read
            (and turned into model arguments by the source's
            ``to_model_kwargs``) by its own worker only; the driver lists the
            partitions (metadata) and never reads rows. Positional model
            arguments go to every shard unchanged. The result then has no
            ``observed_data`` group; ``max_shard_bytes`` is checked once the
            workers have read their partitions, before any compute.
        max_shard_bytes: with ``num_shards``, the memory budget of one worker for
            its data, in bytes: a shard above it is refused before any worker
            starts, and the message says how many shards are needed.
        low_rank_mass: adapt a low-rank plus diagonal mass matrix from the
            chains' draws and gradients, as nutpie does
            (:func:`raybayes.mcmc.mass.fisher_low_rank`; ``True``: at most 16
            eigenvectors, an int: at most that many). The warmup runs in three
            phases: the first (a sixth of the warmup, at least 20 iterations)
            with NumPyro's diagonal adaptation (started from
            nutpie's ``1 / |gradient|`` at the initial point); at the end of the
            first and of the second, the draws and gradients of the phase's
            second half, pooled over all chains, give a new estimate, and each
            chain goes on in the estimate's coordinates (step size and a
            diagonal adapted again); the last phase goes on into sampling.
            Each HMC operation costs ``O(d k)``. Needs ``num_warmup >= 100`` and
            at most ``init_strategy`` and ``inverse_mass_matrix`` (the first
            phase's initial diagonal for some sites, in NumPyro's structured
            form ``{(site,): variances}``; e.g.
            :meth:`raybayes.datasets.ElasticityData.initial_inverse_mass`) in
            ``kernel_kwargs``; not with ``dense_mass``. With
            ``checkpoint_dir`` each chain's record also holds its warmup phase,
            the phase's kept draws and gradients and the estimates so far, so a
            resumed run gives the draws of an uninterrupted one.
            ``idata.attrs["low_rank_mass_rank"]`` gives the eigenvectors kept.
            With ``num_shards`` the same adaptation runs on the sharded
            potential, the chains vectorised on the driver.

    Chains advance in chunks of ``chunk_size`` iterations. A free worker always
    advances the chain that has the fewest iterations, so chains may outnumber
    workers, a slow worker never holds the others back, and chains stay within a
    chunk or two of each other. With targets, diagnostics are evaluated each time
    every chain has a multiple of ``chunk_size`` draws, and the run stops at the
    first such point that meets them; since that point does not depend on timing,
    the draws still do not depend on the number of workers. A worker that dies
    (actor or node) is replaced; its chain continues from its last completed chunk
    on another worker, and no draw is lost or changed.

    Returns:
        ``arviz.InferenceData`` with ``posterior`` (each site
        ``(num_chains, num_samples, *site_shape)``, plate dims named after the
        plates), ``sample_stats`` (``diverging``, ``tree_depth``, ``n_steps``,
        ``step_size``, ``energy``, ``acceptance_rate``, ``lp``) and
        ``observed_data``. ``idata.attrs`` holds ``backend`` (the backend's name),
        ``num_workers``, ``worker_restarts`` (workers replaced because a call to
        one failed with its process or node gone; Ray never restarts a worker
        itself, and a worker lost after its last call, with no work of the run's
        to redo, is not counted),
        with ``num_shards`` also ``num_shards``, ``split_plate``,
        ``num_round_trips``, ``shard_rows`` (rows of data each shard holds) and
        ``shard_imbalance`` (their ``max / mean``),
        ``stop_reason`` (``"num_samples"``, ``"targets_met"``,
        ``"max_samples"`` or ``"max_time_s"``), ``targets_met`` and the final
        ``ess_bulk_min``, ``ess_tail_min``, ``r_hat_max`` when targets were given.

    Raises:
        ConfigurationError: a bad argument (checked before the model runs or any
            backend starts); names the value, the allowed values and the fix.
        ChainError: the model raised in a chain; names the chain, carries the
            worker's traceback.
        ClusterConnectionError: the Ray address is unreachable.

    References:
        Hoffman & Gelman (2014), The No-U-Turn Sampler, JMLR 15.
        Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), Rank-normalization,
        folding, and localization: an improved R-hat, Bayesian Analysis 16(2).

    Examples:
        >>> import numpyro, numpyro.distributions as dist, raybayes
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 10))
        ...     numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> idata = raybayes.sample(model, np.array([0.5, 1.5]), num_chains=2,
        ...     num_warmup=100, num_samples=100, backend="local", progress_bar=False)
        >>> idata.posterior["mu"].shape
        (2, 100)
    """
    # 1. Checking: every argument, before the model runs or a backend starts.
    _check_arguments(
        model,
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        chunk_size=chunk_size,
        target_accept_prob=target_accept_prob,
        kernel_kwargs=kernel_kwargs,
        target_ess=target_ess,
        target_rhat=target_rhat,
        target_var_names=target_var_names,
        max_samples=max_samples,
        max_time_s=max_time_s,
        cross_chain_adaptation=cross_chain_adaptation,
        scheduling=_scheduling,
        low_rank_mass=low_rank_mass,
        dense_mass=dense_mass,
    )
    from raybayes.mcmc.sharded import check_sharded_arguments

    num_shards, partition = check_sharded_arguments(
        num_shards=num_shards,
        plan=plan,
        num_workers=num_workers,
        scheduling=_scheduling,
        worker_slowdown=_worker_slowdown,
        key_stream=_key_stream,
        max_shard_bytes=max_shard_bytes,
        partition=partition,
        source=source,
        model_kwargs=model_kwargs,
    )
    scaling, _ = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address
    )
    low_rank_mass = (
        (DEFAULT_MAX_RANK if low_rank_mass else 0)
        if isinstance(low_rank_mass, (bool, np.bool_)) else int(low_rank_mass)
    )
    if num_shards is not None:
        if "inverse_mass_matrix" in (kernel_kwargs or {}):
            raise ConfigurationError(
                "kernel_kwargs['inverse_mass_matrix'] is not supported with "
                "data-sharded NUTS (num_shards=) yet; drop it there."
            )
        return _sample_sharded(
            model, model_args, model_kwargs, num_shards=num_shards,
            partition=partition, source=source, init_params=init_params,
            max_shard_bytes=max_shard_bytes, backend=backend, scaling=scaling,
            num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples,
            seed=seed, target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth, dense_mass=dense_mass,
            kernel_kwargs=kernel_kwargs, chunk_size=chunk_size, coords=coords,
            dims=dims, progress_bar=progress_bar, target_ess=target_ess,
            target_rhat=target_rhat, target_var_names=target_var_names,
            max_samples=max_samples, max_time_s=max_time_s,
            checkpoint_dir=checkpoint_dir, overwrite=overwrite,
            cross_chain_adaptation=cross_chain_adaptation,
            low_rank_mass=low_rank_mass,
        )
    # Chains that can run at once: one per chain, unless num_workers caps it (one
    # worker runs its chains one after the other, which in-process does as well).
    parallel_work = num_chains if num_workers is None else min(num_chains, num_workers)
    scaling, name = resolve_scaling(
        backend, num_workers, use_gpu, resources_per_worker, address,
        parallel_work=parallel_work,
    )
    engine = get_backend(name, scaling)
    # Bad data (NaN, inf) fails here, before any compute.
    model_kwargs = dict(model_kwargs or {})
    check_observed_data(model, model_args, model_kwargs)

    # 2. Configuration: frozen settings of the chains and of the stopping rule.
    settings = _run_settings(
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        seed=seed,
        chunk_size=chunk_size,
        kernel_kwargs=kernel_kwargs,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        dense_mass=dense_mass,
        cross_chain_adaptation=cross_chain_adaptation,
        progress_bar=progress_bar,
        init_params=init_params,
        static_scheduling=_scheduling == "static",
        worker_slowdown=_worker_slowdown,
        key_stream=tuple(_key_stream),
        low_rank_mass=low_rank_mass,
    )
    site_dims, site_coords, observed, stopping, store = _stopping_and_store(
        model, model_args, model_kwargs, settings, dims=dims, coords=coords,
        target_ess=target_ess, target_rhat=target_rhat,
        target_var_names=target_var_names, num_samples=num_samples,
        max_samples=max_samples, max_time_s=max_time_s,
        checkpoint_dir=checkpoint_dir, overwrite=overwrite,
    )

    # 3. Work: run the chains, then assemble the InferenceData.
    chains, outcome, num_workers = _run_chains(
        engine,
        owns_engine=not isinstance(backend, Backend),
        model=model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        num_workers=scaling.num_workers,
        settings=settings,
        stopping=stopping,
        store=store,
    )
    return _to_inference_data(
        chains, outcome, observed, site_dims, site_coords, settings, num_workers,
        engine.name,
    )


def _run_settings(
    *, num_chains, num_warmup, num_samples, seed, chunk_size, kernel_kwargs,
    target_accept_prob, max_tree_depth, dense_mass, cross_chain_adaptation,
    progress_bar, **scheduling,
):
    """The frozen :class:`_RunSettings` of a run: the default chunk size and the
    NUTS kernel arguments filled in; ``scheduling`` holds the remaining fields."""
    return _RunSettings(
        num_chains=num_chains,
        num_warmup=num_warmup,
        seed=seed,
        chunk_size=chunk_size or _default_chunk_size(num_warmup, num_samples),
        kernel_kwargs=dict(
            kernel_kwargs or {},
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            dense_mass=dense_mass,
        ),
        cross_chain_adaptation=bool(cross_chain_adaptation),
        progress_bar=progress_bar,
        **scheduling,
    )


def _stopping_and_store(
    model, model_args, model_kwargs, settings, *, dims, coords, target_ess,
    target_rhat, target_var_names, num_samples, max_samples, max_time_s,
    checkpoint_dir, overwrite, rerun_extra=None, described=None,
):
    """Trace the model's sites, build the stopping rule and open the draw store.

    ``described`` (data read on the workers only): ``(site_dims, observed_names,
    fingerprint)`` from the workers instead of a trace on the driver; the result
    then holds no observed data.

    Returns ``(site_dims, site_coords, observed, stopping, store)``; the store
    refuses a rerun whose data or settings (``rerun_extra`` included) differ
    from the run in ``checkpoint_dir`` unless ``overwrite``.
    """
    if described is None:
        site_dims, site_coords, observed = _trace_model(
            model, model_args, model_kwargs, dims, coords, target_var_names
        )
        fingerprint = data_fingerprint(model, model_args, model_kwargs)
    else:
        site_dims, observed_names, fingerprint = described
        site_dims = {**site_dims, **(dims or {})}
        site_coords, observed = dict(coords or {}), {}
        _check_target_names(site_dims, observed_names, target_var_names)
    has_target = target_ess is not None or target_rhat is not None
    stopping = _StoppingRule(
        target_ess=target_ess,
        target_rhat=target_rhat,
        var_names=target_var_names,
        num_samples=num_samples,
        max_samples=(max_samples or 10 * num_samples) if has_target else num_samples,
        max_time_s=max_time_s,
        step=settings.chunk_size,
    )
    init_params = settings.init_params
    store = _open_store(
        checkpoint_dir, settings, num_samples, model, site_dims, site_coords,
        rerun=dict(
            **fingerprint,
            init_params=None if init_params is None else {
                k: content_hash(v) for k, v in init_params.items()},
            target_ess=target_ess, target_rhat=target_rhat,
            target_var_names=target_var_names,
            **(rerun_extra or {}),
        ),
        overwrite=overwrite,
    )
    return site_dims, site_coords, observed, stopping, store


def _sample_sharded(
    model, model_args, model_kwargs, *, num_shards, partition, source, init_params,
    max_shard_bytes, backend, scaling, num_chains, num_warmup, num_samples, seed,
    target_accept_prob, max_tree_depth, dense_mass, kernel_kwargs, chunk_size,
    coords, dims, progress_bar, target_ess, target_rhat, target_var_names,
    max_samples, max_time_s, checkpoint_dir, overwrite, cross_chain_adaptation,
    low_rank_mass,
):
    """Data-sharded NUTS (see :mod:`raybayes.mcmc.sharded`): the split is resolved
    and the shard budget checked before any worker starts (with a Parquet
    ``source``: the partitions are counted from metadata before, the budget and the
    data checked once the workers have read them, before any compute)."""
    from raybayes.mcmc.sharded import (
        NUTSShardObjective,
        ShardedChainPool,
        check_loaded_shard_budget,
        check_shard_budget,
    )
    from raybayes.plan import resolve_split

    if source is None:
        model_kwargs = dict(model_kwargs or {})
        check_observed_data(model, model_args, model_kwargs)
        bound_args, bound_kwargs, partition, num_shards = resolve_split(
            model, model_args, model_kwargs, num_shards, partition
        )
        if max_shard_bytes is not None:
            check_shard_budget(bound_kwargs, partition, num_shards, max_shard_bytes)
    else:
        # The rows stay on the workers: the driver lists partitions (metadata only);
        # more shards than partitions raises here.
        source.shard_values(0, num_shards)
        bound_args, bound_kwargs = tuple(model_args), None

    settings = _run_settings(
        num_chains=num_chains,
        num_warmup=num_warmup,
        num_samples=num_samples,
        seed=seed,
        chunk_size=chunk_size,
        kernel_kwargs=kernel_kwargs,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        dense_mass=dense_mass,
        cross_chain_adaptation=cross_chain_adaptation,
        progress_bar=progress_bar,
        init_params=init_params,
        static_scheduling=True,
        worker_slowdown=None,
        low_rank_mass=low_rank_mass,
    )
    chunk_size, kernel_kwargs = settings.chunk_size, settings.kernel_kwargs
    stopping_and_store = functools.partial(
        _stopping_and_store,
        model, model_args, model_kwargs, settings, dims=dims, coords=coords,
        target_ess=target_ess, target_rhat=target_rhat,
        target_var_names=target_var_names, num_samples=num_samples,
        max_samples=max_samples, max_time_s=max_time_s,
        checkpoint_dir=checkpoint_dir, overwrite=overwrite,
        rerun_extra=dict(num_shards=num_shards, partition=repr(partition)),
    )
    if source is None:
        site_dims, site_coords, observed, stopping, store = stopping_and_store()
    objective = NUTSShardObjective(
        model,
        bound_kwargs,
        partition=partition,
        num_shards=num_shards,
        backend=backend,
        source=source,
        model_args=bound_args,
        x64=bool(jax_x64_enabled()),
        scaling=scaling,
    )
    pool = None
    try:
        if source is not None:
            described = objective.call_all("describe")
            if max_shard_bytes is not None:
                check_loaded_shard_budget(
                    [d["data_bytes"] for d in described], max_shard_bytes
                )
            fingerprint = dict(
                model=described[0]["fingerprint"]["model"],
                data={
                    f"shard_{s}": content_hash(d["fingerprint"]["data"])
                    for s, d in enumerate(described)
                },
            )
            site_dims, site_coords, observed, stopping, store = stopping_and_store(
                described=(
                    described[0]["site_dims"],
                    described[0]["observed_names"],
                    fingerprint,
                )
            )
        pool = ShardedChainPool(
            objective,
            num_chains=num_chains,
            num_warmup=num_warmup,
            chunk_size=chunk_size,
            kernel_kwargs=kernel_kwargs,
            seed=seed,
            init_params=init_params,
            low_rank_phases=_low_rank_phases(settings),
        )
        chains, outcome = _ChainScheduler(
            pool,
            num_chains=num_chains,
            num_warmup=num_warmup,
            seed=seed,
            chunk_size=chunk_size,
            init_params=None,
            stopping=stopping,
            store=store,
            progress_bar=progress_bar,
            static=True,
            cross_chain=settings.cross_chain_adaptation,
            low_rank=_low_rank_setting(settings),
        ).run()
        rows = np.array(objective.call_all("num_rows"), np.int64)
        outcome.update(
            worker_restarts=int(pool.restarts),
            shard_rows=rows.tolist(),
            shard_imbalance=float(rows.max() / max(rows.mean(), 1.0)),
            num_shards=int(num_shards),
            split_plate=partition.plate if partition is not None else "",
            num_round_trips=int(objective.num_round_trips),
        )
        backend_name = objective.backend.name
    finally:
        if pool is not None:
            pool.shutdown()
        objective.close()
    idata = _to_inference_data(
        chains, outcome, observed, site_dims, site_coords, settings, num_shards,
        backend_name,
    )
    idata.attrs["sampler"] = "NUTS (data-sharded)"
    return idata


def jax_x64_enabled() -> bool:
    """Whether JAX's default float is float64 (then the shards compute in it)."""
    import jax

    return bool(jax.config.jax_enable_x64)


def _trace_model(model, model_args, model_kwargs, dims, coords, target_var_names):
    """Trace the model once on the driver: ArviZ dims and coords, observed data.

    A model that raises fails here, before any worker starts.

    Raises:
        ChainError: the model raised (for every chain; with the traceback).
        ConfigurationError: ``target_var_names`` names sites the model lacks.
    """
    try:
        site_dims, site_coords, observed = model_site_info(
            model, model_args, model_kwargs
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the traceback
        import traceback

        raise ChainError(
            "(all chains: the model raised when traced on the driver, before sampling)",
            repr(err),
            traceback.format_exc(),
        ) from None
    site_dims.update(dims or {})
    site_coords.update(coords or {})
    _check_target_names(site_dims, observed, target_var_names)
    return site_dims, site_coords, observed


def _check_target_names(site_dims, observed, target_var_names):
    """Raise :class:`ConfigurationError` when ``target_var_names`` names sites the
    model lacks."""
    latent = [n for n in site_dims if n not in observed]
    if target_var_names is not None:
        unknown = [v for v in target_var_names if v not in site_dims]
        if unknown:
            raise ConfigurationError(
                f"target_var_names has unknown sites {unknown}; the model has "
                f"{sorted(latent)}."
            )


def _open_store(checkpoint_dir, settings, num_samples, model, site_dims, site_coords,
                *, rerun, overwrite):
    """The checkpoint store of the run (``None`` without ``checkpoint_dir``).

    ``rerun`` holds the model and data fingerprint and the target settings, which a
    rerun compares (with the settings below) before it resumes.
    """
    if checkpoint_dir is None:
        return None
    from raybayes.mcmc.store import DrawStore

    store = DrawStore(checkpoint_dir)
    store.open(
        dict(
            **rerun,
            num_chains=settings.num_chains,
            num_warmup=settings.num_warmup,
            num_samples=num_samples,
            chunk_size=settings.chunk_size,
            seed=settings.seed,
            cross_chain_adaptation=settings.cross_chain_adaptation,
            **({"key_stream": list(settings.key_stream)} if settings.key_stream else {}),
            **({"low_rank_mass": settings.low_rank_mass}
               if settings.low_rank_mass else {}),
            kernel={k: repr(v) for k, v in sorted(settings.kernel_kwargs.items())},
            dims=site_dims,
            coords={k: np.asarray(v).tolist() for k, v in site_coords.items()},
        ),
        overwrite=overwrite,
    )
    return store


def _run_chains(
    engine, *, owns_engine, model, model_args, model_kwargs, num_workers, settings,
    stopping, store,
):
    """Start the workers and run every chain to the stopping rule.

    Returns:
        ``(chains, outcome, num_workers)``: the :class:`_Chain` records, the
        scheduler's outcome (stop reason, diagnostics) and the pool size used.
    """
    engine.start()
    try:
        if num_workers is None:
            num_workers = max(1, min(settings.num_chains, engine.default_num_workers()))
        args_ref = engine.put((model_args, model_kwargs))
        pool = engine.create_pool(
            _make_runner,
            (
                model,
                args_ref,
                settings.num_warmup,
                settings.chunk_size,
                settings.kernel_kwargs,
                settings.worker_slowdown,
                _low_rank_phases(settings),
            ),
            num_workers=num_workers,
            name="nuts",
        )
        try:
            chains, outcome = _ChainScheduler(
                pool,
                num_chains=settings.num_chains,
                num_warmup=settings.num_warmup,
                seed=settings.seed,
                chunk_size=settings.chunk_size,
                init_params=settings.init_params,
                stopping=stopping,
                store=store,
                progress_bar=settings.progress_bar,
                static=settings.static_scheduling,
                cross_chain=settings.cross_chain_adaptation,
                key_stream=settings.key_stream,
                low_rank=_low_rank_setting(settings),
            ).run()
        finally:
            pool.shutdown()
    finally:
        if owns_engine:
            engine.shutdown()
    return chains, outcome, num_workers


def _to_inference_data(
    chains, outcome, observed, site_dims, site_coords, settings, num_workers,
    backend_name,
):
    """Stack the chains' draws (cut to the stopping point) into InferenceData."""
    n = outcome["draws_per_chain"]
    posterior = {
        name: np.stack([np.concatenate([d[name] for d in c.draws])[:n] for c in chains])
        for name in chains[0].draws[0]
    }
    sample_stats = {
        name: np.stack([np.concatenate([s[name] for s in c.stats])[:n] for c in chains])
        for name in SAMPLE_STATS
    }
    return to_inference_data(
        posterior,
        sample_stats,
        observed,
        dims=site_dims,
        coords=site_coords,
        attrs={
            "inference_library": "raybayes",
            "sampler": "NUTS",
            "num_warmup": settings.num_warmup,
            "seed": settings.seed,
            "backend": backend_name,
            "num_workers": num_workers,
            "cross_chain_adaptation": int(settings.cross_chain_adaptation),
            "low_rank_mass": settings.low_rank_mass,
            **{k: (int(v) if isinstance(v, bool) else v) for k, v in outcome.items() if v is not None},
        },
    )


def _low_rank_phases(settings):
    """``(first, later)`` warmup phase lengths with a low-rank mass matrix, or None.

    The later phases have one length (they share one HMC instance, one compile);
    the first is :data:`LOW_RANK_FIRST_SHARE` of the warmup, at least 20 iterations.
    """
    if not settings.low_rank_mass:
        return None
    first = max(20, int(round(LOW_RANK_FIRST_SHARE * settings.num_warmup)))
    later = (settings.num_warmup - first) // (LOW_RANK_PHASES - 1)
    return settings.num_warmup - (LOW_RANK_PHASES - 1) * later, later


def _low_rank_setting(settings):
    """The scheduler's ``low_rank``: ``((first, later), max_rank)``, or None."""
    if not settings.low_rank_mass:
        return None
    return _low_rank_phases(settings), settings.low_rank_mass


def _make_runner(model, args, num_warmup, chunk_size, kernel_kwargs, slowdown=None,
                 low_rank_phases=None, *, worker_index=0):
    model_args, model_kwargs = args
    runner = NUTSChainRunner(
        model,
        model_args,
        model_kwargs,
        num_warmup=num_warmup,
        chunk_size=chunk_size,
        kernel_kwargs=kernel_kwargs,
        low_rank_phases=low_rank_phases,
    )
    runner.slowdown = float((slowdown or {}).get(worker_index, 1.0))
    return runner


_make_runner.accepts_worker_index = True


@dataclass(frozen=True)
class _StoppingRule:
    """When to stop sampling (the run-to-target settings): fixed draws, or targets
    on ESS and R-hat checked at draw counts fixed in advance.

    Attributes:
        target_ess: minimum bulk and tail ESS, or ``None``.
        target_rhat: maximum split R-hat, or ``None``.
        var_names: the sites the targets apply to (``None``: all).
        num_samples: draws per chain without a target; the first check with one.
        max_samples: the most draws per chain.
        max_time_s: wall-time limit in seconds, or ``None``.
        step: draws per chain between two checks (the chunk size).
    """

    target_ess: float | None
    target_rhat: float | None
    var_names: list[str] | None
    num_samples: int
    max_samples: int
    max_time_s: float | None
    step: int

    @property
    def has_target(self):
        return self.target_ess is not None or self.target_rhat is not None

    def evaluation_points(self):
        """Draws per chain at which the targets are checked (fixed in advance)."""
        point = self.num_samples
        while point < self.max_samples:
            yield point
            point += self.step
        yield self.max_samples

    def diagnostics(self, posterior: dict[str, np.ndarray]) -> dict[str, float]:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import arviz as az

            names = self.var_names or list(posterior)
            ds = az.convert_to_dataset({k: posterior[k] for k in names})
            out = {}
            if self.target_ess is not None:
                out["ess_bulk_min"] = float(_min_over(az.ess(ds, method="bulk")))
                out["ess_tail_min"] = float(_min_over(az.ess(ds, method="tail")))
            if self.target_rhat is not None or posterior[names[0]].shape[0] > 1:
                out["r_hat_max"] = float(_max_over(az.rhat(ds)))
        return out

    def met(self, diag: dict[str, float]) -> bool:
        ok = True
        if self.target_ess is not None:
            ok &= diag["ess_bulk_min"] >= self.target_ess
            ok &= diag["ess_tail_min"] >= self.target_ess
        if self.target_rhat is not None:
            ok &= diag["r_hat_max"] <= self.target_rhat
        return bool(ok)


def _pooling_points(num_warmup: int) -> list[int]:
    """Warmup iterations done just before the last iteration of each slow window."""
    from numpyro.infer.hmc_util import build_adaptation_schedule

    windows = build_adaptation_schedule(num_warmup)
    return [int(w.end) for w in windows[1:-1]]


def _pool_welford(states):
    """Combine Welford accumulators ``(mean, m2, n)`` of several chains.

    Chan, Golub & LeVeque's parallel update: the result is the accumulator of all
    the chains' draws together (between-chain spread of the means included).
    Accepts NumPyro's per-block dicts of accumulators.
    """
    if isinstance(states[0], dict):
        return {k: _pool_welford([s[k] for s in states]) for k in states[0]}
    means = [np.asarray(s[0], np.float64) for s in states]
    m2s = [np.asarray(s[1], np.float64) for s in states]
    ns = np.array([float(s[2]) for s in states])
    n = ns.sum()
    if n == 0:
        return states[0]
    mean = sum(w * m for w, m in zip(ns, means, strict=True)) / n
    m2 = sum(m2s)
    for w, m in zip(ns, means, strict=True):
        d = m - mean
        m2 = m2 + w * (np.outer(d, d) if m2.ndim == 2 else d * d)
    dtype = np.asarray(states[0][0]).dtype
    return (mean.astype(dtype), m2.astype(dtype), np.asarray(n).astype(np.asarray(states[0][2]).dtype))


def _min_over(ds):
    vals = [np.nanmin(np.asarray(v)) if np.size(v) else np.inf for v in ds.data_vars.values()]
    return min(vals) if vals else np.inf


def _max_over(ds):
    vals = [np.nanmax(np.asarray(v)) if np.size(v) else -np.inf for v in ds.data_vars.values()]
    return max(vals) if vals else -np.inf


class _ChainScheduler:
    """Hands chunks of iterations to free workers; keeps chains balanced.

    A free worker takes the chain with the fewest iterations (warmup included)
    that is not running. During sampling a chain may run at most one chunk past
    the next evaluation point (speculative draws, discarded if the run stops
    there), which keeps every worker busy while the slowest chain catches up.
    """

    MAX_RESTARTS_PER_WORKER = 5

    def __init__(self, pool, *, num_chains, num_warmup, seed, chunk_size, init_params,
                 stopping, store, progress_bar, static=False, cross_chain=False,
                 key_stream=(), low_rank=None):
        self.pool = pool
        self.key_stream = tuple(key_stream)
        # With a low-rank mass matrix: the warmup iterations at which the phases
        # end (but the last), the most eigenvectors, and the map of each phase
        # (phase 0: the identity, set once the dimension is known; phase p > 0:
        # the estimate from phase p - 1, set once every chain has finished it).
        self.switches, self.max_rank = [], 0
        if low_rank:
            (first, later), self.max_rank = low_rank
            self.switches = [first + i * later for i in range(LOW_RANK_PHASES - 1)]
        self.masses = [None] * (len(self.switches) + 1)
        # Warmup iterations after which the chains pool their covariance estimates:
        # just before the last iteration of each slow window (NumPyro's schedule),
        # so that the window's final update uses the pooled estimate.
        starts = [0, *self.switches]
        ends = [*self.switches, num_warmup]
        self.boundaries = [
            a + b for a, e in zip(starts, ends, strict=True) for b in _pooling_points(e - a)
        ] if cross_chain else []
        self.num_warmup = num_warmup
        self.seed = seed
        self.chunk_size = chunk_size
        self.init_params = init_params
        self.stopping = stopping
        self.store = store
        self.static = static
        self.chains = [_Chain(c) for c in range(num_chains)]
        self.bar = ChainProgress(num_chains, num_warmup + stopping.num_samples, enabled=progress_bar)
        self.restarts = [0] * pool.size
        self.last_loss = None
        self._points = stopping.evaluation_points()
        self.limit = next(self._points)
        self.outcome: dict[str, Any] = {}

    # -- bookkeeping ---------------------------------------------------------------
    def _resume(self):
        if self.store is None:
            return
        for chain in self.chains:
            rec = self.store.read_state(chain.chain_id)
            if rec is None:
                continue
            chain.state = rec["state"]
            chain.warmup_done = rec["warmup_done"]
            chain.samples_done = rec["samples_done"]
            chain.divergences = rec["divergences"]
            chain.pooled_through = rec.get("pooled_through", -1)
            chain.phase = rec.get("phase", 0)
            chain.points = [tuple(p) for p in rec.get("points", [])]
            # The masses are shared: a chain's record may predate the latest one.
            for p, mass in enumerate(rec.get("masses", [])):
                if mass is not None and self.masses[p] is None:
                    self.masses[p] = mass
            chain.draws, chain.stats = self.store.read_chunks(chain.chain_id, rec["num_chunks"])
        for chain in self.chains:
            # Points of a phase whose estimate exists were used (a record written
            # before the estimate still holds them).
            if (chain.phase < len(self.switches)
                    and self.masses[chain.phase + 1] is not None):
                chain.points = []
        computed = [m for m in self.masses[1:] if m is not None]
        if computed:
            self.outcome["low_rank_mass_rank"] = computed[-1].rank

    def _checkpoint(self, chain: _Chain, new_chunk: bool):
        if self.store is None:
            return
        if new_chunk:
            self.store.write_chunk(
                chain.chain_id, len(chain.draws) - 1, chain.draws[-1], chain.stats[-1]
            )
        self.store.write_state(
            chain.chain_id,
            dict(
                state=chain.state,
                warmup_done=chain.warmup_done,
                samples_done=chain.samples_done,
                divergences=chain.divergences,
                pooled_through=chain.pooled_through,
                num_chunks=len(chain.draws),
                # with a low-rank mass matrix: the warmup phase, its kept points
                # and the shared estimates so far (None: not yet computed)
                phase=chain.phase,
                points=chain.points,
                masses=self.masses,
            ),
        )

    def _next_work(self, chain: _Chain):
        if chain.state is None:
            if self.key_stream:
                from raybayes.config import derive_key

                stream = (*self.key_stream, chain.chain_id)
                key = np.asarray(derive_key(self.seed, *stream))
            else:
                key = chain_key(self.seed, chain.chain_id)
            return "init_chain", (chain.chain_id, key, self.init_params)
        low_rank = ()
        if self.switches:
            low_rank = (self.masses[chain.phase], chain.phase)
            if (chain.phase < len(self.switches)
                    and chain.warmup_done == self.switches[chain.phase]):
                new = self.masses[chain.phase + 1]
                if new is None:
                    return None  # waits for the other chains' draws
                return "switch_chain", (chain.chain_id, chain.state,
                                        self.masses[chain.phase], new)
        if chain.warmup_done < self.num_warmup:
            if self._waiting(chain):
                return None
            stops = self.boundaries + self.switches
            stop = min((b for b in stops if b > chain.warmup_done), default=self.num_warmup)
            n = min(self.chunk_size, stop - chain.warmup_done)
            return "advance", (chain.chain_id, chain.state, n, False, *low_rank)
        lookahead = self.chunk_size if self.stopping.has_target else 0
        cap = min(self.limit + lookahead, self.stopping.max_samples)
        if chain.samples_done < cap:
            n = min(self.chunk_size, cap - chain.samples_done)
            return "advance", (chain.chain_id, chain.state, n, True, *low_rank)
        return None

    def _switch_if_ready(self):
        """Estimate the low-rank mass matrix once every chain has ended a phase.

        Uses the draws and gradients of the second half of the phase, of all
        chains together (so the estimate does not depend on the number of
        workers), in the model's unconstrained coordinates.
        """
        if not self.switches:
            return
        phase = self.chains[0].phase
        if phase >= len(self.switches) or self.masses[phase + 1] is not None:
            return
        if any(c.running or c.phase != phase or c.warmup_done != self.switches[phase]
               for c in self.chains):
            return
        from raybayes.mcmc.mass import fisher_low_rank

        xs = np.concatenate([p[0] for c in self.chains for p in c.points])
        gs = np.concatenate([p[1] for c in self.chains for p in c.points])
        self.masses[phase + 1] = fisher_low_rank(xs, gs, max_rank=self.max_rank,
                                                 dtype=xs.dtype)
        self.outcome["low_rank_mass_rank"] = self.masses[phase + 1].rank
        for c in self.chains:
            c.points = []

    def _waiting(self, chain: _Chain) -> bool:
        """Whether the chain waits at a pooling point for the other chains."""
        b = chain.warmup_done
        return b in self.boundaries and chain.pooled_through < b

    def _pool_if_ready(self):
        """Pool the chains' covariance estimates once all wait at the same point."""
        if not self.boundaries:
            return
        points = {c.warmup_done for c in self.chains}
        if len(points) != 1 or any(c.running for c in self.chains):
            return
        b = points.pop()
        if not all(self._waiting(c) for c in self.chains):
            return
        pooled = _pool_welford([c.state.adapt_state.mm_state for c in self.chains])
        for chain in self.chains:
            adapt = chain.state.adapt_state._replace(mm_state=pooled)
            chain.state = chain.state._replace(adapt_state=adapt)
            chain.pooled_through = b
            self._checkpoint(chain, False)

    def _pick(self, worker: int):
        candidates = [
            c for c in self.chains
            if not c.running
            and (not self.static or c.chain_id % self.pool.size == worker)
            and self._next_work(c) is not None
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda c: (c.warmup_done + c.samples_done, c.chain_id))

    def _evaluate(self) -> bool:
        """Check the targets at the current evaluation point; True means stop."""
        n = self.limit
        if min(c.samples_done for c in self.chains) < n:
            return False
        if not self.stopping.has_target:
            self.outcome.update(stop_reason="num_samples", draws_per_chain=n)
            return True
        posterior = {
            k: np.stack([np.concatenate([d[k] for d in c.draws])[:n] for c in self.chains])
            for k in self.chains[0].draws[0]
        }
        diag = self.stopping.diagnostics(posterior)
        self.outcome.update(diag)
        if self.stopping.met(diag):
            self.outcome.update(stop_reason="targets_met", targets_met=True, draws_per_chain=n)
            return True
        if n >= self.stopping.max_samples:
            self.outcome.update(stop_reason="max_samples", targets_met=False, draws_per_chain=n)
            return True
        self.limit = next(self._points)
        return False

    # -- the loop --------------------------------------------------------------------
    def run(self):
        self._resume()
        resume = getattr(self.pool, "resume", None)  # a pool that holds the states
        if resume is not None:
            resume({c.chain_id: c.state for c in self.chains if c.state is not None})
        self._pool_if_ready()  # a run stopped while every chain waited to pool
        self._switch_if_ready()  # ... or had ended a low-rank phase
        pool, start = self.pool, time.perf_counter()
        idle = list(range(pool.size))
        self.pending = pending = []
        try:
            while not (self.outcome.get("stop_reason") or self._evaluate()):
                if self.stopping.max_time_s and time.perf_counter() - start > self.stopping.max_time_s:
                    n = min(c.samples_done for c in self.chains)
                    self.outcome.update(
                        stop_reason="max_time_s",
                        targets_met=False if self.stopping.has_target else None,
                        draws_per_chain=n,
                    )
                    break
                for worker in list(idle):
                    chain = self._pick(worker)
                    if chain is None:
                        continue
                    method, args = self._next_work(chain)
                    idle.remove(worker)
                    chain.running = True
                    chain.switching = method == "switch_chain"
                    pending.append(pool.submit(worker, method, *args, tag=chain.chain_id))
                if not pending:
                    if not idle:
                        raise WorkerLostError(
                            -1,
                            "every worker was lost and could not be restarted; last "
                            f"error: {self.last_loss}",
                        )
                    continue
                timeout = None
                if self.stopping.max_time_s:
                    timeout = max(0.0, self.stopping.max_time_s - (time.perf_counter() - start))
                for fut in pool.wait(pending, timeout_s=timeout):
                    pending.remove(fut)
                    self._handle(fut, idle)
        finally:
            self.bar.close()
        if self.outcome["draws_per_chain"] == 0:
            raise RuntimeError(
                f"the run stopped ({self.outcome['stop_reason']}) before any chain "
                "finished a sampling chunk; raise max_time_s."
            )
        self.outcome["worker_restarts"] = int(sum(self.restarts))
        return self.chains, self.outcome

    def _handle(self, fut, idle):
        pool = self.pool
        if fut.tag == "__ping__":
            try:
                pool.result(fut)
                idle.append(fut.worker_index)
            except WorkerLostError as err:
                self._restart(fut.worker_index, err)
            return
        chain = self.chains[fut.tag]
        chain.running = False
        try:
            out = pool.result(fut)
        except WorkerLostError as err:
            # The chain resumes from its last completed chunk on another worker.
            self._restart(fut.worker_index, err)
            return
        idle.append(fut.worker_index)
        new_chunk = False
        if isinstance(out, ChunkResult):
            chain.state = out.state
            if out.warmup_points is not None and chain.phase < len(self.switches):
                # Keep the second half of the phase for the low-rank estimate.
                start = ([0, *self.switches])[chain.phase]
                end = self.switches[chain.phase]
                first = chain.warmup_done
                keep = np.arange(first, first + out.num_steps) >= (start + end) // 2
                if keep.any():
                    chain.points.append(tuple(p[keep] for p in out.warmup_points))
            if out.draws is None:
                chain.warmup_done += out.num_steps
            else:
                chain.divergences += int(out.stats["diverging"].sum())
                chain.samples_done += out.num_steps
                chain.draws.append(out.draws)
                chain.stats.append(out.stats)
                new_chunk = True
        else:
            chain.state = out
            if chain.switching:
                chain.phase, chain.switching = chain.phase + 1, False
            elif self.switches and self.masses[0] is None:
                from raybayes.mcmc.mass import identity_mass

                z = np.asarray(out.z)
                self.masses[0] = identity_mass(z.shape[-1], self.max_rank, z.dtype)
        self._checkpoint(chain, new_chunk)
        self._pool_if_ready()
        self._switch_if_ready()
        phase = "warmup" if chain.warmup_done < self.num_warmup else "sampling"
        total = self.num_warmup + max(self.limit, chain.samples_done)
        self.bar.update(chain.chain_id, chain.warmup_done + chain.samples_done, phase,
                        chain.divergences, total=total)

    def _restart(self, worker, error=None):
        self.last_loss = error
        self.restarts[worker] += 1
        if self.restarts[worker] > self.MAX_RESTARTS_PER_WORKER:
            return  # give up on this slot; the others carry on
        self.pool.restart(worker)
        # The worker is idle again once it answers; until then its slot is unused.
        self.pending.append(self.pool.submit(worker, "ping", tag="__ping__"))
