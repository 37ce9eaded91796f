"""The object each shard worker holds: one shard's data and log density.

A :class:`ShardWorker` is built identically on every worker of a pool (the factory
arguments are shared); :meth:`ShardWorker.setup` then selects the shard. Its methods
are thin: they turn NumPy arguments into JAX arrays, call the numerical core
(:mod:`raybayes.core.shard_density`, :mod:`raybayes.core.arrowhead`,
:mod:`raybayes.core.site_values`), keep per-shard state between calls, and return
NumPy arrays. Algorithms add their own per-shard methods by subclassing (see
:class:`~raybayes.svi.worker.SVIShardWorker`), decorating them with
:func:`worker_precision`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from raybayes.core import arrowhead
from raybayes.core.partition import shard_model_kwargs
from raybayes.core.shard_density import ShardLogDensity
from raybayes.core.site_values import constrained_site_values
from raybayes.errors import ConfigurationError, ShardError

__all__ = ["ShardWorker", "worker_precision"]


def worker_precision(method):
    """Decorate a :class:`ShardWorker` method to run in the worker's float precision.

    The method runs inside ``jax.enable_x64(self.x64)``: a context, so nothing global
    changes in the process (which is the driver's own with the local backend).
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with jax.enable_x64(self.x64):
            return method(self, *args, **kwargs)

    return wrapper


class ShardWorker:
    """One shard's data, log density and the per-shard state of the algorithms.

    Args:
        model: the NumPyro model.
        data: the full model arguments (a dict; arrays arrive from the object store
            without copies on the driver), or a
            :class:`~raybayes.datasets.parquet.ParquetShards` source.
        partition: the split (:class:`~raybayes.core.Partition`), or ``None``.
        specs: one :class:`~raybayes.core.ShardSpec` per shard (in-memory data).
        model_args: positional model arguments.
        x64: compute in float64 (default). Sums over ~10^5 rows or more lose the
            precision a line search needs in float32.

    Attributes:
        density: the shard's :class:`~raybayes.core.ShardLogDensity` (after
            :meth:`setup`).
        shard_id: the shard's index.
        entity_ids: ``(P_s,)`` global ids of the shard's entities.
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
        self._hessian = None
        self._num_flat = 0
        self._factor: arrowhead.ArrowheadFactor | None = None
        self._point = None  # (globals, locals) of the kept Hessian
        self._damping = 0.0  # the kept factor's damping of the local blocks

    # -------------------------------------------------------------- set-up
    @worker_precision
    def setup(self, shard_id: int) -> dict:
        """Load shard ``shard_id`` and describe its parameters.

        Returns:
            ``{"num_global", "num_local_entities", "num_local_per_entity",
            "entity_ids", "global_sites"}``.

        Raises:
            ConfigurationError: the data source gave a shard whose entities do not
                match its rows of the split plate.
        """
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

    def describe(self) -> dict:
        """What the driver needs of a shard whose data it does not read (a Parquet
        source): the shard's data checked for NaN/inf, its ArviZ dims, a fingerprint
        of its data (for checkpoints) and its size.

        Returns:
            ``{"site_dims", "observed_names", "fingerprint", "num_rows",
            "data_bytes"}``; ``site_dims`` as
            :func:`raybayes.results.model_site_info` gives them for this shard.

        Raises:
            DataValidationError: an observed site of this shard holds NaN or inf.
        """
        from raybayes.checkpoint import data_fingerprint
        from raybayes.core.validation import check_observed_data
        from raybayes.results import model_site_info

        self._check()
        check_observed_data(self.model, self.model_args, self.kwargs)
        site_dims, _, observed = model_site_info(
            self.model, self.model_args, self.kwargs
        )
        return dict(
            site_dims=site_dims,
            observed_names=sorted(observed),
            fingerprint=data_fingerprint(self.model, self.model_args, self.kwargs),
            num_rows=self.num_rows(),
            data_bytes=self.memory_usage()["data_bytes"],
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

    def _factored(self) -> arrowhead.ArrowheadFactor:
        if self._factor is None:
            raise ShardError(
                self.shard_id, "laplace_factor was not called on this shard"
            )
        return self._factor

    # ------------------------------------------------------------- objective
    @worker_precision
    def value_and_grad(self, global_flat, local_mat):
        """Negative shard log joint and gradient: ``(float, (G,), (P_s, k))``."""
        self._check()
        g = jnp.asarray(global_flat, dtype=jnp.result_type(float))
        lm = jnp.asarray(local_mat, dtype=g.dtype)
        value, gg, gl = self.density.value_and_grad(g, lm)
        return float(value), np.asarray(gg), np.asarray(gl)

    # -------------------------------------------------------------- Laplace
    @worker_precision
    def laplace_factor(
        self,
        global_flat,
        local_mat,
        batch_size: int = 16,
        damping: float = 0.0,
        reuse: bool = False,
    ):
        """Compute this shard's rows of the Hessian and factor them; keep the factor.

        See :func:`raybayes.core.arrowhead.factor_arrowhead`. With ``reuse``, the
        Hessian of the previous call is factored again (with another ``damping``)
        instead of being recomputed, and 0 Hessian-vector products are reported.

        Args:
            global_flat: ``(G,)`` unconstrained globals.
            local_mat: ``(P_s, k)`` unconstrained locals of this shard.
            batch_size: Hessian-vector products evaluated together.
            damping: Levenberg damping of the local blocks (``damping / S`` on
                ``H_gg``).
            reuse: factor the kept Hessian again.

        Returns:
            ``(schur (G, G), sum_i log det B_i, blocks not positive definite,
            Hessian-vector products used)``.
        """
        self._check()
        d = self.density
        g = jnp.asarray(global_flat, dtype=jnp.result_type(float))
        lm = jnp.asarray(local_mat, dtype=g.dtype)
        if reuse and self._hessian is not None:
            hgg, hlg, blocks = self._hessian
            num_hvp = 0
        else:
            hgg, hlg, blocks = d.hessian_blocks(g, lm, batch_size=batch_size)
            num_hvp = d.last_num_hvp + d.num_local_per_entity
            self._num_flat = 0
            if blocks is not None:  # coordinates the log joint does not depend on
                blocks, num_flat = arrowhead.unit_curvature_where_flat(hlg, blocks)
                self._num_flat = int(num_flat)
            self._hessian = (hgg, hlg, blocks)
            self._point = (g, lm)
        self._factor = arrowhead.factor_arrowhead(
            hgg, hlg, blocks, damping=damping, num_shards=len(self.specs)
        )
        self._damping = float(damping)
        return self._factor_summary(num_hvp)

    def _factor_summary(self, num_hvp):
        f = self._factor
        return (
            np.asarray(f.schur),
            float(f.log_det_local),
            int(f.num_not_positive_definite),
            num_hvp,
        )

    @worker_precision
    def laplace_kept_factor(self, global_flat):
        """The summary of the kept factor, as :meth:`laplace_factor` returns it, when
        it is the undamped Hessian taken at the globals ``global_flat`` ``(G,)``
        (a Laplace approximation that reuses the Hessian a Newton method built);
        ``None`` otherwise (no factor, another point, or damped local blocks).

        Returns:
            ``(schur (G, G), sum_i log det B_i, blocks not positive definite, 0)``
            or ``None``.
        """
        if self._factor is None or self._point is None or self._damping != 0.0:
            return None
        kept = np.asarray(self._point[0])
        if not np.array_equal(kept, np.asarray(global_flat, kept.dtype)):
            return None
        return self._factor_summary(0)

    @worker_precision
    def laplace_hessian_columns(self, index):
        """Columns ``index`` of the kept Hessian (of the last :meth:`laplace_factor`):
        ``(H_gg[:, index] (G, d) (this shard's term), H_lg[..., index] (P_s, k, d))``.
        """
        self._factored()
        hgg, hlg, _ = self._hessian
        index = np.asarray(index, np.int64)
        return np.asarray(hgg)[:, index], np.asarray(hlg)[..., index]

    @worker_precision
    def laplace_factor_tangent(self, dir_global, dir_local, batch_size: int = 16):
        """Derivatives along ``m`` directions ``v = (dir_global, dir_local)`` of this
        shard's Schur term and ``sum_i log det B_i`` at the point of the last
        (undamped) :meth:`laplace_factor` (see
        :func:`raybayes.core.arrowhead.factor_tangent`).

        Args:
            dir_global: ``(m, G)``.
            dir_local: ``(m, P_s, k)``.
            batch_size: Hessian-vector products evaluated together.

        Returns:
            ``(d_schur (m, G, G), d_log_det_local (m,))``.
        """
        factor = self._factored()
        g, lm = self._point
        d_gg, d_lg, d_b = self.density.hessian_tangent(
            g,
            lm,
            dir_global,
            dir_local,
            batch_size=batch_size,
        )
        # coordinates given unit curvature (unit_curvature_where_flat) have zero
        # Hessian rows at every point: their derivative is zero as computed
        out = [
            arrowhead.factor_tangent(
                factor, d_gg[i], d_lg[i], None if d_b is None else d_b[i]
            )
            for i in range(d_gg.shape[0])
        ]
        return (
            np.stack([np.asarray(o[0]) for o in out]),
            np.array([float(o[1]) for o in out]),
        )

    @worker_precision
    def laplace_factor_difference(
        self, dir_global, dir_local, step: float = 1e-4, batch_size: int = 16
    ):
        """:meth:`laplace_factor_tangent` by central differences of the Hessian
        blocks at ``x +- step v`` (the compiled Hessian only, no new compilation;
        error ``O(step^2)``). The kept Hessian and factor are not changed.

        Returns:
            ``(d_schur (m, G, G), d_log_det_local (m,))``.
        """
        self._factored()
        d = self.density
        g, lm = self._point
        dir_global = np.asarray(dir_global, np.float64)
        dir_local = np.asarray(dir_local, np.float64)
        schur, log_det = [], []
        for i in range(dir_global.shape[0]):
            terms = []
            for sign in (1.0, -1.0):
                gi = g + sign * step * jnp.asarray(dir_global[i], g.dtype)
                li = lm + sign * step * jnp.asarray(dir_local[i], g.dtype)
                hgg, hlg, blocks = d.hessian_blocks(gi, li, batch_size=batch_size)
                if blocks is not None:
                    blocks, _ = arrowhead.unit_curvature_where_flat(hlg, blocks)
                f = arrowhead.factor_arrowhead(
                    hgg, hlg, blocks, num_shards=len(self.specs)
                )
                terms.append((np.asarray(f.schur), float(f.log_det_local)))
            schur.append((terms[0][0] - terms[1][0]) / (2 * step))
            log_det.append((terms[0][1] - terms[1][1]) / (2 * step))
        return np.stack(schur), np.array(log_det)

    def num_flat_locals(self) -> int:
        """Local coordinates of this shard that the log joint does not depend on
        (given unit curvature by the last :meth:`laplace_factor`; see
        :func:`raybayes.core.arrowhead.unit_curvature_where_flat`)."""
        self._factored()
        return self._num_flat

    @worker_precision
    def newton_reduce(self, grad_local):
        """``sum_i C_i^T B_i^{-1} grad_i`` ``(G,)`` (see
        :func:`raybayes.core.arrowhead.newton_reduce`)."""
        out = arrowhead.newton_reduce(self._factored(), grad_local)
        return out if np.isscalar(out) else np.asarray(out)

    @worker_precision
    def newton_local_step(self, grad_local, delta_global):
        """``(P_s, k)`` Newton step of the locals (see
        :func:`raybayes.core.arrowhead.newton_local_step`)."""
        factor = self._factored()
        if factor.local_inverse is None:
            return np.zeros((self.density.num_local_entities, 0))
        return np.asarray(arrowhead.newton_local_step(factor, grad_local, delta_global))

    @worker_precision
    def laplace_draw_locals(self, local_mat, delta_global, rng_key):
        """``(D, P_s, k)`` draws of the locals given ``(D, G)`` draws of ``g - g*``.

        The noise of entity ``i`` is drawn from ``fold_in(rng_key, global id)``
        (:func:`raybayes.core.arrowhead.entity_noise`): the same draws whatever the
        number of shards.
        """
        self._check()
        factor = self._factored()
        num_draws = len(delta_global)
        if factor.local_inverse is None:
            return np.zeros((num_draws, self.density.num_local_entities, 0))
        k = factor.local_inverse.shape[-1]
        noise = arrowhead.entity_noise(rng_key, self.entity_ids, num_draws, k)
        return np.asarray(
            arrowhead.laplace_local_draws(factor, local_mat, delta_global, noise)
        )

    # ------------------------------------------------------------ constrained
    @worker_precision
    def constrained_values(self, global_draws, local_draws):
        """Constrained latent and deterministic sites for a batch of draws.

        See :func:`raybayes.core.site_values.constrained_site_values`: ``(D, G)``
        globals and ``(D, P_s, k)`` locals in, ``(values, local_axes)`` out.
        """
        self._check()
        return constrained_site_values(self.density, global_draws, local_draws)
