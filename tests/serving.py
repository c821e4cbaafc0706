"""An executor of its own for a test module: a tiny engine and its gRPC server on loopback."""

from __future__ import annotations

import contextlib

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.server import serve
from swapmoe.rpc import transport


def own_engine(model_dir, node_id: str) -> Engine:
    """A context manager: an engine with a 1 GiB budget (everything resident)."""
    return Engine(EngineConfig(model_dir, budget_bytes=1 << 30, node_id=node_id))


@contextlib.contextmanager
def serving(engine: Engine):
    """A channel to ``engine`` served on a free loopback port; the server stops after."""
    server = serve(engine)
    try:
        with transport.channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        server.stop(grace=1)
