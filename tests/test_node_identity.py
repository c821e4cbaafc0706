"""A node id is claimed once: a later registration must carry the secret issued to it, whether the
node is connected, away, or its planner restarted; the address clients are sent to is one the
planner verified, not one an executor asserts; an operator can release an id; records of nodes
gone for good expire. Real planners on loopback, a real executor keeping its secret on disk."""

from __future__ import annotations

import argparse

import grpc
import pytest

from swapmoe.core.errors import Busy, Forbidden
from swapmoe.executor.engine import Engine
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.cli import main as cli
from swapmoe.cli.devcerts import make_dev_certs
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.registration import check_registration
from swapmoe.planner_service.claims import RegistrySettings
from swapmoe.planner_service.registry import Registry
from swapmoe.planner_service.server import serve
from swapmoe.rpc import security
from swapmoe.v1 import planner_pb2 as ppb

from planner_streams import Stream, claim
from polling import wait_until

SETTINGS = PlannerSettings(profile_devices=False)


def refused(address: str, registration: ppb.Registration, client=None) -> grpc.RpcError:
    stream = Stream(address, registration, client)
    with pytest.raises(grpc.RpcError) as error:
        stream.first()
    stream.close()
    return error.value


def status(registry: Registry, node_id: str) -> ppb.ExecutorStatus:
    return registry.statuses(registry.find([node_id]))[0]


def published(engine: Engine, planner: str, registry: Registry, node_id: str, asserted: str, client=None) -> str:
    """The address the planner publishes for a new node that registers asserting ``asserted``."""
    stream = Stream(planner, claim(engine, node_id, address=asserted), client)
    try:
        assert stream.first().HasField("welcome")
        return status(registry, node_id).executor_address
    finally:
        stream.close()


def connect_owner(engine: Engine, address: str) -> PlannerLink:
    link = PlannerLink(engine, address, "127.0.0.1:50051").start()
    assert link.connected.wait(30)
    return link


def test_a_node_that_is_away_is_claimed_only_with_its_secret_even_after_a_planner_restart(owner, tmp_path):
    planner, registry = serve(state_dir=tmp_path, settings=SETTINGS)
    address = f"127.0.0.1:{planner.port}"
    try:
        link = connect_owner(owner, address)
        wait_until(lambda: registry.find(["owner"])[0].claimed, 30, "the owner's first message after its secret")
        link.stop()
        wait_until(lambda: not status(registry, "owner").connected, 30, "the owner away")
        before = status(registry, "owner")
        for secret in ("", "a-guessed-secret"):
            error = refused(address, claim(owner, "owner", secret, "127.0.0.1:6666"))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "registration.node_secret" in error.details() and "swapmoe planner forget owner" in error.details()
        assert status(registry, "owner") == before  # nothing of the impostor's reached the record
    finally:
        planner.stop(0)
    planner, registry = serve(f"127.0.0.1:{planner.port}", state_dir=tmp_path, settings=SETTINGS)
    try:
        assert refused(address, claim(owner, "owner")).code() == grpc.StatusCode.PERMISSION_DENIED
        link = connect_owner(owner, address)  # the real executor proves it with the secret in its state dir
        assert status(registry, "owner").connected
        link.stop()
    finally:
        planner.stop(0)


def test_a_claim_counts_once_the_executor_answered_after_receiving_its_secret():
    """A stream that broke before its Welcome arrived leaves an executor without its secret: until it
    answers on a stream, its id may be claimed again without one."""
    from test_planner_registry import registration

    registry = Registry()
    record, _ = registry.connect(check_registration(registration(10**6)))
    registry.disconnect(record)
    record, _ = registry.connect(check_registration(registration(10**6)))  # never answered: claimed anew
    registry.seen(record)
    registry.disconnect(record)
    with pytest.raises(Forbidden, match="registration.node_secret"):
        registry.connect(check_registration(registration(10**6)))


def test_a_peer_address_is_read_as_grpc_writes_it():
    from swapmoe.planner_service.registration import Peer, published_address

    assert published_address("0.0.0.0:50051", Peer.from_grpc("ipv6:%5B::1%5D:47050", {})) == ("[::1]:50051", "")
    assert published_address("h:1", Peer.from_grpc("ipv4:10.1.2.3:5", {})) == ("10.1.2.3:1", "")
    assert published_address("h:1", Peer.from_grpc("unix:/run/x.sock", {}))[0] == ""


def test_clients_are_sent_to_the_host_the_stream_came_from_not_the_one_asserted(owner):
    planner, registry = serve(settings=SETTINGS)
    try:
        address = f"127.0.0.1:{planner.port}"
        assert published(owner, address, registry, "asserts-elsewhere", "203.0.113.7:50051") == "127.0.0.1:50051"
        assert published(owner, address, registry, "binds-everywhere", "0.0.0.0:7000") == "127.0.0.1:7000"
    finally:
        planner.stop(0)


def test_with_mutual_tls_only_names_the_executors_certificate_holds_are_published(owner, tmp_path, caplog):
    make_dev_certs(tmp_path)
    args = argparse.Namespace(security=tmp_path)
    planner, registry = serve(settings=SETTINGS, security=security.server_from_args(args, "planner"))
    executor = security.client_from_args(args, "executor", cert="executor")
    address = f"localhost:{planner.port}"
    try:
        assert published(owner, address, registry, "rogue", "198.51.100.1:50051", executor) == ""  # planned, not routed
        assert "'198.51.100.1' is not a name in the executor's client certificate" in caplog.text
        assert published(owner, address, registry, "named", "localhost:50051", executor) == "localhost:50051"
        assert published(owner, address, registry, "wildcard", "0.0.0.0:50051", executor) == "127.0.0.1:50051"
    finally:
        planner.stop(0)


@pytest.mark.slow
def test_an_operator_forgets_an_away_node_and_its_id_may_be_claimed_anew(owner, capsys):
    planner, registry = serve(settings=SETTINGS)
    address = f"127.0.0.1:{planner.port}"
    try:
        link = connect_owner(owner, address)
        wait_until(lambda: registry.find(["owner"])[0].claimed, 30, "the owner's first message after its secret")
        with pytest.raises(SystemExit):
            cli.main(["planner", "forget", "--planner", address, "owner"])
        assert "FAILED_PRECONDITION" in capsys.readouterr().err and status(registry, "owner").connected
        link.stop()
        wait_until(lambda: not status(registry, "owner").connected, 30, "the owner away")
        cli.main(["planner", "forget", "--planner", address, "owner"])
        assert "forgot owner" in capsys.readouterr().out
        assert registry.find([]) == []
        stream = Stream(address, claim(owner, "owner"))  # a new executor, without the old secret
        assert stream.first().welcome.node_secret
        stream.close()
    finally:
        planner.stop(0)


def test_records_of_nodes_gone_for_good_expire_and_their_number_is_bounded():
    from test_planner_registry import registration

    settings = RegistrySettings(max_nodes=2, away_ttl_s=100.0, unplanned_ttl_s=10.0)
    registry = Registry(settings=settings)
    records = []
    for node_id in ("acked", "unplanned"):
        reg = registration(10**6)
        reg.node_id = node_id
        record, _ = registry.connect(check_registration(reg))
        records.append(record)
    records[0].acked = records[0].desired
    third = registration(10**6)
    third.node_id = "third"
    with pytest.raises(Busy, match="keeps 2 executors"):  # both are connected: nothing expires
        registry.connect(check_registration(third))
    for record in records:
        registry.disconnect(record)
    now = max(r.away_since_ns for r in records)
    assert registry.expire(now + 5 * 10**9) == []
    assert registry.expire(now + 11 * 10**9) == ["unplanned"]
    assert registry.expire(now + 101 * 10**9) == ["acked"]
    registry.connect(check_registration(third))
    assert [r.node_id for r in registry.find([])] == ["third"]


def test_a_planner_keeps_no_record_of_a_stream_it_refused(owner):
    planner, registry = serve(settings=SETTINGS)
    try:
        reg = claim(owner, "bad-address", address="no-port-here")
        error = refused(f"127.0.0.1:{planner.port}", reg)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "registration.executor_address" in error.details()
        assert registry.find([]) == []
    finally:
        planner.stop(0)


def test_search_work_is_bounded_and_skipped_for_nodes_that_went_away():
    """Each fake node claiming a profiled model once queued ~30 CPU-seconds of search."""
    import threading

    from swapmoe.planner_service.policy import MAX_QUEUED_SEARCHES
    from test_planner_registry import registration

    registry = Registry(planning=SETTINGS)
    planner = registry.policy
    record, _ = registry.connect(check_registration(registration(10**6)))
    gate, ran = threading.Event(), []
    planner._work.submit(gate.wait)  # the search thread is busy with an earlier search
    for i in range(MAX_QUEUED_SEARCHES + 50):
        planner._search_later(lambda node_id, i: ran.append(i), record.node_id, i)
    assert len(planner._queued) == MAX_QUEUED_SEARCHES
    registry.disconnect(record)  # the node leaves before its turn: nobody to plan for
    gate.set()
    planner._work.shutdown(wait=True)
    assert ran == [] and not planner._queued


def test_a_restarted_planner_counts_a_nodes_absence_from_its_own_start():
    """A node connected for a week, right up to a planner restart, last changed its record (and its
    last-seen time on disk) long ago: it must not expire while it reconnects."""
    from test_planner_registry import registration

    settings = RegistrySettings(away_ttl_s=100.0, unplanned_ttl_s=10.0)
    before = Registry(settings=settings)
    record, _ = before.connect(check_registration(registration(10**6)))
    record.last_seen_ns -= 7 * 24 * 3600 * 10**9  # its last change on disk, a week ago
    after = Registry([record], settings=settings)  # the planner restarted and read it back
    assert after.expire() == []


def test_a_refused_registration_changes_nothing_the_planner_knows_of_the_node():
    """A registration without the node's secret is refused before the planner hears of it: it
    cannot make the planner plan the connected executor for another model."""
    from test_planner_registry import registration

    registry = Registry()
    reg = registration(10**6)
    reg.model_fingerprint = "a" * 16
    record, _ = registry.connect(check_registration(reg))
    impostor = registration(10**6)
    impostor.model_fingerprint = "b" * 16
    with pytest.raises(Forbidden, match="is connected on another stream"):
        registry.connect(check_registration(impostor))
    assert registry.policy.model_of(record.node_id) == "a" * 16
