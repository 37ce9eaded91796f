"""Chain-parallel NUTS on any backend: the driver side.

The driver owns every chain's state. It hands chunks of iterations to whichever
worker is free, so chains may outnumber workers and a worker never waits for
another. The whole chain state comes back with each chunk, so a chain can move
between workers; since each chain's randomness lives in its own state (seeded by
``fold_in(PRNGKey(seed), chain)``), the draws are the same on any number of workers
and on any backend.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raybayes.backends import Backend, get_backend
from raybayes.errors import ConfigurationError, WorkerLostError
from raybayes.mcmc.chain import SAMPLE_STATS, ChunkResult, NUTSChainRunner, chain_key
from raybayes.progress import ChainProgress
from raybayes.results import model_site_info, to_inference_data

__all__ = ["sample"]


@dataclass
class _Chain:
    chain_id: int
    state: Any = None
    warmup_done: int = 0
    samples_done: int = 0
    running: bool = False
    divergences: int = 0
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


def sample(
    model,
    *model_args,
    model_kwargs: dict | None = None,
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    seed: int = 0,
    backend: str | Backend = "ray",
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
):
    """Draw from a NumPyro model's posterior with NUTS, chains spread over workers.

    Each chain's key is ``fold_in(PRNGKey(seed), chain)``; the draws are bitwise
    identical (on CPU) whatever the backend and the number of workers.

    Args:
        model: a NumPyro model.
        *model_args: positional arguments of the model (arrays are sent to the
            workers once, through the object store).
        model_kwargs: keyword arguments of the model.
        num_chains: number of Markov chains.
        num_warmup: warmup (adaptation) iterations per chain.
        num_samples: kept draws per chain.
        seed: root seed of every chain's key.
        backend: ``"ray"`` (default; an embedded local Ray instance unless
            ``address``/``RAY_ADDRESS`` names a cluster), ``"local"`` (in-process)
            or a :class:`~raybayes.backends.Backend`.
        num_workers: worker count (default: ``min(num_chains, available CPUs)``).
        address: Ray cluster address, e.g. ``"10.0.0.1:6379"``.
        use_gpu: one GPU per worker.
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        init_params: initial values in the unconstrained space, site -> array.
        target_accept_prob: NUTS target acceptance probability, in (0, 1).
        max_tree_depth: maximum NUTS tree depth.
        dense_mass: adapt a dense mass matrix instead of a diagonal one.
        kernel_kwargs: further arguments of :class:`numpyro.infer.NUTS`.
        chunk_size: iterations per unit of remote work (default: about 1/20 of a
            chain, between 10 and 100).
        coords, dims: extra ArviZ coordinates and dimensions (override the plate
            names inferred from the model).
        progress_bar: show one progress bar per chain on the driver.

    Returns:
        ``arviz.InferenceData`` with ``posterior`` (each site
        ``(num_chains, num_samples, *site_shape)``, plate dims named after the
        plates), ``sample_stats`` (``diverging``, ``tree_depth``, ``n_steps``,
        ``step_size``, ``energy``, ``acceptance_rate``, ``lp``) and
        ``observed_data``.

    Raises:
        ConfigurationError: a bad argument (checked before anything runs).
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
    _check_positive_int("num_chains", num_chains)
    _check_positive_int("num_warmup", num_warmup, allow_zero=True)
    _check_positive_int("num_samples", num_samples)
    if num_workers is not None:
        _check_positive_int("num_workers", num_workers)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    if not 0 < target_accept_prob < 1:
        raise ConfigurationError(
            f"target_accept_prob={target_accept_prob} must lie in (0, 1); 0.8 is usual."
        )
    if not callable(model):
        raise ConfigurationError(f"model={model!r} is not callable; pass a NumPyro model function.")
    model_kwargs = dict(model_kwargs or {})
    chunk_size = chunk_size or _default_chunk_size(num_warmup, num_samples)
    kernel_kwargs = dict(kernel_kwargs or {})
    kernel_kwargs.update(
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        dense_mass=dense_mass,
    )

    # Driver-side trace: plate names for dims, and observed data (runs the model
    # once; a model that raises fails here, before any worker starts).
    site_dims, site_coords, observed = model_site_info(model, model_args, model_kwargs)
    site_dims.update(dims or {})
    site_coords.update(coords or {})

    engine = get_backend(
        backend, address=address, use_gpu=use_gpu, resources_per_worker=resources_per_worker
    )
    owns_engine = not isinstance(backend, Backend)
    engine.start()
    try:
        if num_workers is None:
            num_workers = max(1, min(num_chains, engine.default_num_workers()))
        args_ref = engine.put((model_args, model_kwargs))
        pool = engine.create_pool(
            _make_runner,
            (model, args_ref, num_warmup, chunk_size, kernel_kwargs),
            num_workers=num_workers,
            name="nuts",
        )
        try:
            chains = _run_chains(
                pool, num_chains, num_warmup, num_samples, seed, chunk_size, init_params,
                progress_bar,
            )
        finally:
            pool.shutdown()
    finally:
        if owns_engine:
            engine.shutdown()

    posterior = {
        name: np.stack([np.concatenate([d[name] for d in c.draws]) for c in chains])
        for name in chains[0].draws[0]
    }
    sample_stats = {
        name: np.stack([np.concatenate([s[name] for s in c.stats]) for c in chains])
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
            "num_warmup": num_warmup,
            "seed": seed,
            "num_workers": num_workers,
        },
    )


def _make_runner(model, args, num_warmup, chunk_size, kernel_kwargs):
    model_args, model_kwargs = args
    return NUTSChainRunner(
        model,
        model_args,
        model_kwargs,
        num_warmup=num_warmup,
        chunk_size=chunk_size,
        kernel_kwargs=kernel_kwargs,
    )


def _run_chains(pool, num_chains, num_warmup, num_samples, seed, chunk_size, init_params, progress_bar):
    chains = [_Chain(c) for c in range(num_chains)]
    total = num_warmup + num_samples
    bar = ChainProgress(num_chains, total, enabled=progress_bar)
    idle = list(range(pool.size))
    pending = []

    def next_work(chain: _Chain):
        if chain.state is None:
            return ("init_chain", (chain.chain_id, chain_key(seed, chain.chain_id), init_params))
        if chain.warmup_done < num_warmup:
            n = min(chunk_size, num_warmup - chain.warmup_done)
            return ("advance", (chain.chain_id, chain.state, n, False))
        if chain.samples_done < num_samples:
            n = min(chunk_size, num_samples - chain.samples_done)
            return ("advance", (chain.chain_id, chain.state, n, True))
        return None

    try:
        while True:
            # Hand work to every idle worker: the chain furthest behind goes first.
            while idle:
                candidates = [
                    c for c in chains if not c.running and next_work(c) is not None
                ]
                if not candidates:
                    break
                chain = min(candidates, key=lambda c: (c.warmup_done + c.samples_done, c.chain_id))
                method, args = next_work(chain)
                worker = idle.pop(0)
                chain.running = True
                pending.append(pool.submit(worker, method, *args, tag=chain.chain_id))
            if not pending:
                break
            for fut in pool.wait(pending):
                pending.remove(fut)
                chain = chains[fut.tag]
                chain.running = False
                try:
                    out = pool.result(fut)
                except WorkerLostError:
                    # The chain resumes from its last completed chunk elsewhere.
                    pool.restart(fut.worker_index)
                    idle.append(fut.worker_index)
                    continue
                idle.append(fut.worker_index)
                if isinstance(out, ChunkResult):
                    chain.state = out.state
                    if out.draws is not None:
                        chain.divergences += int(out.stats["diverging"].sum())
                    if out.draws is None:
                        chain.warmup_done += out.num_steps
                    else:
                        chain.samples_done += out.num_steps
                        chain.draws.append(out.draws)
                        chain.stats.append(out.stats)
                else:
                    chain.state = out
                phase = "warmup" if chain.warmup_done < num_warmup else "sampling"
                bar.update(
                    chain.chain_id,
                    chain.warmup_done + chain.samples_done,
                    phase if chain.samples_done < num_samples else "done",
                    chain.divergences,
                )
    finally:
        bar.close()
    return chains
