"""A GLM's negative log likelihood summed over shard workers.

The rows of ``(X, y)`` are split into contiguous blocks, one per worker. Each block is
put into the backend's object store once and handed to its own worker, which keeps it
for the whole fit (a :class:`~raybayes.glm.families.GLMShard`). Each evaluation
sends the coefficient vector (``(d + 1)`` floats) to every worker and brings back
the loss, gradient and, for Newton's method, the ``(d + 1) x (d + 1)`` Hessian of its
rows, which the driver adds up. Only the backend interface is used here; no Ray code.
"""

from __future__ import annotations

import time

import numpy as np

from raybayes.backends import Backend
from raybayes.errors import (
    ConfigurationError,
    RemoteTaskError,
    ShardError,
    WorkerLostError,
)
from raybayes.glm.families import GLMShard, ShardTerms

__all__ = ["ShardedGLMData", "ShardedGLMObjective", "shard_bounds"]


def shard_bounds(num_rows: int, num_shards: int) -> np.ndarray:
    """Row boundaries of ``num_shards`` contiguous, nearly equal blocks.

    Returns:
        Integer array of shape ``(num_shards + 1,)``; shard ``s`` holds rows
        ``bounds[s]:bounds[s + 1]``.

    Raises:
        ConfigurationError: ``num_shards < 1`` or more shards than rows.

    Examples:
        >>> shard_bounds(10, 3).tolist()
        [0, 3, 6, 10]
    """
    if int(num_shards) != num_shards or num_shards < 1:
        raise ConfigurationError(
            f"num_workers={num_shards!r}; use a positive integer (or None for one "
            "worker per CPU of the backend)."
        )
    if num_shards > num_rows:
        raise ConfigurationError(
            f"num_workers={num_shards} is more than the {num_rows} rows of X: every "
            f"shard needs at least one row. Use num_workers <= {num_rows}."
        )
    return np.array([(s * num_rows) // num_shards for s in range(num_shards + 1)])


class ShardedGLMObjective:
    """Sum of shard losses, gradients and Hessians over a pool of workers.

    Args:
        X: features, shape ``(n, d)``, float32 or float64; float32 stays float32.
        y: targets, shape ``(n,)``, converted to the dtype of ``X``.
        family: ``"logistic"`` or ``"poisson"``.
        backend: a started :class:`~raybayes.backends.Backend`.
        num_shards: number of row blocks, one worker each.

    Raises:
        ConfigurationError: more shards than rows.
        ShardError: a worker failed to build its shard (with its traceback).

    Examples:
        >>> from raybayes.backends import get_backend
        >>> X = np.arange(8.0).reshape(4, 2); y = np.array([0, 1, 0, 1])
        >>> with ShardedGLMObjective(X, y, "logistic", get_backend("local"), 2) as obj:
        ...     round(obj.evaluate(np.zeros(3)).loss, 4)  # 4 * log(2)
        2.7726
    """

    def __init__(self, X, y, family, backend: Backend, num_shards):
        self.num_rows = int(X.shape[0])
        self.num_features = int(X.shape[1])
        self.bounds = shard_bounds(self.num_rows, num_shards)
        self.num_shards = int(num_shards)
        self.family = family
        self.dtype = X.dtype
        y = np.asarray(y, dtype=X.dtype)
        self._pools = []
        try:
            for s in range(self.num_shards):
                a, b = self.bounds[s], self.bounds[s + 1]
                x_ref = backend.put(np.ascontiguousarray(X[a:b]))
                y_ref = backend.put(np.ascontiguousarray(y[a:b]))
                self._pools.append(
                    backend.create_pool(
                        GLMShard,
                        (x_ref, y_ref, family),
                        num_workers=1,
                        name=f"glm-shard-{s}",
                    )
                )
            self._call("ping")
        except BaseException:
            self.close()
            raise
        self.num_passes = 0

    def _call(self, method, *args):
        """Call ``method`` on every shard worker at once; results in shard order."""
        futures = [
            pool.submit(0, method, *args, tag=s) for s, pool in enumerate(self._pools)
        ]
        out = []
        for s, (pool, fut) in enumerate(zip(self._pools, futures, strict=True)):
            try:
                out.append(self._result(s, pool, fut))
            except WorkerLostError:
                # The evaluation is a pure function of (shard, coef): rebuild the
                # worker from the object store and ask again, once.
                pool.restart(0)
                out.append(self._result(s, pool, pool.submit(0, method, *args, tag=s)))
        return out

    @staticmethod
    def _result(s, pool, fut):
        while not pool.wait([fut]):
            pass
        try:
            return pool.result(fut)
        except ShardError:
            raise
        except RemoteTaskError as err:
            raise ShardError(s, err.message, err.remote_traceback) from None

    def evaluate(
        self, coef, need_grad=True, need_hess=False, fit_intercept=True
    ) -> ShardTerms:
        """Loss (and gradient, Hessian) summed over all shards.

        Args:
            coef: shape ``(d + 1,)``, intercept last.
            need_grad: also return the gradient.
            need_hess: also return the Hessian (implies the gradient).
            fit_intercept: whether ``coef[-1]`` is an intercept (else ignored).

        Returns:
            :class:`~raybayes.glm.families.ShardTerms` over all ``n`` rows.
        """
        coef = np.asarray(coef, dtype=np.float64)
        parts = self._call("evaluate", coef, need_grad, need_hess, fit_intercept)
        self.num_passes += 1
        loss = float(sum(p.loss for p in parts))
        grad = sum(p.grad for p in parts) if parts[0].grad is not None else None
        hess = sum(p.hess for p in parts) if parts[0].hess is not None else None
        return ShardTerms(loss, grad, hess, self.num_rows)

    def kill_worker(self, shard: int) -> None:
        """Kill the worker that holds shard ``shard`` (for failure tests).

        The next evaluation finds it lost, rebuilds it from the object store and
        asks again, so the result does not change.

        Args:
            shard: the shard index, ``0 <= shard < num_shards``.

        Raises:
            ConfigurationError: no such shard.
        """
        if not 0 <= shard < len(self._pools):
            raise ConfigurationError(
                f"shard={shard!r}; this objective has shards 0..{len(self._pools) - 1}."
            )
        self._pools[shard].kill(0)

    def close(self):
        """Release the workers (the backend itself stays up)."""
        for pool in self._pools:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        self._pools = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class ShardedGLMData:
    """GLM data validated, split by rows and held by shard workers, for many fits.

    Building it checks the data, starts the backend (if given by name), puts each
    row block into the object store once and starts one worker per block. Pass it
    to ``fit`` of :class:`~raybayes.glm.LogisticRegression` or
    :class:`~raybayes.glm.PoissonRegression` in place of ``(X, y)`` to fit several
    models (a path of penalties, say) without moving the data again or restarting
    workers. Close it (or use ``with``) to release the workers.

    Args:
        X: features, shape ``(n, d)``; float32 stays float32 on the workers.
        y: 0/1 labels (or two classes) for ``"logistic"``; counts for ``"poisson"``.
        family: ``"logistic"`` or ``"poisson"``.
        num_workers: shard workers; ``None``: one per CPU of the backend (one
            in-process).
        backend: ``"auto"`` (default), ``"local"``, ``"ray"`` or a
            :class:`~raybayes.backends.Backend`. ``"auto"`` is Ray only when the
            scaling arguments ask for it (``num_workers > 1``, an address,
            ``RAY_ADDRESS``, GPUs, custom resources), else in-process. A backend
            given by name is shut down by :meth:`close`.
        address: Ray cluster address, ``"host:port"`` (Ray only).
        use_gpu: one GPU per worker (Ray only).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        feature_names: names of the ``d`` columns (taken from a DataFrame's columns
            when ``None``).

    Attributes:
        objective: the :class:`ShardedGLMObjective` over the workers.
        classes: the two labels (``"logistic"``), else ``None``.
        y_mean: mean of the encoded targets.
        backend_name: ``"local"`` or ``"ray"``: where the shard workers run.
        backend_start_s, setup_s: seconds to start the backend, and to validate,
            place the data and start the workers.

    Raises:
        DataValidationError: non-finite features, bad labels or counts.
        ConfigurationError: an unknown family or backend, a bad scaling setting,
            more workers than rows.
        ClusterConnectionError: nothing answers at ``address``.

    Examples:
        >>> X = np.arange(8.0).reshape(4, 2); y = np.array([0, 1, 0, 1])
        >>> data = ShardedGLMData(X, y, "logistic", num_workers=2, backend="local")
        >>> with data:
        ...     data.objective.num_shards
        2
    """

    def __init__(
        self,
        X,
        y,
        family="logistic",
        *,
        num_workers=None,
        backend="auto",
        address=None,
        use_gpu=False,
        resources_per_worker=None,
        feature_names=None,
    ):
        from raybayes.backends import get_backend
        from raybayes.config import resolve_scaling
        from raybayes.glm.validation import (
            check_binary_labels,
            check_counts,
            check_features,
        )

        if family not in ("logistic", "poisson"):
            raise ConfigurationError(f"family={family!r}; use 'logistic' or 'poisson'.")
        scaling, _ = resolve_scaling(
            backend, num_workers, use_gpu, resources_per_worker, address
        )
        # "auto": Ray only when the scaling settings ask for it; a one-shot fit on
        # one machine runs in-process (BLAS uses the cores) and starts no workers.
        self._backend = get_backend(backend, scaling)
        self._owns_backend = not isinstance(backend, Backend)
        self.backend_name = self._backend.name
        if feature_names is None and hasattr(X, "columns"):
            feature_names = [str(c) for c in X.columns]
        self.feature_names = feature_names
        self.family = family
        t0 = time.perf_counter()
        X = check_features(X, feature_names)
        if family == "logistic":
            y, self.classes = check_binary_labels(y, X.shape[0])
        else:
            y, self.classes = check_counts(y, X.shape[0]), None
        if num_workers is not None:
            shard_bounds(X.shape[0], num_workers)  # fail before starting anything
        self.y_mean = float(np.mean(y))
        self.num_rows, self.num_features = X.shape
        t1 = time.perf_counter()
        self._backend.start()
        self.backend_start_s = time.perf_counter() - t1
        try:
            if num_workers is None:
                num_workers = min(self._backend.default_num_workers(), X.shape[0])
            self.objective = ShardedGLMObjective(
                X, y, family, self._backend, num_workers
            )
        except BaseException:
            self.close()
            raise
        self.num_workers = num_workers
        self.setup_s = time.perf_counter() - t0 - self.backend_start_s

    def close(self):
        """Release the workers, and the backend if it was started by name."""
        objective = getattr(self, "objective", None)
        if objective is not None:
            objective.close()
        if self._owns_backend:
            self._backend.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
