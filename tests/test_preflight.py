"""Start-up checks: a port already taken is found before a model loads, and the server's own bind
failing later (another process was quicker) is the same kind of one-line error."""

import socket

import grpc
import pytest

from swapmoe.cli import preflight
from swapmoe.rpc.security import ServerSecurity



def test_a_free_port_and_port_zero_pass(taken_port):
    assert preflight.check_port_free("127.0.0.1", 0) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert free != taken_port and preflight.check_port_free("127.0.0.1", free) is None
    with socket.socket() as server:  # the check holds nothing: the server binds the port after it
        server.bind(("127.0.0.1", free))
        assert server.getsockname()[1] == free


def test_a_taken_port_is_named(taken_port):
    with pytest.raises(ValueError, match=f"^--metrics-port: port {taken_port} on 127.0.0.1 is in use$"):
        preflight.check_port_free("127.0.0.1", taken_port, "--metrics-port")


def test_a_host_that_does_not_resolve_is_named():
    with pytest.raises(ValueError, match="^--host: cannot resolve 'no-such-host.invalid'"):
        preflight.check_port_free("no-such-host.invalid", 5000)


def test_the_servers_own_bind_failure_becomes_a_one_line_error(taken_port):
    server = grpc.server(thread_pool=None)
    with pytest.raises(ValueError) as error:
        with preflight.binding("127.0.0.1", taken_port):
            ServerSecurity().add_port(server, f"127.0.0.1:{taken_port}")
    assert str(error.value) == (f"--port: cannot bind 127.0.0.1:{taken_port}: the port is in use or the host is "
                                "not an address of this machine")


def test_other_runtime_errors_pass_through():
    with pytest.raises(RuntimeError, match="unrelated"):
        with preflight.binding("127.0.0.1", 1):
            raise RuntimeError("unrelated")


def test_a_state_dir_is_made_and_a_file_in_its_place_is_named(tmp_path):
    preflight.check_state_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=f"^--state-dir: {tmp_path / 'f'} is not a directory$"):
        preflight.check_state_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="^--state-dir: cannot create "):
        preflight.check_state_dir(tmp_path / "f" / "below")
