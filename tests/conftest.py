"""Suite-wide fixtures: offline hub, pinned CPU threads, and a guard that fails any test touching the network."""

from __future__ import annotations

import os

# Set before torch / transformers / diffusers are imported by any test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["INSIGHTFACE_HOME"] = os.environ.get("INSIGHTFACE_HOME", "/nonexistent-insightface-home")

import socket

import pytest
import torch

torch.set_num_threads(1)


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to open a network connection."""


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) and address else ""
    return str(host) in _LOCAL_HOSTS


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail the test on any non-loopback connect or DNS lookup."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_connect(self, address):
        if not _is_local(address):
            raise NetworkAccessError(f"test tried to connect to {address!r}; tests must run offline")
        return real_connect(self, address)

    def guarded_connect_ex(self, address):
        if not _is_local(address):
            raise NetworkAccessError(f"test tried to connect to {address!r}; tests must run offline")
        return real_connect_ex(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL_HOSTS and host is not None:
            raise NetworkAccessError(f"test tried to resolve {host!r}; tests must run offline")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A folder of tiny random-weight components in their own libraries' formats (built once)."""
    from idforge.models.zoo import build_tiny

    folder = tmp_path_factory.mktemp("tiny_zoo")
    build_tiny(folder)
    return folder
