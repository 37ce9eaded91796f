"""Data-sharded NUTS: every chain's potential and gradient summed over shard workers.

The chains run on the driver, vectorised (one batch of ``num_chains`` positions),
with NumPyro's NUTS kernel on a potential function whose value and gradient come
from the shard workers: each leapfrog step sends every shard worker the chains'
global parameters and that shard's local parameters, each worker evaluates its
shard log density (:class:`~raybayes.core.ShardLogDensity`, global sites scaled by
1/S) for the whole chain batch in one vectorised call, and the driver adds the
shards' terms in shard order. One round trip per leapfrog step serves every chain,
and the data stay on the workers (put once into the object store; each worker
slices its own shard).

The potential is a :func:`jax.custom_vjp` function whose forward pass is a
:func:`jax.pure_callback` returning the value and the gradient together, so the
kernel's ``value_and_grad`` costs one callback. Because the shards' terms are added
in a fixed order in float64 on the driver, the draws do not depend on the backend
or on the scheduling of the workers: the same seed and number of shards give
bitwise identical draws in-process and on Ray.

The chains advance in chunks through the same scheduler as chain-parallel NUTS
(:mod:`raybayes.mcmc.sampler`): checkpoints after each chunk, run-to-target
(ESS, R-hat), cross-chain adaptation and resuming all work unchanged. A shard
worker that dies during a chunk is replaced by a fresh one holding the same shard,
and the chunk runs again from the chains' states at its start: the draws equal
those of an uninterrupted run.

Layout of a chain's position (the driver vector ``x`` of
:class:`~raybayes.distributed.ShardedObjective`): the ``G`` global parameters, then
each shard's local matrix ``(P_s, k)`` raveled, in shard order.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from raybayes.backends.base import Future
from raybayes.distributed.objective import ShardedObjective, constrained_values
from raybayes.distributed.worker import ShardWorker, worker_precision
from raybayes.errors import ChainError, ConfigurationError, WorkerLostError
from raybayes.mcmc.chain import ChunkResult, LowRankNUTS, chain_key

__all__ = [
    "NUTSShardObjective",
    "NUTSShardWorker",
    "shard_data_bytes",
    "sharded_potential",
]

#: Radius of the uniform initialisation in the unconstrained space (as NumPyro's
#: ``init_to_uniform``).
_INIT_RADIUS = 2.0
#: Initial points tried per chain before giving up.
_INIT_ATTEMPTS = 100


class NUTSShardWorker(ShardWorker):
    """A shard worker that evaluates its shard log density for a batch of chains."""

    @worker_precision
    def batch_value_and_grad(self, global_batch, local_batch):
        """Negative shard log joint and gradient at ``B`` points at once.

        Args:
            global_batch: ``(B, G)`` unconstrained globals.
            local_batch: ``(B, P_s, k)`` unconstrained locals of this shard.

        Returns:
            ``(values (B,), grad_global (B, G), grad_local (B, P_s, k))`` NumPy.
        """
        self._check()
        # NumPy in, NumPy out: the jitted call converts its arguments itself, at a
        # fraction of the cost of jnp.asarray (this runs once per leapfrog step).
        dtype = np.float64 if self.x64 else np.float32
        v, gg, gl = self.density.batched_value_and_grad(
            np.asarray(global_batch, dtype), np.asarray(local_batch, dtype)
        )
        return np.asarray(v), np.asarray(gg), np.asarray(gl)

    @worker_precision
    def initial_values(self, init_params, num_chains, entity_start, num_entities):
        """This shard's part of the chains' initial positions, from ``init_params``.

        Args:
            init_params: site -> unconstrained value, of the site's unconstrained
                shape over the whole split plate (the same for every chain) or with
                a leading ``num_chains`` axis (one per chain).
            num_chains: C.
            entity_start: position of this shard's first entity in the split plate.
            num_entities: entries of the split plate (all shards).

        Returns:
            ``(globals (C, G), locals (C, P_s, k))``, NaN where ``init_params`` gives
            no value.

        Raises:
            ConfigurationError: an unknown site, a value of the wrong shape, or a
                value that is not finite.
        """
        self._check()
        d = self.density
        d.check_site_names(init_params)
        count = d.num_local_entities
        g = np.full((num_chains, d.num_global), np.nan)
        lm = np.full((num_chains, count, d.num_local_per_entity), np.nan)
        for c in range(num_chains):
            params = d.unflatten(g[c], lm[c])
            for name, value in init_params.items():
                site = d.sites[name]
                shape = list(site.unconstrained_shape)
                if site.is_local:
                    shape[site.entity_axis] = num_entities
                value = np.asarray(value, np.float64)
                if value.shape == (num_chains, *shape):
                    value = value[c]
                elif value.shape != tuple(shape):
                    raise ConfigurationError(
                        f"init_params[{name!r}] has shape {value.shape}; site "
                        f"{name!r} takes {tuple(shape)} (unconstrained, the whole "
                        f"plate), or {(num_chains, *shape)} with one value per chain."
                    )
                bad = int((~np.isfinite(value)).sum())
                if bad:
                    raise ConfigurationError(
                        f"init_params[{name!r}] holds {bad} values that are NaN or "
                        "infinite; give finite unconstrained values, or leave the "
                        "site out (drawn uniformly)."
                    )
                if site.is_local:
                    rows = np.arange(entity_start, entity_start + count)
                    value = np.take(value, rows, axis=site.entity_axis)
                params[name] = value
            gc, lc = d.flatten(params)
            g[c], lm[c] = np.asarray(gc), np.asarray(lc)
        return g, lm


class NUTSShardObjective(ShardedObjective):
    """:class:`~raybayes.distributed.ShardedObjective` whose workers evaluate batches.

    :meth:`batch_value_and_grad` is the potential of data-sharded NUTS. A worker
    lost during a call is recorded in :attr:`lost_shards` (the chunk that made the
    call is then run again after :meth:`restart_shard`).

    Args:
        *args: as :class:`~raybayes.distributed.ShardedObjective` (model, model
            keyword arguments, ``partition=``, ``num_shards=``, ``backend=``, ...).
        **kwargs: as :class:`~raybayes.distributed.ShardedObjective`.

    Attributes:
        lost_shards: shards whose worker died during a call, not yet restarted.
        num_round_trips: calls of :meth:`batch_value_and_grad` so far (one per
            leapfrog step of all chains).

    Raises:
        ConfigurationError: see :class:`~raybayes.distributed.ShardedObjective`.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> from raybayes.core import Partition
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with NUTSShardObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     values, grads = f.batch_value_and_grad(np.zeros((3, f.size)))
        >>> values.shape, grads[:, 0].tolist()  # 3 chains; d/dmu = -4 each
        ((3,), [-4.0, -4.0, -4.0])
    """

    worker_class = NUTSShardWorker

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lost_shards: set[int] = set()
        self.num_round_trips = 0

    def batch_value_and_grad(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Negative log joint and gradient at ``B`` driver vectors.

        The shards are called at once and their terms added in shard order, in
        float64 (the same sum whatever the order in which the workers answer).

        Args:
            xs: ``(B, size)`` positions.

        Returns:
            ``(values (B,), grads (B, size))`` float64.

        Raises:
            WorkerLostError: a shard worker died (its index is in
                :attr:`lost_shards`).
            ShardError: the model raised on a shard.
        """
        xs = np.asarray(xs)
        g = np.ascontiguousarray(xs[:, : self.num_global])
        futures = []
        for s in range(self.num_shards):
            lo, hi = self._offsets[s], self._offsets[s + 1]
            local = xs[:, lo:hi].reshape((len(xs), *self.local_shapes[s]))
            futures.append(self.submit(s, "batch_value_and_grad", g, local))
        results = []
        for s, fut in enumerate(futures):
            try:
                results.append(self.result(fut))
            except WorkerLostError:
                self.lost_shards.add(s)
                raise
        value = np.zeros(len(xs), np.float64)
        grad_g = np.zeros((len(xs), self.num_global), np.float64)
        for v, gg, _ in results:
            value += np.asarray(v, np.float64)
            grad_g += np.asarray(gg, np.float64)
        grads = np.concatenate(
            [grad_g]
            + [np.asarray(r[2], np.float64).reshape(len(xs), -1) for r in results],
            axis=1,
        )
        self.num_round_trips += 1
        return value, grads

    def initial_positions(self, init_params: dict, num_chains: int) -> np.ndarray:
        """The chains' initial positions given by ``init_params``, NaN elsewhere.

        Args:
            init_params: site -> unconstrained value, of the site's unconstrained
                shape (local sites over the whole split plate), or with a leading
                ``num_chains`` axis (one value per chain).
            num_chains: C.

        Returns:
            ``(C, size)`` driver vectors; NaN at the coordinates of sites that
            ``init_params`` leaves out.

        Raises:
            ConfigurationError: an unknown site, a wrong shape or a value that is
                not finite (raised by the shard workers, before any compute).

        Examples:
            >>> import numpyro, numpyro.distributions as dist
            >>> from raybayes.core import Partition
            >>> def model(y):
            ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
            ...     with numpyro.plate("obs", y.shape[0]):
            ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
            >>> with NUTSShardObjective(model, {"y": np.ones(4)}, partition=Partition(
            ...         "obs", entity_args=("y",)), num_shards=2) as f:
            ...     x0 = f.initial_positions({"mu": np.array([0.5, -1.0])}, 2)
            >>> x0.tolist()  # one start per chain
            [[0.5], [-1.0]]
        """
        counts = [p for p, _ in self.local_shapes]
        starts = np.cumsum([0, *counts])
        results = self.gather(
            "initial_values",
            lambda s: (dict(init_params), num_chains, int(starts[s]), int(starts[-1])),
        )
        parts = [np.asarray(results[0][0], np.float64)]
        parts += [np.asarray(r[1], np.float64).reshape(num_chains, -1) for r in results]
        return np.concatenate(parts, axis=1)


def sharded_potential(evaluate, size: int):
    """A potential function (negative log density) whose value and gradient come
    from a host function, for NumPyro's NUTS kernel.

    Args:
        evaluate: host function ``(B, size) float array -> (values (B,), grads (B,
            size))`` (e.g. :meth:`NUTSShardObjective.batch_value_and_grad`).
        size: length of a position.

    Returns:
        ``potential(x)`` for ``x`` of shape ``(size,)``: a :func:`jax.custom_vjp`
        function whose forward pass is one :func:`jax.pure_callback` giving the
        value and the gradient together. Under :func:`jax.vmap` (chains) the
        callback receives the whole batch at once (``vmap_method="broadcast_all"``),
        so one call serves every chain.

    Examples:
        >>> f = sharded_potential(lambda x: ((x**2).sum(1), 2 * x), 3)
        >>> v, g = jax.value_and_grad(f)(jnp.ones(3))
        >>> float(v), g.tolist()
        (3.0, [2.0, 2.0, 2.0])
    """

    def host(x):
        x = np.asarray(x)
        flat = x.reshape(-1, size)
        v, g = evaluate(flat)
        with np.errstate(over="ignore"):  # far out, a float32 gradient is inf
            return (
                np.asarray(v, x.dtype).reshape(x.shape[:-1]),
                np.asarray(g, x.dtype).reshape(x.shape),
            )

    def call(x):
        shapes = (
            jax.ShapeDtypeStruct(x.shape[:-1], x.dtype),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
        )
        return jax.pure_callback(host, shapes, x, vmap_method="broadcast_all")

    @jax.custom_vjp
    def potential(x):
        return call(x)[0]

    def fwd(x):
        v, g = call(x)
        return v, g

    def bwd(g, ct):
        return (ct * g,)

    potential.defvjp(fwd, bwd)
    return potential


def shard_data_bytes(model_kwargs: dict, partition, num_shards: int) -> list[int]:
    """Bytes of data arrays each of ``num_shards`` shards would hold.

    Args:
        model_kwargs: the model's keyword arguments.
        partition: the split (``None``: one shard holding everything).
        num_shards: S.

    Returns:
        ``S`` byte counts, in shard order.
    """
    from raybayes.core.partition import assign_entities, shard_model_kwargs
    from raybayes.distributed.objective import _entity_counts

    def nbytes(kwargs):
        return int(sum(np.asarray(v).nbytes for v in kwargs.values() if np.ndim(v)))

    if partition is None:
        return [nbytes(model_kwargs)]
    specs = assign_entities(
        _entity_counts(model_kwargs, partition), num_shards, partition.plate
    )
    return [nbytes(shard_model_kwargs(model_kwargs, partition, s)) for s in specs]


def check_shard_budget(model_kwargs, partition, num_shards, max_shard_bytes):
    """Raise :class:`ConfigurationError` when a shard's data exceed the budget.

    The message gives the smallest number of shards whose every shard fits.
    """
    sizes = shard_data_bytes(model_kwargs, partition, num_shards)
    if max(sizes) <= max_shard_bytes:
        return
    worst = int(np.argmax(sizes))
    hint = "the model has no plate to split; reduce the data"
    if partition is not None:
        entities = partition.num_entities(model_kwargs)
        needed = None
        n = max(num_shards + 1, int(np.ceil(sum(sizes) / max_shard_bytes)))
        while n <= entities:
            if max(shard_data_bytes(model_kwargs, partition, n)) <= max_shard_bytes:
                needed = n
                break
            n = n + max(1, n // 8)
        if needed is None:
            hint = (
                f"even {entities} shards (one per entry of plate "
                f"{partition.plate!r}) do not fit; raise max_shard_bytes"
            )
        else:
            hint = f"use at least num_shards={needed}"
    raise ConfigurationError(
        f"shard {worst} of {num_shards} would hold {sizes[worst]:,} bytes of data, "
        f"over max_shard_bytes={max_shard_bytes:,}; {hint}."
    )


class _Compiled:
    """A NUTS kernel on a sharded potential and its jitted init and chunk functions.

    The potential calls whatever objective :attr:`evaluate` names when it runs, so
    a later run with the same shapes and settings reuses the compiled code (the
    compilation of a vectorised NUTS chunk takes seconds to tens of seconds).
    """

    def __init__(self, size, kernel_kwargs, low_rank=None):
        from numpyro.infer import NUTS

        self.evaluate = None
        self.in_use = False
        self.potential = sharded_potential(lambda xs: self.evaluate(xs), size)
        self.kernel = NUTS(potential_fn=self.potential, **kernel_kwargs)
        self.init_fn = None
        self.chunk_fn = None
        # With a low-rank mass matrix: the kernels (the ones chain-parallel NUTS
        # runs, on the sharded potential) and their jitted batch functions.
        self.low_rank = None
        if low_rank is not None:
            phases, dtype, chunk_size = low_rank
            self.low_rank = LowRankNUTS(
                self.potential, size, dtype, phases, chunk_size,
                target_accept_prob=kernel_kwargs.get("target_accept_prob", 0.8),
                max_tree_depth=kernel_kwargs.get("max_tree_depth", 10),
            )
        self.switch_fn = None
        self.phase_chunk_fns = [None, None]


#: (size, num_chains, num_warmup, chunk_size, dtype, kernel settings) -> [_Compiled]
_COMPILED: dict[tuple, list[_Compiled]] = {}
_COMPILED_LOCK = threading.Lock()


_MAX_COMPILED = 8


def _acquire_compiled(key, size, kernel_kwargs, low_rank=None) -> _Compiled:
    with _COMPILED_LOCK:
        # keep the most recent settings only (dicts keep insertion order)
        for old in list(_COMPILED)[: max(0, len(_COMPILED) - _MAX_COMPILED)]:
            if old != key and not any(e.in_use for e in _COMPILED[old]):
                del _COMPILED[old]
        entries = _COMPILED.pop(key, [])
        _COMPILED[key] = entries
        for entry in entries:
            if not entry.in_use:
                entry.in_use = True
                return entry
        entry = _Compiled(size, kernel_kwargs, low_rank)
        entry.in_use = True
        entries.append(entry)
        return entry


class _BatchFuture(Future):
    def __init__(self, worker_index, tag, method, args):
        self.worker_index = worker_index
        self.tag = tag
        self.method = method
        self.args = args
        self.done = False
        self.value = None
        self.error = None


class ShardedChainPool:
    """The chains of data-sharded NUTS, as a worker pool for the chain scheduler.

    Worker ``c`` is chain ``c``; the chunks submitted between two waits run as one
    vectorised batch of all chains on the driver (chains not submitted run 0
    iterations), whose potential calls the shard workers once per leapfrog step.
    The batch always holds every chain, so a chain's draws do not depend on which
    other chains happened to be submitted.

    Args:
        objective: the shard workers.
        num_chains: C.
        num_warmup: warmup iterations per chain.
        chunk_size: iterations per chunk.
        kernel_kwargs: arguments of :class:`numpyro.infer.NUTS`.
        seed: the run's seed; chain ``c`` uses ``chain_key(seed, c)`` (positions
            are JAX's default float).
        init_params: initial unconstrained values of some sites (see
            :meth:`NUTSShardObjective.initial_positions`); the other coordinates
            are drawn uniformly in [-2, 2].
        low_rank_phases: with a low-rank plus diagonal mass matrix, ``(first,
            later)`` warmup iterations of the first and of each later phase (the
            scheduler estimates the matrix between phases and asks for
            ``switch_chain``); the chains run
            :class:`~raybayes.mcmc.chain.LowRankNUTS`, the kernels of
            chain-parallel NUTS, vectorised. ``None``: NumPyro's NUTS.
    """

    MAX_RETRIES = 5

    def __init__(
        self,
        objective,
        *,
        num_chains,
        num_warmup,
        chunk_size,
        kernel_kwargs,
        seed,
        init_params=None,
        low_rank_phases=None,
    ):
        self.objective = objective
        self.init_params = init_params
        self.size = int(num_chains)
        self.num_warmup = int(num_warmup)
        self.chunk_size = int(chunk_size)
        self.seed = seed
        self.dtype = jnp.result_type(float)
        kernel_kwargs = {k: v for k, v in kernel_kwargs.items() if k != "init_strategy"}
        key = (
            objective.size,
            self.size,
            self.num_warmup,
            self.chunk_size,
            np.dtype(self.dtype).name,
            repr(sorted(kernel_kwargs.items())),
            low_rank_phases,
        )
        low_rank = None
        if low_rank_phases is not None:
            low_rank = (tuple(low_rank_phases), self.dtype, self.chunk_size)
        self._compiled = _acquire_compiled(
            key, objective.size, kernel_kwargs, low_rank
        )
        self._compiled.evaluate = objective.batch_value_and_grad
        self.kernel = self._compiled.kernel
        self.states: dict[int, Any] = {}
        self.queue: list[_BatchFuture] = []
        self.restarts = 0

    # -- the pool interface ------------------------------------------------------------
    def submit(self, worker_index, method, *args, tag=None, **kwargs):
        fut = _BatchFuture(worker_index, tag, method, args)
        if method == "ping":
            fut.done, fut.value = True, True
        else:
            self.queue.append(fut)
        return fut

    def wait(self, futures, timeout_s=None):
        if self.queue:
            batch, self.queue = self.queue, []
            self._run(batch)
        return [f for f in futures if f.done]

    def result(self, future):
        if future.error is not None:
            raise future.error
        return future.value

    def restart(self, worker_index):  # a chain slot has nothing to restart
        pass

    def resume(self, states):
        """Take the states of a resumed run's chains (chain id -> ``HMCState``):
        every batch holds every chain, also one that waits (at a low-rank phase's
        end, say) while the others catch up."""
        self.states.update(states)

    def shutdown(self):
        """Release the compiled kernel for the next run (the objective is closed by
        its owner)."""
        if self._compiled is not None:
            self._compiled.evaluate = None
            self._compiled.in_use = False
            self._compiled = None

    # -- the work ------------------------------------------------------------------
    def _run(self, batch):
        methods = {f.method for f in batch}
        for attempt in range(self.MAX_RETRIES + 1):
            try:
                if methods == {"init_chain"}:
                    self._init_batch(batch)
                elif methods == {"advance"}:
                    self._advance_batch(batch)
                elif methods == {"switch_chain"}:
                    self._switch_batch(batch)
                else:
                    raise RuntimeError(f"mixed work in one batch: {sorted(methods)}")
                return
            except Exception as err:  # noqa: BLE001 - a lost shard reruns the chunk
                lost = sorted(self.objective.lost_shards)
                if lost and attempt < self.MAX_RETRIES:
                    self.objective.lost_shards.clear()
                    for s in lost:
                        self.objective.restart_shard(s)
                    self.restarts += len(lost)
                    continue
                error = err
                if not isinstance(err, ChainError):
                    error = ChainError(
                        "(all chains: data-sharded NUTS)",
                        repr(err),
                        traceback.format_exc(),
                    )
                for f in batch:
                    f.done, f.error = True, error
                return

    def _initial_positions(self):
        """``(C, size)`` initial positions: ``init_params`` where given, elsewhere
        uniform in [-2, 2] (unconstrained), drawn again (from the chain's key) where
        the log density or its gradient is not finite."""
        size = self.objective.size
        keys = [chain_key(self.seed, c) for c in range(self.size)]
        given = np.full((self.size, size), np.nan)
        if self.init_params:
            given = self.objective.initial_positions(self.init_params, self.size)
        free = np.isnan(given)
        xs = np.zeros((self.size, size), self.dtype)
        todo = list(range(self.size))
        for attempt in range(_INIT_ATTEMPTS):
            for c in todo:
                k = jax.random.fold_in(
                    jax.random.fold_in(jnp.asarray(keys[c]), 7), attempt
                )
                uniform = np.asarray(
                    jax.random.uniform(
                        k, (size,), self.dtype, -_INIT_RADIUS, _INIT_RADIUS
                    )
                )
                xs[c] = np.where(free[c], uniform, given[c])
            v, g = self.objective.batch_value_and_grad(xs[todo])
            ok = np.isfinite(v) & np.all(np.isfinite(g), axis=1)
            todo = [c for c, good in zip(todo, ok, strict=True) if not good]
            if not todo:
                return keys, xs
            fixed = [c for c in todo if not free[c].any()]
            if fixed:
                raise ChainError(
                    fixed[0],
                    "the log density or its gradient is not finite at the initial "
                    "point given by init_params (every coordinate given); pass "
                    "values inside the model's support, or leave sites out to have "
                    "them drawn.",
                )
        raise ChainError(
            todo[0],
            "Cannot find valid initial parameters: the log density or its gradient is "
            f"not finite at {_INIT_ATTEMPTS} initial points drawn uniformly in "
            f"[-{_INIT_RADIUS}, {_INIT_RADIUS}] (unconstrained)"
            + (" for the sites init_params leaves out" if self.init_params else "")
            + ". Check the model's supports and data, or pass init_params.",
        )

    def _init_batch(self, batch):
        keys, xs = self._initial_positions()
        compiled = self._compiled
        if compiled.init_fn is None:
            if compiled.low_rank is not None:
                init = compiled.low_rank.init
            else:
                kernel, num_warmup = self.kernel, self.num_warmup

                def init(key, x):
                    return kernel.init(key, num_warmup, x, (), {})

            compiled.init_fn = jax.jit(jax.vmap(init))
        states = compiled.init_fn(jnp.asarray(np.stack(keys)), jnp.asarray(xs))
        self._keep_states(states, batch)

    def _keep_states(self, states, batch):
        """Split a batch of chain states (NumPy leaves) and answer the futures."""
        states = jax.tree_util.tree_map(np.asarray, states)
        for c in range(self.size):
            self.states[c] = jax.tree_util.tree_map(lambda a, c=c: a[c], states)
        for f in batch:
            f.done, f.value = True, self.states[f.args[0]]

    def _stacked(self):
        return jax.tree_util.tree_map(
            lambda *a: jnp.asarray(np.stack(a)),
            *[self.states[c] for c in range(self.size)],
        )

    def _switch_batch(self, batch):
        """Move every chain to the new low-rank coordinates (one estimate for all)."""
        for f in batch:
            self.states[f.args[0]] = f.args[1]
        _, _, old, new = batch[0].args
        compiled = self._compiled
        if compiled.switch_fn is None:
            compiled.switch_fn = jax.jit(
                jax.vmap(compiled.low_rank.switch, in_axes=(0, None, None))
            )
        tree = jax.tree_util.tree_map
        states = compiled.switch_fn(
            self._stacked(), tree(jnp.asarray, old), tree(jnp.asarray, new)
        )
        bad = ~np.isfinite(np.asarray(states.potential_energy))
        if bad.any():
            raise ChainError(
                int(np.flatnonzero(bad)[0]),
                "the log density is not finite at the chain's point in the new "
                "low-rank coordinates; check the model's supports and data.",
            )
        self._keep_states(states, batch)

    def _build_chunk(self):
        kernel, size = self.kernel, self.chunk_size

        def stats_of(s):
            return {
                "diverging": s.diverging,
                "n_steps": s.num_steps,
                "step_size": s.adapt_state.step_size,
                "energy": s.energy,
                "acceptance_rate": s.accept_prob,
                "lp": -s.potential_energy,
            }

        def one(s, i, n):
            return lax.cond(i < n, lambda x: kernel.sample(x, (), {}), lambda x: x, s)

        def chunk(states, num_steps):
            def body(s, i):
                s = jax.vmap(one, in_axes=(0, None, 0))(s, i, num_steps)
                return s, (s.z, stats_of(s))

            return lax.scan(body, states, jnp.arange(size))

        self._compiled.chunk_fn = jax.jit(chunk)

    def _advance_batch(self, batch):
        start = time.perf_counter()
        num_steps = np.zeros(self.size, np.int32)
        collect = np.zeros(self.size, bool)
        requested = {}
        for f in batch:
            chain_id, state, n, want = f.args[:4]
            if not 0 < n <= self.chunk_size:
                raise ChainError(
                    chain_id, f"num_steps={n} outside 1..{self.chunk_size}"
                )
            self.states[chain_id] = state
            num_steps[chain_id], collect[chain_id] = n, want
            requested[chain_id] = f
        if len(self.states) < self.size:  # cannot happen after a batched init
            raise ChainError(
                "(data-sharded NUTS)", "a chain was advanced before every chain existed"
            )
        stacked = self._stacked()
        points = None
        if self._compiled.low_rank is not None:
            zs, stats, points, new = self._advance_low_rank(batch, stacked, num_steps)
        else:
            if self._compiled.chunk_fn is None:
                self._build_chunk()
            new, (zs, stats) = self._compiled.chunk_fn(
                stacked, jnp.asarray(num_steps)
            )
            zs = np.asarray(zs)  # (chunk, C, size)
            stats = {k: np.asarray(v) for k, v in stats.items()}
        new = jax.tree_util.tree_map(np.asarray, new)
        want = [c for c in requested if collect[c]]
        draws = {}
        if want:
            xs = np.concatenate([zs[: num_steps[c], c] for c in want])
            values, _ = constrained_values(self.objective, xs)
            offsets = np.cumsum([0] + [int(num_steps[c]) for c in want])
            for j, c in enumerate(want):
                draws[c] = {
                    k: v[offsets[j] : offsets[j + 1]] for k, v in values.items()
                }
        elapsed = time.perf_counter() - start
        for c, f in requested.items():
            n = int(num_steps[c])
            state = jax.tree_util.tree_map(lambda a, c=c: a[c], new)
            self.states[c] = state
            st = {k: v[:n, c] for k, v in stats.items()}
            st["tree_depth"] = (
                np.floor(np.log2(np.maximum(st["n_steps"], 1))).astype(np.int64) + 1
            )
            warmup_points = None
            if points is not None and not collect[c]:
                warmup_points = (points[0][:n, c], points[1][:n, c])
            f.done = True
            f.value = ChunkResult(
                c, state, draws.get(c), st, n, elapsed, warmup_points
            )

    def _advance_low_rank(self, batch, stacked, num_steps):
        """A chunk of every chain in the low-rank coordinates of their phase.

        Returns ``(x, stats, (x, grad), new_states)``: the draws in the model's
        unconstrained coordinates and the gradients there, each ``(chunk, C,
        size)``, the stats ``(chunk, C)``.
        """
        phases = {int(f.args[5]) for f in batch}
        if len(phases) != 1:  # the scheduler moves the chains in lockstep
            raise RuntimeError(f"chains of several warmup phases in a batch: {phases}")
        mass = jax.tree_util.tree_map(jnp.asarray, batch[0].args[4])
        phase = min(phases.pop(), 1)
        compiled = self._compiled
        if compiled.phase_chunk_fns[phase] is None:
            compiled.phase_chunk_fns[phase] = jax.jit(
                jax.vmap(compiled.low_rank.chunk(phase), in_axes=(0, 0, None))
            )
        new, (_, xs, gs, stats) = compiled.phase_chunk_fns[phase](
            stacked, jnp.asarray(num_steps), mass
        )

        def time_first(a):  # (C, chunk, ...) -> (chunk, C, ...)
            return np.swapaxes(np.asarray(a), 0, 1)

        xs, gs = time_first(xs), time_first(gs)
        stats = {k: time_first(v) for k, v in stats.items()}
        return xs, stats, (xs, gs), new


def check_sharded_arguments(
    *,
    num_shards,
    plan,
    num_workers,
    scheduling,
    worker_slowdown,
    key_stream,
    max_shard_bytes,
    partition=None,
    source=None,
    model_kwargs=None,
):
    """Raise :class:`ConfigurationError` for options data-sharded NUTS cannot take.

    Returns:
        ``(num_shards, partition)``: the number of shards (from ``num_shards`` or
        the plan; ``None`` for chain-parallel NUTS) and the split (from
        ``partition`` or the plan; ``None`` for :func:`raybayes.plan` to choose).
    """
    if plan is not None:
        from raybayes.plan import Plan

        if not isinstance(plan, Plan):
            raise ConfigurationError(
                f"plan={plan!r} is not a raybayes.Plan; pass the result of "
                "raybayes.plan(model, model_kwargs, num_shards=S)."
            )
        if num_shards is not None and int(num_shards) != plan.num_shards:
            raise ConfigurationError(
                f"num_shards={num_shards} but plan= was made for {plan.num_shards} "
                "shards; pass one of the two."
            )
        if partition is not None and partition != plan.partition:
            raise ConfigurationError(
                f"partition={partition!r} and plan= (split {plan.partition!r}) were "
                "both given; pass one of the two."
            )
        num_shards, partition = plan.num_shards, plan.partition
    if num_shards is None:
        given = [
            name
            for name, value in (
                ("max_shard_bytes", max_shard_bytes),
                ("partition", partition),
                ("source", source),
            )
            if value is not None
        ]
        if given:
            raise ConfigurationError(
                f"{'= and '.join(given)}= apply to data-sharded NUTS; pass "
                "num_shards= (or plan=) too."
            )
        return None, None
    if isinstance(num_shards, bool) or int(num_shards) != num_shards or num_shards < 1:
        raise ConfigurationError(f"num_shards={num_shards!r}; use an integer >= 1.")
    if num_workers is not None and num_workers != num_shards:
        raise ConfigurationError(
            f"num_workers={num_workers} and num_shards={num_shards}: data-sharded NUTS "
            "runs one worker per shard (the chains run together on the driver); pass "
            "one of them, or the same number."
        )
    bad = []
    if scheduling != "dynamic":
        bad.append("_scheduling")
    if worker_slowdown:
        bad.append("_worker_slowdown")
    if key_stream:
        bad.append("_key_stream")
    if bad:
        raise ConfigurationError(
            f"num_shards={num_shards} cannot be combined with {', '.join(bad)}: with "
            "data-sharded NUTS the chains run together on the driver and each worker "
            "holds a shard, so there is no chain scheduling to choose. Drop these "
            "options, or drop num_shards= to run chain-parallel NUTS."
        )
    if max_shard_bytes is not None and not (
        isinstance(max_shard_bytes, (int, np.integer)) and max_shard_bytes > 0
    ):
        raise ConfigurationError(
            f"max_shard_bytes={max_shard_bytes!r}; use a positive number of bytes."
        )
    if source is not None:
        check_source(source, partition, model_kwargs)
    return int(num_shards), partition


def check_source(source, partition, model_kwargs) -> None:
    """Raise :class:`ConfigurationError` for a Parquet ``source`` that cannot be
    read shard by shard (as :func:`raybayes.sample_subposteriors` checks it).

    Args:
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` (anything with
            ``read_shard(shard_id, num_shards)``).
        partition: the split the partitions follow; required.
        model_kwargs: must be empty: the workers build them from their partitions.

    Raises:
        ConfigurationError: ``source`` cannot read shards, ``partition`` is
            missing, or ``model_kwargs`` were given too.

    Examples:
        >>> check_source(object(), None, None)
        Traceback (most recent call last):
        ...
        raybayes.errors.ConfigurationError: source=<object ...> has no read_shard; ...
    """
    if not hasattr(source, "read_shard"):
        raise ConfigurationError(
            f"source={source!r} has no read_shard; pass a "
            "raybayes.datasets.parquet.ParquetShards."
        )
    if partition is None:
        raise ConfigurationError(
            "source= needs partition=: the plate the Parquet partitions split, "
            "e.g. partition=raybayes.Partition('obs', entity_args=('X', 'y'))."
        )
    if model_kwargs:
        raise ConfigurationError(
            f"source= and model_kwargs={sorted(model_kwargs)} were both given; "
            "with source, each worker builds its shard's model_kwargs from its "
            "partitions (source.to_model_kwargs): pass model_kwargs=None."
        )


def check_loaded_shard_budget(data_bytes, max_shard_bytes) -> None:
    """Raise :class:`ConfigurationError` when a shard read by its worker exceeds
    ``max_shard_bytes`` (a Parquet source, whose sizes the driver cannot know
    before the workers read it); checked before any compute.

    Args:
        data_bytes: bytes of data each shard holds, in shard order.
        max_shard_bytes: the budget.

    Raises:
        ConfigurationError: a shard above the budget; the message names it and the
            fewest shards whose average fits.

    Examples:
        >>> check_loaded_shard_budget([100, 120], 200)  # fits: nothing happens
        >>> check_loaded_shard_budget([300, 280], 200)
        Traceback (most recent call last):
        ...
        raybayes.errors.ConfigurationError: shard 0 holds 300 bytes ... (at least 3).
    """
    if max(data_bytes) <= max_shard_bytes:
        return
    worst = int(np.argmax(data_bytes))
    raise ConfigurationError(
        f"shard {worst} holds {data_bytes[worst]:,} bytes of data, over "
        f"max_shard_bytes={max_shard_bytes:,}; use more shards (at least "
        f"{int(np.ceil(sum(data_bytes) / max_shard_bytes))})."
    )
