"""The driver side of the shard workers: one pool, gather/reduce, fault handling.

:class:`ShardedObjective` starts one worker per shard on a backend
(:func:`raybayes.backends.get_backend`: in-process or Ray actors), gives every
algorithm the same public interface to them (:meth:`~ShardedObjective.submit`,
:meth:`~ShardedObjective.result`, :meth:`~ShardedObjective.gather`,
:meth:`~ShardedObjective.call_all`, :meth:`~ShardedObjective.restart_shard`), and
sums the shards' values and gradients into the exact full-data objective. In-memory
data are put into the object store once and each worker slices its own shard; a
partitioned Parquet dataset is read by each worker, its own partitions only
(:class:`raybayes.datasets.parquet.ParquetShards`), so data never pass through the
driver. It holds no numerics beyond adding the shards' terms.

Layout of the driver's vector ``x`` (``float64``, shape ``(num_global + sum_s
num_local_s,)``): the global parameters first, then each shard's local matrix
``(num_local_entities_s, k)`` raveled, in shard order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from raybayes.backends import Backend, Future, get_backend
from raybayes.config import ScalingConfig
from raybayes.core.partition import (
    Partition,
    ShardSpec,
    assign_entities,
)
from raybayes.distributed.worker import ShardWorker
from raybayes.errors import ConfigurationError, RemoteTaskError, ShardError

__all__ = [
    "ShardedObjective",
    "constrained_values",
    "make_backend",
    "merge_shard_values",
    "planned_objective",
    "shard_count",
]


def _entity_counts(model_kwargs, partition):
    num = partition.num_entities(model_kwargs)
    if partition.index_arg is None:
        return np.ones(num)
    return np.bincount(np.asarray(model_kwargs[partition.index_arg]), minlength=num)


def make_backend(
    backend: str | Backend, scaling: ScalingConfig | None, parallel_work: int
) -> Backend:
    """The backend instance for ``backend`` (``"auto"`` resolved with
    :func:`raybayes.config.resolve_backend_name`) and a scaling configuration.

    Raises:
        ConfigurationError: an unknown backend name, or ``address=`` with
            ``backend="local"``.
    """
    return get_backend(backend, scaling or ScalingConfig(), parallel_work=parallel_work)


class ShardedObjective:
    """The negative log joint of a model, summed over shard workers (exact).

    Args:
        model: a NumPyro model.
        model_kwargs: its keyword arguments (NumPy arrays and scalars), or ``None``
            when ``source`` reads the data on the workers.
        partition: the split (see :func:`raybayes.plan`).
        num_shards: S; one worker per shard.
        backend: ``"local"`` (default for this building block), ``"ray"``,
            ``"auto"`` (resolved with ``scaling``) or a
            :class:`~raybayes.backends.Backend`.
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` (data read on
            the workers, never on the driver).
        model_args: positional model arguments.
        x64: workers compute in float64 (default; a JAX context, nothing global
            changes) or float32.
        scaling: the :class:`~raybayes.config.ScalingConfig` (address, GPUs,
            resources per worker) of a backend given by name.

    Attributes:
        num_global: G, the number of global (unconstrained) parameters.
        local_shapes: ``(P_s, k)`` of each shard's local matrix.
        size: length of the driver vector ``x``.
        partition: the split.
        backend: the backend the workers run on.
        pool: the backend's :class:`~raybayes.backends.WorkerPool`, one worker per
            shard (worker ``s`` holds shard ``s``).
        global_sites: ``[(name, unconstrained shape)]`` of the global sites.
        num_evaluations: calls of :meth:`value_and_grad` so far.

    Raises:
        ConfigurationError: no data, or more shards than plate entries.
        ShardError: a shard failed to load (names the shard, with the worker's
            traceback).

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with ShardedObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     value, grad = f.value_and_grad(np.zeros(f.size))
        >>> round(value, 4), grad.tolist()  # 5 * log(2 pi)/2 + 4/2; d/dmu = -4
        (6.5947, [-4.0])
    """

    #: the worker object each shard holds (subclasses add methods to it).
    worker_class = ShardWorker

    def __init__(
        self,
        model: Callable,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        partition: Partition | None,
        num_shards: int,
        backend: str | Backend = "local",
        source: Any = None,
        model_args: tuple = (),
        x64: bool = True,
        scaling: ScalingConfig | None = None,
    ):
        if model_kwargs is None and source is None:
            raise ConfigurationError(
                "pass model_kwargs= (arrays) or source= (Parquet)."
            )
        if partition is None and num_shards != 1:
            raise ConfigurationError(
                f"num_shards={num_shards} needs a partition; see raybayes.plan."
            )
        self.model = model
        self.partition = partition
        self.num_shards = int(num_shards)
        self.backend = make_backend(backend, scaling, self.num_shards)
        self._owns_backend = not isinstance(backend, Backend)
        self.backend.start()
        if source is not None:
            specs = [
                ShardSpec(s, self.num_shards, -1, -1) for s in range(self.num_shards)
            ]
            data = source
        else:
            model_kwargs = dict(model_kwargs)
            if partition is not None:
                partition.validate(model_kwargs)
                specs = assign_entities(
                    _entity_counts(model_kwargs, partition),
                    self.num_shards,
                    partition.plate,
                )
            else:
                specs = [ShardSpec(0, 1, 0, 0)]
            data = self.backend.put(model_kwargs)  # once, into the object store
        self.specs = specs
        self.pool = self.backend.create_pool(
            self.worker_class,
            (model, data, partition, specs, tuple(model_args), x64),
            num_workers=self.num_shards,
            name="shard",
        )
        try:
            self.shard_info = [
                self.result(self.submit(s, "setup", s)) for s in range(self.num_shards)
            ]
        except BaseException:
            self.close()
            raise
        self.num_global = int(self.shard_info[0]["num_global"])
        self.global_sites = self.shard_info[0]["global_sites"]
        self.local_shapes = [
            (int(i["num_local_entities"]), int(i["num_local_per_entity"]))
            for i in self.shard_info
        ]
        sizes = [p * k for p, k in self.local_shapes]
        self._offsets = np.cumsum([self.num_global, *sizes])
        self.size = int(self._offsets[-1])
        self.num_evaluations = 0

    # ------------------------------------------------------------- workers
    def submit(self, shard: int, method: str, *args, **kwargs) -> Future:
        """Call ``method(*args, **kwargs)`` on shard ``shard``'s worker; the future's
        ``tag`` is the shard index."""
        return self.pool.submit(shard, method, *args, tag=shard, **kwargs)

    def wait(
        self, futures: Sequence[Future], timeout_s: float | None = None
    ) -> list[Future]:
        """The futures that are done (at least one unless ``timeout_s`` passes)."""
        return self.pool.wait(futures, timeout_s)

    def result(self, future: Future) -> Any:
        """The value of a future of :meth:`submit`, waiting for it.

        Raises:
            ShardError: the call raised on the worker; names the shard and carries
                the worker's traceback. Errors raised by raybayes itself on the
                worker (``ConfigurationError``, ``ShardError``, ...) pass as they are.
            WorkerLostError: the worker died (``worker_index`` is the shard).
        """
        while not self.pool.wait([future]):
            pass
        try:
            return self.pool.result(future)
        except RemoteTaskError as err:
            if type(err) is not RemoteTaskError:
                raise
            shard = future.tag if future.tag is not None else future.worker_index
            raise ShardError(shard, err.message, err.remote_traceback) from None

    def call(self, shard: int, method: str, *args, **kwargs) -> Any:
        """:meth:`submit` then :meth:`result`."""
        return self.result(self.submit(shard, method, *args, **kwargs))

    def gather(
        self, method: str, per_shard_args: Callable[[int], tuple] | None = None
    ) -> list:
        """Call ``method(*per_shard_args(s))`` on every shard ``s`` (in parallel on
        Ray) and return the results in shard order.

        Raises:
            ShardError: see :meth:`result` (the first failing shard, in order).
        """
        futures = [
            self.submit(s, method, *(per_shard_args(s) if per_shard_args else ()))
            for s in range(self.num_shards)
        ]
        return [self.result(f) for f in futures]

    def call_all(self, method: str, *args) -> list:
        """Call ``method(*args)`` with the same arguments on every shard."""
        return self.gather(method, lambda s: args)

    def restart_shard(self, shard: int) -> dict:
        """Replace a lost worker with a fresh one holding the same shard.

        Returns:
            The shard's description (see :meth:`ShardWorker.setup`).
        """
        self.pool.restart(shard)
        return self.call(shard, "setup", shard)

    def put(self, value: Any) -> Any:
        """Place a value once where every worker can read it (Ray's object store)."""
        return self.backend.put(value)

    # ----------------------------------------------------------------- layout
    def split(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(global (G,), [local (P_s, k)])`` views of a driver vector."""
        x = np.asarray(x)
        locals_ = [
            x[self._offsets[s] : self._offsets[s + 1]].reshape(self.local_shapes[s])
            for s in range(self.num_shards)
        ]
        return x[: self.num_global], locals_

    def join(self, global_flat, locals_) -> np.ndarray:
        """The driver vector ``(size,)`` float64 from globals and per-shard locals."""
        parts = [np.ravel(global_flat)] + [np.ravel(lm) for lm in locals_]
        return np.concatenate(parts).astype(np.float64)

    # ---------------------------------------------------------------- objective
    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Negative log joint (unconstrained space) and its gradient ``(size,)``,
        ``float64``.

        Each shard computes its term in parallel; the driver adds them.
        """
        g, locals_ = self.split(x)
        g32 = np.asarray(g)
        results = self.gather("value_and_grad", lambda s: (g32, locals_[s]))
        value = sum(r[0] for r in results)
        grad_g = np.sum([np.asarray(r[1], np.float64) for r in results], axis=0)
        grad = self.join(grad_g, [r[2] for r in results])
        self.num_evaluations += 1
        return float(value), grad

    def close(self) -> None:
        """Release the workers (and the backend, if this object started it)."""
        self.pool.shutdown()
        if self._owns_backend:
            self.backend.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def planned_objective(
    model: Callable,
    model_kwargs: Mapping[str, Any] | None,
    num_shards: int,
    *,
    partition: Partition | None = None,
    backend: str | Backend = "local",
    source: Any = None,
    model_args: tuple = (),
    objective_class: type[ShardedObjective] = ShardedObjective,
    x64: bool = True,
    scaling: ScalingConfig | None = None,
) -> ShardedObjective:
    """A :class:`ShardedObjective` (or ``objective_class``), with the split chosen by
    :func:`raybayes.plan` when neither ``partition`` nor ``source`` is given.

    Args:
        model: a NumPyro model.
        model_kwargs: its keyword arguments (``None`` with ``source``).
        num_shards: S requested (the plan may choose fewer).
        partition: the split; chosen by :func:`raybayes.plan` when ``None``.
        backend: see :class:`ShardedObjective`.
        source: see :class:`ShardedObjective`.
        model_args: positional model arguments.
        objective_class: the class to build (a subclass whose workers hold an
            algorithm's per-shard state).
        x64: workers compute in float64.
        scaling: see :class:`ShardedObjective`.

    Returns:
        The objective; close it (or use it as a context manager).

    Raises:
        ConfigurationError: see :func:`raybayes.plan` and :class:`ShardedObjective`.
        DataValidationError: an observed site's data hold NaN or inf (in-memory
            data; checked before any worker starts).
    """
    from raybayes.core.validation import check_observed_data
    from raybayes.plan import resolve_split

    if source is None:  # with a source, the data are read on the workers
        check_observed_data(model, model_args, model_kwargs)
        # one shard needs no plan; positional arguments get names
        model_args, model_kwargs, partition, num_shards = resolve_split(
            model, model_args, model_kwargs, num_shards, partition
        )
    return objective_class(
        model,
        model_kwargs,
        partition=partition,
        num_shards=num_shards,
        backend=backend,
        source=source,
        model_args=model_args,
        x64=x64,
        scaling=scaling,
    )


def merge_shard_values(results: Sequence[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Concatenate per-shard ``(values, axes)`` on each local site's entity axis.

    Args:
        results: per shard, the output of
            :func:`raybayes.core.site_values.constrained_site_values`: site ->
            ``(D, *shape_s)`` and site -> entity axis (without the draw axis).

    Returns:
        ``(values, axes)``: global sites from the first shard, local sites
        concatenated in shard order (entity order of the split plate).
    """
    values, axes = {}, {}
    for name, value in results[0][0].items():
        axis = results[0][1].get(name)
        if axis is None:
            values[name] = value
        else:
            values[name] = np.concatenate([r[0][name] for r in results], axis=axis + 1)
            axes[name] = axis
    return values, axes


def constrained_values(
    objective: ShardedObjective, xs: np.ndarray, locals_draws=None
) -> tuple[dict, dict]:
    """Constrained site values for draws of the driver vector, computed on the shards.

    Args:
        objective: the sharded objective.
        xs: ``(D, size)`` unconstrained draws in the driver layout (or ``(D, G)``
            globals when ``locals_draws`` is given).
        locals_draws: per shard ``(D, P_s, k)`` draws of the locals, optional.

    Returns:
        ``(values, axes)``: site -> ``(D, *full_shape)`` with local sites
        concatenated over shards on their entity axis; ``axes`` the entity axis of
        each local site (without the draw axis).

    Raises:
        ShardError: a shard failed (names it).
    """
    xs = np.atleast_2d(xs)
    if locals_draws is None:
        parts = [objective.split(x) for x in xs]
        globals_ = np.stack([p[0] for p in parts])
        locals_draws = [
            np.stack([p[1][s] for p in parts]) for s in range(objective.num_shards)
        ]
    else:
        globals_ = xs
    results = objective.gather(
        "constrained_values", lambda s: (globals_, locals_draws[s])
    )
    return merge_shard_values(results)


def shard_count(num_shards: int | None, scaling: ScalingConfig) -> int:
    """The number of shards of an entry point from ``num_shards`` and ``num_workers``.

    Raises:
        ConfigurationError: both given and different, or ``num_shards < 1``.
    """
    n = scaling.num_workers
    if num_shards is None:
        return n or 1
    if int(num_shards) != num_shards or num_shards < 1:
        raise ConfigurationError(f"num_shards={num_shards!r}; use an integer >= 1.")
    if n is not None and n != num_shards:
        raise ConfigurationError(
            f"num_workers={n} and num_shards={num_shards}: the shard algorithms run "
            "one worker per shard; pass one of them, or the same number."
        )
    return int(num_shards)
