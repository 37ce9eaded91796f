"""Execution backends: ``local`` (in-process) and ``ray`` (Ray actors)."""

from __future__ import annotations

from collections.abc import Mapping

from raybayes.backends.base import Backend, Future, WorkerPool
from raybayes.backends.local import LocalBackend
from raybayes.backends.ray import RayBackend
from raybayes.config import ScalingConfig, resolve_backend_name
from raybayes.errors import ConfigurationError

__all__ = [
    "Backend",
    "Future",
    "WorkerPool",
    "LocalBackend",
    "RayBackend",
    "get_backend",
]

_ALLOWED = "'auto' (default), 'local', 'ray' or a raybayes.backends.Backend instance"


def get_backend(
    backend: str | Backend = "auto",
    scaling: ScalingConfig | None = None,
    *,
    address: str | None = None,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    parallel_work: int = 1,
) -> Backend:
    """Return a backend instance from its name, or pass an instance through.

    The scaling settings come either as a :class:`~raybayes.config.ScalingConfig`
    or as the keyword arguments ``address``, ``use_gpu`` and
    ``resources_per_worker`` (not both). ``"auto"`` is resolved by
    :func:`~raybayes.config.resolve_backend_name`: Ray when the settings ask for a
    cluster (an address, ``RAY_ADDRESS``, GPUs, custom resources, more than one
    worker) or when ``parallel_work > 1`` on a machine with several CPUs; else
    in-process. The backend is not started: call ``start()`` or use ``with``.

    Args:
        backend: ``"auto"``, ``"local"``, ``"ray"``, or a :class:`Backend` instance
            (returned as it is; the scaling settings are then not used).
        scaling: the entry point's scaling configuration.
        address: Ray cluster address, ``"host:port"`` (``ray`` only).
        use_gpu: one GPU per worker (``ray`` only).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``
            (``ray`` only).
        parallel_work: how many independent pieces of work the job has (chains,
            shards); only used by ``"auto"``.

    Returns:
        A :class:`LocalBackend` or a :class:`RayBackend` (not started), or
        ``backend`` itself.

    Raises:
        ConfigurationError: an unknown backend name or type (the message lists the
            allowed values); ``scaling`` together with scaling keywords; Ray-only
            settings (``address``, ``use_gpu``, ``resources_per_worker``) with
            ``backend="local"``; an invalid scaling setting.

    Examples:
        >>> get_backend("local").name
        'local'
        >>> get_backend("auto", ScalingConfig(num_workers=1)).name
        'local'
        >>> get_backend("auto", ScalingConfig(num_workers=2)).name
        'ray'
    """
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise ConfigurationError(
            f"backend={backend!r} (a {type(backend).__name__}) is not a backend; use "
            f"{_ALLOWED}."
        )
    keywords = address is not None or use_gpu or resources_per_worker is not None
    if scaling is None:
        scaling = ScalingConfig(
            use_gpu=use_gpu,
            resources_per_worker=resources_per_worker,
            address=address,
        )
    elif keywords:
        raise ConfigurationError(
            "get_backend got both scaling= and address=/use_gpu=/resources_per_worker="
            "; put the settings in the ScalingConfig only."
        )
    if backend not in ("auto", "local", "ray"):
        raise ConfigurationError(f"backend={backend!r} is not known; use {_ALLOWED}.")
    name = resolve_backend_name(backend, scaling, parallel_work=parallel_work)
    if name == "local":
        for arg, value in (
            ("address", scaling.address),
            ("use_gpu", scaling.use_gpu or None),
            ("resources_per_worker", scaling.resources_per_worker),
        ):
            if value is not None:
                raise ConfigurationError(
                    f"{arg}={value!r} is only used by backend='ray' (in-process runs "
                    f"use the devices JAX sees); drop {arg}= or use backend='ray'."
                )
        return LocalBackend()
    return RayBackend(
        scaling.address,
        use_gpu=scaling.use_gpu,
        resources_per_worker=(
            dict(scaling.resources_per_worker)
            if scaling.resources_per_worker is not None
            else None
        ),
    )
