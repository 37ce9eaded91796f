"""Execution backends: ``local`` (in-process) and ``ray`` (Ray actors)."""

from __future__ import annotations

from raybayes.backends.base import Backend, Future, WorkerPool
from raybayes.backends.local import LocalBackend
from raybayes.backends.ray import RayBackend
from raybayes.errors import ConfigurationError

__all__ = ["Backend", "Future", "WorkerPool", "LocalBackend", "RayBackend", "get_backend"]


def get_backend(
    backend: str | Backend = "ray",
    *,
    address: str | None = None,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
) -> Backend:
    """Return a backend instance from its name, or pass an instance through.

    Args:
        backend: ``"ray"``, ``"local"``, or a :class:`Backend` instance.
        address: Ray cluster address (``ray`` only).
        use_gpu: one GPU per worker (``ray`` only).
        resources_per_worker: Ray resources per worker (``ray`` only).

    Raises:
        ConfigurationError: an unknown backend name.
    """
    if isinstance(backend, Backend):
        return backend
    if backend == "local":
        if address is not None:
            raise ConfigurationError(
                "address= is only used by backend='ray'; drop it or use backend='ray'."
            )
        return LocalBackend()
    if backend == "ray":
        return RayBackend(
            address, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        )
    raise ConfigurationError(
        f"backend={backend!r} is not known; use 'ray' (default) or 'local'."
    )
