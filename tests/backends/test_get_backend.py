"""get_backend and the "auto" choice, without starting Ray."""

from __future__ import annotations

import pytest

from raybayes import ConfigurationError
from raybayes.backends import LocalBackend, RayBackend, get_backend
from raybayes.config import ScalingConfig


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize(
    ("scaling", "parallel_work", "cpus", "expected"),
    [
        (ScalingConfig(), 1, 2, LocalBackend),  # one piece of work: in-process
        (ScalingConfig(num_workers=1), 1, 2, LocalBackend),
        (ScalingConfig(), 4, 1, LocalBackend),  # one CPU: nothing to parallelize
        (ScalingConfig(), 4, 2, RayBackend),  # several chains on several CPUs
        (ScalingConfig(num_workers=2), 1, 1, RayBackend),  # asked for workers
        (ScalingConfig(address="10.0.0.1:6379"), 1, 1, RayBackend),
        (ScalingConfig(use_gpu=True), 1, 1, RayBackend),
        (ScalingConfig(resources_per_worker={"CPU": 2}), 1, 1, RayBackend),
    ],
)
def test_auto_resolution(monkeypatch, scaling, parallel_work, cpus, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    backend = get_backend("auto", scaling, parallel_work=parallel_work)
    assert type(backend) is expected
    assert (
        get_backend(scaling=scaling, parallel_work=parallel_work).name == backend.name
    )


def test_auto_follows_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    backend = get_backend("auto")
    assert isinstance(backend, RayBackend) and backend.address == "10.0.0.1:6379"


def test_scaling_settings_reach_the_ray_backend():
    scaling = ScalingConfig(
        num_workers=3, resources_per_worker={"CPU": 2, "GPU": 1}, use_gpu=True
    )
    backend = get_backend("ray", scaling)
    assert backend.resources_per_worker == {"CPU": 2, "GPU": 1}
    assert backend.use_gpu is True
    # The keyword form gives the same backend.
    same = get_backend("ray", use_gpu=True, resources_per_worker={"CPU": 2, "GPU": 1})
    assert same.resources_per_worker == backend.resources_per_worker


def test_an_instance_passes_through():
    local = LocalBackend()
    assert get_backend(local) is local


@pytest.mark.parametrize("backend", ["spark", "Ray", 3, None])
def test_unknown_backend_lists_the_allowed_values(backend):
    with pytest.raises(ConfigurationError) as info:
        get_backend(backend)
    message = str(info.value)
    assert repr(backend) in message
    for allowed in ("'auto'", "'local'", "'ray'", "Backend"):
        assert allowed in message


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(address="10.0.0.1:6379"),
        dict(use_gpu=True),
        dict(resources_per_worker={"CPU": 2}),
    ],
)
def test_ray_only_settings_with_local_are_refused(kwargs):
    (name,) = kwargs
    with pytest.raises(ConfigurationError, match=f"{name}=.*backend='ray'"):
        get_backend("local", **kwargs)


def test_scaling_and_keywords_together_are_refused():
    with pytest.raises(ConfigurationError, match="both scaling="):
        get_backend("ray", ScalingConfig(), address="10.0.0.1:6379")


def test_bad_scaling_values_are_refused():
    with pytest.raises(ConfigurationError, match="num_workers=0"):
        get_backend("auto", ScalingConfig(num_workers=0))
