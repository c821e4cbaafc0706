"""Client-side routing across a real fleet on loopback: a planner, the control node and two
executors of one tiny model (in this process, each with its own gRPC server and planner link).
A Generate goes to the less loaded executor, skips one that stopped answering (and one that
dies between its health check and the call), and an unknown model is a clear NOT_FOUND."""

import io
import random

import pytest

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.server import serve as executor_serve
from swapmoe.models.tiny import save_tiny_model
from swapmoe.cli import client
from swapmoe.orchestration.fleet import serve as fleet_serve
from swapmoe.orchestration.balancing import NoExecutor, Router, list_nodes
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as planner_serve
from swapmoe.v1 import executor_pb2 as epb, planner_pb2 as ppb

from polling import wait_until

LONG = 3000  # tokens: a generation that runs until the test cancels it


class Executor:
    """An engine, its server and its link to the planner; ``stop_serving`` stops only the server,
    so the planner still sees the executor connected."""

    def __init__(self, model_dir, node_id: str, planner: str):
        self.engine = Engine(EngineConfig(model_dir, budget_bytes=1 << 30, node_id=node_id, max_queue=4))
        self.server = executor_serve(self.engine)
        self.address = f"127.0.0.1:{self.server.port}"
        self.serving = True
        self.link = PlannerLink(self.engine, planner, self.address, labels={"pool": "test"}).start()
        self.stub = client.executor_stub(self.address)

    def stop_serving(self):
        if self.serving:
            self.serving = False
            self.server.stop(grace=0)

    def close(self):
        self.link.stop()
        self.stop_serving()
        self.engine.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model_dir = save_tiny_model("mixtral", tmp_path_factory.mktemp("routed-tiny"), max_position_embeddings=4096)
    planner, registry = planner_serve(settings=PlannerSettings(profile_devices=False))
    planner_address = f"127.0.0.1:{planner.port}"
    control = fleet_serve([planner_address])
    executors = [Executor(model_dir, node_id, planner_address) for node_id in ("exec-a", "exec-b")]
    fleet_address = f"127.0.0.1:{control.port}"
    with Router(fleet_address) as router:
        wait_until(lambda: len(_connected(router, model_dir.name)) == 2, 30, "both executors connected")
    yield fleet_address, model_dir.name, executors
    for executor in executors:
        executor.close()
    control.stop(0)
    planner.stop(0)
    registry.policy.close()


def _connected(router, model):
    try:
        return router.candidates(model)
    except NoExecutor:
        return []


def _loads(fleet_address):
    """Requests running and waiting on each executor, as its telemetry last said."""
    with Router(fleet_address) as router:
        nodes, _ = list_nodes(router._fleet(), view=ppb.STATUS_VIEW_BRIEF)
    return {n.status.node_id: n.status.throughput.running + n.status.throughput.queue_depth for n in nodes}


def test_candidates_are_the_connected_executors_of_the_model_with_their_labels_and_addresses(fleet):
    fleet_address, model, executors = fleet
    with Router(fleet_address) as router:
        nodes = router.candidates(model, "pool=test")
        assert sorted((n.status.node_id, n.status.executor_address) for n in nodes) == \
            [("exec-a", executors[0].address), ("exec-b", executors[1].address)]
        assert all(n.status.labels["model"] == model and n.status.labels["pool"] == "test" for n in nodes)
        with pytest.raises(NoExecutor, match=f"no connected executor serves model '{model}' with pool=other"):
            router.candidates(model, "pool=other")


def test_an_unknown_model_is_not_found_naming_the_models_that_are_served(fleet):
    fleet_address, model, _ = fleet
    with Router(fleet_address) as router, pytest.raises(NoExecutor) as error:
        router.pick("no-such-model")
    assert f"no connected executor serves model 'no-such-model' (labels seen: model={model})" in str(error.value)


@pytest.mark.slow
def test_a_generation_goes_to_the_executor_with_the_lighter_load(fleet):
    fleet_address, model, (a, b) = fleet
    running = a.stub.Generate(epb.GenerateRequest(text="busy", max_new_tokens=LONG), timeout=60)
    next(running)
    queued = a.stub.Generate(epb.GenerateRequest(text="waiting", max_new_tokens=LONG), timeout=60)  # joins the batch
    try:
        # The planner learns the load from the executor's telemetry, once a second.
        wait_until(lambda: _loads(fleet_address)["exec-a"] >= 2, 10, "exec-a's load in its telemetry")
        with Router(fleet_address) as router:
            assert {router.pick(model).status.node_id for _ in range(5)} == {"exec-b"}
            out = io.StringIO()
            last = client.stream_generation(router, "def f", out=out, model=model, max_new_tokens=4)
            assert last.usage.completion_tokens == 4 and out.getvalue().startswith("def f")
            stream = router.generate(model, epb.GenerateRequest(text="x", max_new_tokens=2))
            assert list(stream)[-1].usage.completion_tokens == 2 and stream.node.status.node_id == "exec-b"
    finally:
        running.cancel()
        queued.cancel()
    wait_until(lambda: a.engine.running == 0 and a.engine.queue_depth == 0, 10, "exec-a idle")


def test_an_executor_that_dies_after_its_health_check_is_replaced_before_the_first_chunk(fleet, monkeypatch):
    fleet_address, model, (a, b) = fleet
    b.stop_serving()  # still connected to its planner: only a call finds out
    with Router(fleet_address, rng=random.Random(0)) as router:
        monkeypatch.setattr(router, "_healthy", lambda address: True)
        for _ in range(10):  # ties are broken at random: until exec-b was tried first once
            stream = router.generate(model, epb.GenerateRequest(text="x", max_new_tokens=2))
            assert list(stream)[-1].usage.completion_tokens == 2 and stream.node.status.node_id == "exec-a"
            if router._recently_failed(b.address):
                break
        assert router._recently_failed(b.address), "exec-b was never tried"


def test_an_executor_failing_its_health_check_is_skipped_and_remembered(fleet):
    fleet_address, model, (a, b) = fleet
    b.stop_serving()
    checked = []
    with Router(fleet_address) as router:
        healthy = router._healthy
        router._healthy = lambda address: checked.append(address) or healthy(address)
        assert [router.pick(model).status.node_id for _ in range(6)] == ["exec-a"] * 6
        assert checked.count(b.address) <= 1, "a failed executor is remembered, not checked again at once"
