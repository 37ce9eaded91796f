"""Shard workers and the driver-side sharded objective (Ray-agnostic).

Each shard worker holds one shard of the data and its
:class:`~raybayes.core.ShardLogDensity`; the driver holds the parameter vector and
sums the workers' values and gradients. The workers run on any backend
(:func:`raybayes.backends.get_backend`): in-process or Ray actors. In-memory data
are put into the object store once and each worker slices its own shard; a
partitioned Parquet dataset is read by each worker, its own partitions only
(:class:`raybayes.datasets.parquet.ParquetShards`), so data never pass through the
driver.

Layout of the driver's vector ``x`` (``float64``, shape ``(num_global + sum_s
num_local_s,)``): the global parameters first, then each shard's local matrix
``(num_local_entities_s, k)`` raveled, in shard order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from raybayes.backends import Backend, get_backend
from raybayes.core.partition import (
    Partition,
    ShardSpec,
    assign_entities,
    shard_model_kwargs,
)
from raybayes.core.shard_density import ShardLogDensity
from raybayes.errors import ConfigurationError, ShardError

__all__ = ["ShardWorker", "ShardedObjective"]


def _in_precision(method):
    """Run a worker method with 64-bit floats when the worker asks for them.

    ``jax.enable_x64`` is a context, so nothing global changes in the process
    (which is the driver's own with the local backend).
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with jax.enable_x64(self.x64):
            return method(self, *args, **kwargs)

    return wrapper


def _entity_counts(model_kwargs, partition):
    num = partition.num_entities(model_kwargs)
    if partition.index_arg is None:
        return np.ones(num)
    return np.bincount(np.asarray(model_kwargs[partition.index_arg]), minlength=num)


class ShardWorker:
    """The object each worker holds: one shard's data and log density.

    Built identically on every worker (``factory_args`` are shared); :meth:`setup`
    then selects the shard. Every method returns NumPy arrays.

    Args:
        model: the NumPyro model.
        data: the full model arguments (a dict; arrays arrive from the object store
            without copies on the driver), or a
            :class:`~raybayes.datasets.parquet.ParquetShards` source.
        partition: the split.
        specs: one :class:`~raybayes.core.ShardSpec` per shard (in-memory data).
        model_args: positional model arguments.
        x64: compute in float64 (default). Sums over ~10^5 rows or more lose the
            precision a line search needs in float32.
    """

    def __init__(self, model, data, partition, specs, model_args=(), x64=True):
        self.x64 = bool(x64)
        self.model = model
        self.data = data
        self.partition = partition
        self.specs = specs
        self.model_args = tuple(model_args)
        self.density: ShardLogDensity | None = None
        self.shard_id: int | None = None

    # -------------------------------------------------------------- set-up
    @_in_precision
    def setup(self, shard_id: int) -> dict:
        """Load shard ``shard_id`` and describe its parameters."""
        num_shards = len(self.specs)
        if hasattr(self.data, "read_shard"):
            kwargs, entity_ids = self.data.read_shard(shard_id, num_shards)
        elif self.partition is None:
            kwargs, entity_ids = dict(self.data), np.zeros(0, np.int64)
        else:
            spec = self.specs[shard_id]
            kwargs = shard_model_kwargs(self.data, self.partition, spec)
            entity_ids = np.arange(spec.entity_start, spec.entity_stop)
        self.kwargs = kwargs
        self.entity_ids = np.asarray(entity_ids)
        self.shard_id = shard_id
        self.density = ShardLogDensity(
            self.model, kwargs, self.partition, num_shards, self.model_args
        )
        d = self.density
        if d.num_local_per_entity and d.num_local_entities != len(self.entity_ids):
            raise ConfigurationError(
                f"shard {shard_id} has {d.num_local_entities} entries of plate "
                f"{self.partition.plate!r} but its data source gave "
                f"{len(self.entity_ids)} entity ids; the source must be partitioned "
                "along the split plate."
            )
        return dict(
            num_global=d.num_global,
            num_local_entities=d.num_local_entities,
            num_local_per_entity=d.num_local_per_entity,
            entity_ids=self.entity_ids,
            global_sites=[(s.name, s.unconstrained_shape) for s in d.global_sites],
        )

    def num_rows(self) -> int:
        """Rows of data this shard holds (the length of its longest argument)."""
        self._check()
        lengths = [np.shape(v)[0] for v in self.kwargs.values() if np.ndim(v) >= 1]
        return int(max(lengths, default=0))

    def memory_usage(self) -> dict:
        """``{"data_bytes", "peak_rss_bytes"}`` of this worker (its shard's arrays,
        and the process's peak resident memory, Linux/macOS only)."""
        import resource
        import sys

        self._check()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if sys.platform == "darwin" else rss * 1024
        data = sum(np.asarray(v).nbytes for v in self.kwargs.values() if np.ndim(v))
        return dict(data_bytes=int(data), peak_rss_bytes=int(rss))

    def _check(self):
        if self.density is None:
            raise ShardError("?", "setup(shard_id) was not called on this worker")

    # ------------------------------------------------------------- objective
    @_in_precision
    def value_and_grad(self, global_flat, local_mat):
        """Negative shard log joint and gradient: ``(float, (G,), (P_s, k))``."""
        self._check()
        d = self.density
        g = jnp.asarray(global_flat, dtype=jnp.result_type(float))
        lm = jnp.asarray(local_mat, dtype=g.dtype)
        value, gg, gl = d.value_and_grad(g, lm)
        return float(value), np.asarray(gg), np.asarray(gl)

    # -------------------------------------------------------------- Laplace
    @_in_precision
    def laplace_factor(
        self,
        global_flat,
        local_mat,
        batch_size: int = 16,
        damping: float = 0.0,
        reuse: bool = False,
    ):
        """This shard's part of the Schur complement of the Hessian at the mode.

        With ``H_ll`` block diagonal (blocks ``B_i``, ``(k, k)``) and ``C_i =
        H_{l_i g}`` (``(k, G)``), returns ``H_gg^s - sum_i C_i^T B_i^{-1} C_i``
        ``(G, G)``, ``sum_i log det B_i``, the number of blocks that are not
        positive definite and the number of Hessian-vector products used; keeps
        ``B_i^{-1}`` and ``C_i`` here.

        ``damping`` adds ``damping * I`` to the local blocks and
        ``damping / num_shards * I`` to ``H_gg`` (Levenberg). With ``reuse``, the
        Hessian of the previous call is factored again (with another damping)
        instead of being recomputed; 0 Hessian-vector products are reported.
        """
        self._check()
        d = self.density
        g = jnp.asarray(global_flat, dtype=jnp.result_type(float))
        lm = jnp.asarray(local_mat, dtype=g.dtype)
        cached = getattr(self, "_hessian", None)
        if reuse and cached is not None:
            hgg, hlg, blocks = cached
            num_hvp = 0
        else:
            hgg, hlg = d.global_hessian_columns(g, lm, batch_size=batch_size)
            num_hvp = d.last_num_hvp + d.num_local_per_entity
            blocks = None
            if d.num_local_per_entity:
                blocks = d.local_hessian_blocks(g, lm)
                blocks = 0.5 * (blocks + jnp.swapaxes(blocks, -1, -2))
            self._hessian = (hgg, hlg, blocks)
        if damping:
            hgg = hgg + (damping / len(self.specs)) * jnp.eye(
                hgg.shape[0], dtype=hgg.dtype
            )
        if d.num_local_per_entity == 0:
            self._laplace = None
            return np.asarray(hgg), 0.0, 0, num_hvp
        if damping:
            blocks = blocks + damping * jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
        chol = jnp.linalg.cholesky(blocks)
        not_pd = int(jnp.sum(~jnp.all(jnp.isfinite(chol), axis=(-1, -2))))
        binv = jnp.linalg.inv(blocks)
        schur = hgg - jnp.einsum("pkg,pkj,pjh->gh", hlg, binv, hlg)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
        self._laplace = (binv, jnp.linalg.cholesky(binv), hlg)
        return np.asarray(schur), float(logdet), not_pd, num_hvp

    @_in_precision
    def newton_reduce(self, grad_local):
        """``sum_i C_i^T B_i^{-1} grad_i`` ``(G,)`` for the Newton step's globals."""
        if self._laplace is None:
            return 0.0
        binv, _, hlg = self._laplace
        gl = jnp.asarray(grad_local, dtype=binv.dtype)
        return np.asarray(jnp.einsum("pkg,pkj,pj->g", hlg, binv, gl))

    @_in_precision
    def newton_local_step(self, grad_local, delta_global):
        """``dl_i = -B_i^{-1} (grad_i + C_i dg)`` ``(P_s, k)``: the locals' Newton step."""
        if self._laplace is None:
            return np.zeros((self.density.num_local_entities, 0))
        binv, _, hlg = self._laplace
        gl = jnp.asarray(grad_local, dtype=binv.dtype)
        dg = jnp.asarray(delta_global, dtype=binv.dtype)
        rhs = gl + jnp.einsum("pkg,g->pk", hlg, dg)
        return np.asarray(-jnp.einsum("pkj,pj->pk", binv, rhs))

    @_in_precision
    def laplace_draw_locals(self, local_mat, delta_global, rng_key):
        """Draws of the local block given draws of the globals around the mode.

        ``l_i = l_i* - B_i^{-1} C_i dg + chol(B_i^{-1}) z_i``, with ``z_i`` drawn from
        ``fold_in(rng_key, global entity id)``: the same draws whatever the shards.

        Returns:
            ``(num_draws, P_s, k)`` unconstrained local draws.
        """
        self._check()
        if self._laplace is None:
            return np.zeros((len(delta_global), self.density.num_local_entities, 0))
        binv, chol, hlg = self._laplace
        dg = jnp.asarray(delta_global, dtype=binv.dtype)
        num_draws, k = dg.shape[0], binv.shape[-1]
        ids = jnp.asarray(self.entity_ids)
        z = jax.vmap(
            lambda i: jax.random.normal(jax.random.fold_in(rng_key, i), (num_draws, k))
        )(ids)
        z = z.astype(binv.dtype)  # (P_s, D, k)
        shift = jnp.einsum("pkj,pjg,dg->dpk", binv, hlg, dg)
        noise = jnp.einsum("pkj,pdj->dpk", chol, z)
        return np.asarray(jnp.asarray(local_mat)[None] - shift + noise)

    # ------------------------------------------------------------ constrained
    @_in_precision
    def constrained_values(self, global_draws, local_draws):
        """Constrained latent and deterministic sites for a batch of draws.

        Args:
            global_draws: ``(D, G)`` unconstrained globals.
            local_draws: ``(D, P_s, k)`` unconstrained locals of this shard.

        Returns:
            ``(values, local_axes)``: site -> ``(D, *shape)`` and, for sites of the
            split plate, the entity axis of the site value (without the draw axis).
            Sites of the observation plate alone are left out.
        """
        self._check()
        d = self.density
        arrays = {k: jnp.asarray(v) for k, v in d._arrays.items()}
        static = d._static
        plate = self.partition.plate if self.partition is not None else None
        obs_plate = self.partition.obs_plate if self.partition is not None else None

        def one(g, lm):
            params = d.constrain(d.unflatten(g, lm))
            tr = handlers.trace(
                handlers.substitute(handlers.seed(self.model, 0), params)
            ).get_trace(*self.model_args, **arrays, **static)
            return {
                name: site["value"]
                for name, site in tr.items()
                if (site["type"] == "deterministic") or (name in d.sites)
            }

        g = jnp.asarray(global_draws, dtype=jnp.result_type(float))
        lm = jnp.asarray(local_draws, dtype=g.dtype)
        values = jax.jit(jax.vmap(one))(g, lm)
        # Which sites follow the split plate (and on which axis), from one trace.
        tr = handlers.trace(
            handlers.substitute(
                handlers.seed(self.model, 0), d.constrain(d.unflatten(g[0], lm[0]))
            )
        ).get_trace(*self.model_args, **arrays, **static)
        out, axes = {}, {}
        for name, value in values.items():
            frames = tr[name].get("cond_indep_stack", ())
            names = {f.name for f in frames}
            if name in d.sites and d.sites[name].is_local:
                axes[name] = d.sites[name].constrained_entity_axis
            elif plate in names:
                frame = next(f for f in frames if f.name == plate)
                axes[name] = np.ndim(value) - 1 + frame.dim
            elif obs_plate is not None and obs_plate in names:
                continue
            elif (
                self.partition is not None
                and tr[name]["type"] == "deterministic"
                and d.num_local_entities
                and np.shape(value)[1:2] == (d.num_local_entities,)
                and self.partition.plate != obs_plate
            ):
                # A deterministic of the split plate, outside the plate context.
                axes[name] = 0
            out[name] = np.asarray(value)
        return out, axes


class ShardedObjective:
    """The negative log joint of a model, summed over shard workers (exact).

    Args:
        model: a NumPyro model.
        model_kwargs: its keyword arguments (NumPy arrays and scalars), or ``None``
            when ``source`` reads the data on the workers.
        partition: the split (see :func:`raybayes.plan`).
        num_shards: S; one worker per shard.
        backend: ``"local"``, ``"ray"`` or a :class:`~raybayes.backends.Backend`.
        source: a :class:`~raybayes.datasets.parquet.ParquetShards` (data read on
            the workers, never on the driver).
        model_args: positional model arguments.
        x64: workers compute in float64 (default; a JAX context, nothing global
            changes) or float32.

    Attributes:
        num_global: G, the number of global (unconstrained) parameters.
        local_shapes: ``(P_s, k)`` of each shard's local matrix.
        size: length of the driver vector ``x``.

    Raises:
        ConfigurationError: no data, or more shards than plate entries.

    Example:
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
        self.backend = get_backend(backend)
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
        futures = [
            self.pool.submit(s, "setup", s, tag=s) for s in range(self.num_shards)
        ]
        self.shard_info = [self._result(f) for f in futures]
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

    def _result(self, future):
        self.pool.wait([future])
        return self.pool.result(future)

    def _gather(self, method, per_shard_args):
        futures = [
            self.pool.submit(s, method, *per_shard_args(s), tag=s)
            for s in range(self.num_shards)
        ]
        return [self._result(f) for f in futures]

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
        """The driver vector from globals and per-shard local matrices."""
        parts = [np.ravel(global_flat)] + [np.ravel(lm) for lm in locals_]
        return np.concatenate(parts).astype(np.float64)

    # ---------------------------------------------------------------- objective
    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Negative log joint (unconstrained space) and its gradient, ``float64``.

        Each shard computes its term in parallel; the driver adds them.
        """
        g, locals_ = self.split(x)
        g32 = np.asarray(g)
        results = self._gather("value_and_grad", lambda s: (g32, locals_[s]))
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
