"""Ray backend: one Ray actor per worker.

With no address, it starts an embedded local Ray instance on this machine's CPUs and
stops it on :meth:`RayBackend.shutdown`; that instance serves this process only:
every Ray service binds the loopback interface, and no dashboard is served. With
``address=`` (or the ``RAY_ADDRESS`` environment variable) it connects to an
existing cluster and leaves it running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from raybayes.backends.base import Backend, Future, WorkerPool, build_worker
from raybayes.errors import (
    ClusterConnectionError,
    ConfigurationError,
    RaybayesError,
    RemoteTaskError,
    WorkerLostError,
)

__all__ = ["RayBackend"]

_log = logging.getLogger(__name__)


def _import_ray():
    import ray

    return ray


try:
    from ray import ObjectRef as _ObjectRef
except ImportError:  # pragma: no cover - ray is a dependency
    _ObjectRef = ()


class _ActorHost:
    """The body of each Ray actor: builds the worker object and dispatches calls."""

    def __init__(self, worker_index, factory, *factory_args):
        # Top-level ObjectRefs in factory_args arrive resolved (Ray's contract).
        self._worker_index = worker_index
        self._factory = factory
        self._factory_args = factory_args
        self._object = None

    def call(self, method, args, kwargs):
        try:
            # Values placed with Backend.put arrive as ObjectRefs inside the tuple.
            if any(isinstance(a, _ObjectRef) for a in args):
                import ray

                args = [ray.get(a) if isinstance(a, _ObjectRef) else a for a in args]
            if self._object is None:
                self._object = build_worker(self._factory, self._factory_args, self._worker_index)
            return getattr(self._object, method)(*args, **kwargs)
        except RaybayesError:
            raise
        except Exception as err:  # noqa: BLE001 - surfaced as RemoteTaskError
            raise RemoteTaskError(
                f"on {socket.gethostname()} (pid {os.getpid()})",
                repr(err),
                traceback.format_exc(),
            ) from None

    def ping(self):
        return os.getpid()


class _RayFuture(Future):
    def __init__(self, worker_index, tag, ref, generation):
        self.worker_index = worker_index
        self.tag = tag
        self.ref = ref
        self.generation = generation


class RayWorkerPool(WorkerPool):
    """Workers as Ray actors, spread over the cluster's nodes.

    Every new actor (at start and after :meth:`restart`) is pinged once. An actor
    that has not answered after ``placement_timeout_s / 10`` (at most 60 s) gets a
    warning that names the resources it asks for and what the cluster has free; one
    that has not answered after ``placement_timeout_s`` counts as lost: its calls
    raise :class:`~raybayes.errors.WorkerLostError`, so the schedulers replace it or
    give up with a clear error instead of waiting forever for a node that never comes
    (a lost node whose resources no other node has, say).
    """

    #: Seconds between placement checks (at most; a tenth of the timeout if less)
    #: while a call waits on an actor that has not answered yet.
    CHECK_INTERVAL_S = 2.0

    def __init__(self, factory, factory_args, num_workers, actor_options, name,
                 placement_timeout_s=600.0):
        ray = _import_ray()
        self._ray = ray
        self._factory = factory
        self._factory_args = factory_args
        self._options = actor_options
        self._name = name
        self.size = num_workers
        self.placement_timeout_s = placement_timeout_s
        self._remote_cls = ray.remote(_ActorHost)
        self._generation = [0] * num_workers
        self._unready: dict[int, tuple[Any, float, bool]] = {}
        self._unplaced: dict[int, str] = {}
        self._actors = [self._new_actor(i) for i in range(num_workers)]

    def _new_actor(self, i):
        actor = self._remote_cls.options(**self._options).remote(
            i, self._factory, *self._factory_args
        )
        self._unready[i] = (actor.ping.remote(), time.monotonic(), False)
        self._unplaced.pop(i, None)
        return actor

    def _resources_text(self) -> str:
        opts = self._options
        asked = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0),
                 **opts.get("resources", {})}
        asked = {k: v for k, v in asked.items() if v}
        try:
            free = self._ray.available_resources()
        except Exception:  # noqa: BLE001 - only for the message
            free = {}
        free_text = ", ".join(f"{k}={free.get(k, 0):g}" for k in asked) or "unknown"
        return f"each worker asks for {asked}; the cluster has {free_text} free"

    def _check_placement(self) -> set[int]:
        """Forget actors that answered; warn about, then give up on, slow ones.

        Returns:
            The workers whose placement timed out.
        """
        now = time.monotonic()
        for i, (ref, t0, warned) in list(self._unready.items()):
            ready, _ = self._ray.wait([ref], num_returns=1, timeout=0)
            if ready:
                del self._unready[i]
                continue
            waited = now - t0
            if waited >= self.placement_timeout_s:
                del self._unready[i]
                self._unplaced[i] = (
                    f"Ray could not start it in {waited:.0f} s (placement_timeout_s="
                    f"{self.placement_timeout_s:g}): {self._resources_text()}. Add "
                    "a node with those resources, ask for fewer workers or fewer "
                    "resources per worker, or raise "
                    "RayBackend(placement_timeout_s=...)."
                )
            elif not warned and waited >= min(60.0, self.placement_timeout_s / 10):
                self._unready[i] = (ref, t0, True)
                _log.warning(
                    "%s %d has waited %.0f s for Ray to start it: %s. It counts as "
                    "lost after placement_timeout_s=%g s.", self._name, i, waited,
                    self._resources_text(), self.placement_timeout_s,
                )
        return set(self._unplaced)

    def _check_interval(self) -> float:
        return min(self.CHECK_INTERVAL_S, self.placement_timeout_s / 10)

    def _failed(self, futures) -> list[Future]:
        return [
            f for f in futures
            if f.worker_index in self._unplaced
            and f.generation == self._generation[f.worker_index]
        ]

    def submit(self, worker_index, method, *args, tag=None, **kwargs):
        ref = self._actors[worker_index].call.remote(method, args, kwargs)
        return _RayFuture(worker_index, tag, ref, self._generation[worker_index])

    def wait(self, futures: Sequence[Future], timeout_s=None):
        if not futures:
            return []
        refs = [f.ref for f in futures]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            failed = self._failed(futures)
            if failed:
                return failed
            step = self._check_interval() if self._unready else None
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                step = left if step is None else min(step, left)
            done, _ = self._ray.wait(refs, num_returns=1, timeout=step)
            if done:
                # Collect everything already finished, not just the first one.
                done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
                done_set = set(done)
                return [f for f in futures if f.ref in done_set]
            self._check_placement()
            if deadline is not None and time.monotonic() >= deadline:
                return self._failed(futures)

    def result(self, future):
        ray = self._ray
        i = future.worker_index
        current = future.generation == self._generation[i]
        if current and i in self._unready:
            self.wait([future])  # returns once it is done, or its worker is unplaced
        if self._failed([future]):
            raise WorkerLostError(i, self._unplaced[i])
        try:
            value = ray.get(future.ref)
            if current:
                self._unready.pop(i, None)  # it answered: it is placed
            return value
        except ray.exceptions.RayActorError as err:
            # ActorDiedError, and ActorUnavailableError (the call failed and Ray
            # cannot tell whether the actor lives): restart() kills it either way.
            raise WorkerLostError(future.worker_index, str(err).splitlines()[0]) from None
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, RaybayesError):
                raise cause from None
            raise RemoteTaskError(
                f"worker {future.worker_index}", repr(cause), str(err)
            ) from None
        except (ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError) as err:
            raise WorkerLostError(future.worker_index, type(err).__name__) from None

    def restart(self, worker_index):
        try:
            self._ray.kill(self._actors[worker_index], no_restart=True)
        except Exception:  # noqa: BLE001 - the actor may already be gone
            pass
        self._actors[worker_index] = self._new_actor(worker_index)
        self._generation[worker_index] += 1

    def kill(self, worker_index):
        self._ray.kill(self._actors[worker_index], no_restart=True)

    def shutdown(self):
        for actor in self._actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors = []
        self._unready.clear()


def _ship_by_value(objects) -> None:
    """Pickle user code by value, so workers need not import the user's modules.

    Functions defined in scripts, notebooks, test files or local modules (a model,
    say) cannot be imported on the workers of a cluster. Their modules are
    registered with Ray's cloudpickle to travel by value. Installed packages are
    left alone: workers import those.
    """
    import sys

    from ray import cloudpickle

    for obj in objects:
        if not callable(obj):
            continue
        name = getattr(obj, "__module__", None) or ""
        module = sys.modules.get(name)
        if module is None or name == "__main__":
            continue
        top = name.split(".")[0]
        path = getattr(module, "__file__", "") or ""
        if top in ("raybayes", "numpyro", "jax", "ray") or "-packages" in path:
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except (ValueError, TypeError):  # builtins and the like
            pass


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, naming the address and the timeout, unless a Ray cluster answers.

    Ray's GCS (and the Ray client server) speak gRPC over HTTP/2: after a client's
    connection preface the server sends its SETTINGS frame at once, before any
    authentication. A port where nothing listens, or where something that is not
    HTTP/2 listens (it stays silent or answers otherwise), fails here within
    ``timeout_s`` instead of hanging in ``ray.init``.
    """
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(
            f"address={address!r} is not of the form 'host:port' or 'ray://host:port'. "
            "Pass the address printed by `ray start --head`, e.g. '10.0.0.1:6379'."
        )
    deadline = time.monotonic() + timeout_s
    header = b""
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout_s)
    except OSError as err:
        raise ClusterConnectionError(
            f"Could not reach a Ray cluster at {address!r} within {timeout_s:g} s "
            f"({err}). Check that `ray start --head` runs there and that the port is "
            "open, or drop address= (and unset RAY_ADDRESS) to use an embedded local "
            "Ray instance."
        ) from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS cluster expects a TLS handshake first: TCP must do here
        try:
            conn.sendall(_HTTP2_PREFACE + _HTTP2_EMPTY_SETTINGS)
            while len(header) < 9:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
        except OSError:  # timed out, or reset by a server that is not HTTP/2
            pass
    if len(header) < 9 or header[3] != 0x04:  # frame type 4: SETTINGS
        answer = f"it answered {header!r}" if header else "no answer"
        raise ClusterConnectionError(
            f"{address!r} accepts connections but is not a Ray cluster: it did not "
            f"answer as Ray's gRPC server does within {timeout_s:g} s ({answer}). "
            "Pass the address printed by `ray start --head` (the GCS port, 6379 by "
            "default), or 'ray://host:10001' for a Ray client server."
        )


def _connection_help() -> str:
    """What to check when a cluster that answered refuses this client.

    Ray's GCS answers any client at the transport level and rejects one without
    the cluster's token only inside its RPCs, which ``ray.init`` reports as a bare
    "Failed to connect"; token authentication is the usual cause.
    """
    fix = (
        "set RAY_AUTH_MODE=token and give this process the cluster's token, either "
        "as RAY_AUTH_TOKEN=<token> or as the token file (~/.ray/auth_token, or the "
        "file named by RAY_AUTH_TOKEN_PATH); `ray get-auth-token` prints it on the "
        "head node."
    )
    mode = os.environ.get("RAY_AUTH_MODE")
    if (mode or "").lower() != "token":
        return (
            "The cluster answered but refused this client. Ray clusters use token "
            "authentication by default, and this process runs with RAY_AUTH_MODE="
            f"{mode or '(unset)'}: {fix}"
        )
    return (
        "The cluster answered but refused this client. Check its token "
        f"authentication: {fix[0].upper()}{fix[1:]}"
    )


@contextlib.contextmanager
def _quiet_fork_warning():
    """Silence JAX's fork warning while Ray starts its processes.

    Ray starts every process (GCS, raylet, log monitor, ...) with
    ``subprocess.Popen(preexec_fn=...)``, and CPython runs the ``os.register_at_fork``
    hooks before such a fork; once JAX has created its thread pools (the model was
    traced), its hook warns that forking a multithreaded process may deadlock. The
    child here does not continue the parent's program: it only blocks SIGINT, sets
    its parent-death signal and ``exec``s a Ray binary, so the warning does not
    apply. Workers are started by the raylet, never forked from this process.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning
        )
        yield


@contextlib.contextmanager
def _loopback_only(ray):
    """Start Ray as it starts on a laptop: every service on the loopback interface.

    With ``ENABLE_RAY_CLUSTER`` off (what ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    sets at import), Ray keeps the node address "127.0.0.1" instead of replacing
    it by this host's network address, and its servers (GCS, raylet, object
    manager, workers, agents and their metrics export) bind to loopback only.
    """
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is None or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    old = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = old


class RayBackend(Backend):
    """Run workers as Ray actors.

    Args:
        address: a Ray cluster address (``"host:port"``, ``"ray://host:10001"`` or
            ``"auto"``). ``None`` reads ``RAY_ADDRESS``; if that is unset too, an
            embedded local Ray instance is started.
        num_cpus: CPUs of the embedded instance (default: all of this machine's).
        resources_per_worker: Ray resources of each worker actor, e.g.
            ``{"CPU": 1, "GPU": 1}``. Default ``{"CPU": 1}``, plus one GPU with
            ``use_gpu=True``.
        use_gpu: give each worker one GPU and let JAX use it.
        connect_timeout_s: how long to wait, in seconds, for a Ray cluster to answer
            at ``address`` (nothing listening, or something that is not Ray, fails
            within it).
        placement_timeout_s: how long, in seconds, a new or replaced worker may wait
            for Ray to place and start it (for an autoscaler to bring up a node, say)
            before it counts as lost. A warning comes after a tenth of it (at most
            60 s), naming the resources asked for and those free.

    Raises:
        ClusterConnectionError: nothing, or nothing Ray, answers at ``address`` in
            time; or the cluster refuses this client (token authentication: the
            message names ``RAY_AUTH_MODE=token`` and where the token goes).
        ConfigurationError: a malformed address or resource request.

    Examples:
        >>> RayBackend(num_cpus=1).name
        'ray'
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        resources_per_worker: dict[str, float] | None = None,
        use_gpu: bool = False,
        connect_timeout_s: float = 10.0,
        placement_timeout_s: float = 600.0,
    ):
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self.use_gpu = use_gpu
        res = dict(resources_per_worker or {"CPU": 1})
        if use_gpu:
            res.setdefault("GPU", 1)
        for key, value in res.items():
            if value < 0:
                raise ConfigurationError(
                    f"resources_per_worker[{key!r}]={value} is negative; use >= 0."
                )
        self.resources_per_worker = res
        self.connect_timeout_s = connect_timeout_s
        if not placement_timeout_s > 0:
            raise ConfigurationError(
                f"placement_timeout_s={placement_timeout_s!r} must be a positive number of "
                "seconds, e.g. 600."
            )
        self.placement_timeout_s = float(placement_timeout_s)
        self._started_here = False
        self._pools: list[RayWorkerPool] = []

    def start(self):
        ray = _import_ray()
        if ray.is_initialized():
            return self
        kwargs: dict[str, Any] = dict(
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        loopback = contextlib.nullcontext()
        if self.address:
            _check_reachable(self.address, self.connect_timeout_s)
            kwargs["address"] = self.address
        else:
            # "local": always a new embedded instance. Without it ray.init joins a
            # cluster that `ray start` left running on this machine (and refuses
            # num_cpus there). It serves this process only: loopback, no dashboard.
            kwargs["address"] = "local"
            kwargs["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            kwargs["_node_ip_address"] = "127.0.0.1"
            loopback = _loopback_only(ray)
        try:
            with loopback, _quiet_fork_warning():
                ray.init(**kwargs)
        except (ConnectionError, RuntimeError) as err:
            if not self.address:
                raise
            ray.shutdown()
            raise ClusterConnectionError(
                f"Could not connect to the Ray cluster at {self.address!r}: {err}. "
                + _connection_help()
            ) from None
        self._started_here = True
        return self

    def shutdown(self):
        for pool in self._pools:
            pool.shutdown()
        self._pools = []
        if self._started_here:
            _import_ray().shutdown()
            self._started_here = False

    def put(self, value):
        return _import_ray().put(value)

    def default_num_workers(self):
        ray = _import_ray()
        resources = ray.cluster_resources()
        counts = [
            int(resources.get(k, 0) // v)
            for k, v in self.resources_per_worker.items()
            if v > 0
        ]
        return max(1, min(counts) if counts else 1)

    def _actor_options(self):
        res = dict(self.resources_per_worker)
        env = {}
        import jax

        if jax.config.jax_enable_x64:
            env["JAX_ENABLE_X64"] = "1"
        if not res.get("GPU"):
            env["JAX_PLATFORMS"] = "cpu"
        options: dict[str, Any] = dict(
            num_cpus=res.pop("CPU", 1),
            num_gpus=res.pop("GPU", 0),
            # Ray never restarts a lost worker behind the scheduler's back: the
            # scheduler replaces it and counts it (worker_restarts).
            max_restarts=0,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": env},
        )
        if res:
            options["resources"] = res
        return options

    def create_pool(self, factory: Callable[..., Any], factory_args=(), *, num_workers, name="worker"):
        self.start()
        _ship_by_value(factory_args)
        pool = RayWorkerPool(
            factory, tuple(factory_args), num_workers, self._actor_options(), name,
            placement_timeout_s=self.placement_timeout_s,
        )
        self._pools.append(pool)
        return pool
