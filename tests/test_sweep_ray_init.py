"""The Ray backend starts a local Ray instance on the loopback interface only, and joins a
cluster when given its address (checked on ray.init's arguments and Ray's local-only switch:
no Ray, no network)."""

from __future__ import annotations

import os
import sys
import types

import pytest

from sweeps.backends import RAY_LOCAL_ONLY_ENV, RayBackend


@pytest.fixture
def fake_ray(monkeypatch):
    calls = []
    ray = types.SimpleNamespace(
        is_initialized=lambda: False,
        init=lambda **kw: calls.append(kw),
        cluster_resources=lambda: {"CPU": 2.0},
        remote=lambda fn: types.SimpleNamespace(options=lambda **kw: fn),
    )
    constants = types.SimpleNamespace(ENABLE_RAY_CLUSTER=True)  # what `import ray` read from the environment
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray._private.ray_constants", constants)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(RAY_LOCAL_ONLY_ENV, "unset")  # restored to the real value after the test
    monkeypatch.delenv(RAY_LOCAL_ONLY_ENV)
    return calls, constants


def test_local_ray_listens_on_localhost_only(fake_ray):
    calls, constants = fake_ray
    RayBackend()
    (kwargs,) = calls
    assert "address" not in kwargs and kwargs["dashboard_host"] == "127.0.0.1"
    assert os.environ[RAY_LOCAL_ONLY_ENV] == "0" and constants.ENABLE_RAY_CLUSTER is False


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_cluster_address_is_joined_as_given(fake_ray, monkeypatch, how):
    calls, constants = fake_ray
    if how == "environment":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
        RayBackend()
    else:
        RayBackend(address="10.0.0.5:6379")
    (kwargs,) = calls
    assert kwargs["address"] == "10.0.0.5:6379" and "dashboard_host" not in kwargs
    assert RAY_LOCAL_ONLY_ENV not in os.environ and constants.ENABLE_RAY_CLUSTER is True


def test_a_users_own_setting_of_the_switch_is_kept(fake_ray, monkeypatch):
    calls, constants = fake_ray
    monkeypatch.setenv(RAY_LOCAL_ONLY_ENV, "1")
    RayBackend()
    assert os.environ[RAY_LOCAL_ONLY_ENV] == "1" and constants.ENABLE_RAY_CLUSTER is True
