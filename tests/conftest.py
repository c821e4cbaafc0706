"""Session-wide fixtures: tiny real checkpoints on disk, and an engine serving one."""

from __future__ import annotations

import os
import socket

import pytest

from swapmoe.models.tiny import save_tiny_model


@pytest.fixture(scope="session", autouse=True)
def store_root(tmp_path_factory):
    """Expert stores built during the tests (also by executor processes they start) go here."""
    root = tmp_path_factory.mktemp("stores")
    os.environ["SWAPMOE_STORE_ROOT"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Mixtral saved with save_pretrained (model + tokenizer)."""
    return save_tiny_model("mixtral", tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    """Builds tiny checkpoints of any supported architecture on demand, once each."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from swapmoe.executor.engine import Engine, EngineConfig

    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="test-node")) as engine:
        yield engine


@pytest.fixture(scope="session")
def owner(tiny_model_dir, tmp_path_factory):
    """The executor that owns node id ``owner``; it keeps its node secret in its state directory."""
    from swapmoe.executor.engine import Engine, EngineConfig

    config = EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="owner",
                          state_dir=tmp_path_factory.mktemp("owner-state"))
    with Engine(config) as engine:
        yield engine


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (about 4 s to start): 2 CPUs, no dashboard."""
    ray = pytest.importorskip("ray")
    from swapmoe.profiler.accuracy import start_ray

    start_ray(cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def taken_port():
    """A loopback port another server holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]
