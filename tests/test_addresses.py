"""Addresses as people type them: a bare host dials the role's default port."""

import pytest

from swapmoe.cli.addresses import with_default_port


@pytest.mark.parametrize("typed, dialled", [
    ("jetson-7", "jetson-7:50051"),
    ("10.0.0.7", "10.0.0.7:50051"),
    (" 10.0.0.7 ", "10.0.0.7:50051"),
    ("10.0.0.7:6000", "10.0.0.7:6000"),
    ("[::1]", "[::1]:50051"),
    ("[::1]:6000", "[::1]:6000"),
    ("::1", "[::1]:50051"),
    ("fe80::1", "[fe80::1]:50051"),
    ("unix:/run/swapmoe.sock", "unix:/run/swapmoe.sock"),
    ("dns:///executors.lan:6000", "dns:///executors.lan:6000"),
    ("ipv4:10.0.0.1:6000,10.0.0.2:6000", "ipv4:10.0.0.1:6000,10.0.0.2:6000"),
])
def test_a_host_without_a_port_gets_the_default_and_every_other_form_is_kept(typed, dialled):
    assert with_default_port(typed, 50051) == dialled


@pytest.mark.parametrize("typed, message", [
    ("", "empty address: expected HOST or HOST:PORT"),
    ("host:", "malformed address 'host:': the port must be a number from 1 to 65535"),
    ("host:http", "malformed address 'host:http': the port must be a number from 1 to 65535"),
    ("host:70000", "malformed address 'host:70000': the port must be a number from 1 to 65535"),
    ("[::1", "malformed address '[::1': expected [IPv6] or [IPv6]:PORT"),
    ("[::1]6000", "malformed address '[::1]6000': expected [IPv6] or [IPv6]:PORT"),
])
def test_a_malformed_address_says_what_was_expected(typed, message):
    with pytest.raises(ValueError) as error:
        with_default_port(typed, 50051)
    assert str(error.value) == message
