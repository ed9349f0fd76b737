"""Interface names in --interface: `lo`, and a dummy interface made here
with `ip link add` (the tests run as root)."""

import os
import smtplib
import subprocess

import pytest

from emailrelay.net import interfaces, listen_sockets
from helpers import Relay, free_port, run_emailrelay

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="creating an interface needs root")


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True, stdout=subprocess.DEVNULL)


@pytest.fixture
def dummy():
    """A dummy interface with two IPv4 addresses (one a labelled alias) and one IPv6.

    Kernels without the dummy driver get an empty bridge instead: it, too,
    has addresses and no traffic of its own.
    """
    name = "erd%d" % os.getpid()
    if subprocess.run(["ip", "link", "add", name, "type", "dummy"],
                      stderr=subprocess.DEVNULL).returncode != 0:
        ip("link", "add", name, "type", "bridge")
    try:
        ip("addr", "add", "10.254.77.1/24", "dev", name)
        ip("addr", "add", "10.254.78.1/24", "dev", name, "label", name + ":1")
        ip("-6", "addr", "add", "fd77:254::1/64", "dev", name, "nodad")
        ip("link", "set", name, "up")
        yield name
    finally:
        ip("link", "del", name)


def test_split_name():
    assert interfaces.split_name("ppp0-ipv4") == ("ppp0", 4)
    assert interfaces.split_name("eth0-ipv6") == ("eth0", 6)
    assert interfaces.split_name("eth0") == ("eth0", None)
    assert interfaces.split_name("-ipv4") == ("-ipv4", None)


def test_loopback_addresses():
    assert interfaces.addresses("lo", 4) == ["127.0.0.1"]
    assert "::1" in interfaces.addresses("lo", 6)
    assert set(interfaces.addresses("lo")) >= {"127.0.0.1", "::1"}


@root_only
def test_dummy_interface_addresses(dummy):
    assert sorted(interfaces.addresses(dummy, 4)) == ["10.254.77.1", "10.254.78.1"]
    v6 = interfaces.addresses(dummy, 6)
    assert "fd77:254::1" in v6
    assert all(a.endswith("%" + dummy) for a in v6 if a.startswith("fe80:"))
    kinds = listen_sockets.parse_interfaces(["smtp=%s-ipv4" % dummy, "pop=127.0.0.1,%s-ipv6" % dummy])
    assert sorted(kinds["smtp"]) == ["10.254.77.1", "10.254.78.1"]
    assert kinds["pop"] == ["127.0.0.1"] and "fd77:254::1" in kinds[None]


def test_unknown_interface_and_missing_family():
    with pytest.raises(interfaces.InterfaceError, match="no such network interface: nosuch0"):
        interfaces.addresses("nosuch0")
    with pytest.raises(ValueError, match="no such network interface: nosuch0"):
        listen_sockets.parse_interfaces(["smtp=nosuch0-ipv4"])


def listening(relay):
    return sorted(line.split(" server on ")[1] for line in relay.log().splitlines()
                  if " server on " in line)


def relay_on(tmp_path, interface, listeners, args=()):
    """A relay whose --interface is `interface`, expecting `listeners` listening lines."""
    relay = Relay(tmp_path, args, start=False)
    relay.args[relay.args.index("--interface") + 1] = interface
    relay._listeners = listeners
    return relay.start()


def test_relay_listens_on_lo_by_name(tmp_path):
    relay = relay_on(tmp_path, "lo", 2)
    try:
        assert listening(relay) == ["127.0.0.1:%d" % relay.port, "[::1]:%d" % relay.port]
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP(host, relay.port, timeout=10) as s:
                assert s.noop()[0] == 250
    finally:
        relay.stop()


@root_only
def test_relay_listens_on_a_dummy_interface(tmp_path, dummy):
    pop = free_port()
    relay = relay_on(tmp_path, "smtp=%s-ipv4" % dummy, 3,
                     ["--interface", "pop=lo-ipv4", "--pop", "--pop-port", str(pop),
                      "--pop-auth", str(_secrets(tmp_path))])
    try:
        assert listening(relay) == ["10.254.77.1:%d" % relay.port, "10.254.78.1:%d" % relay.port,
                                    "127.0.0.1:%d" % pop]
        with smtplib.SMTP("10.254.78.1", relay.port, timeout=10) as s:
            assert s.noop()[0] == 250
    finally:
        relay.stop()


def _secrets(tmp_path):
    path = tmp_path / "pop.auth"
    path.write_text("server plain u p\n")
    return path


@root_only
def test_interface_without_the_family_stops_start_up(tmp_path, dummy):
    ip("-4", "addr", "flush", "dev", dummy)
    r = run_emailrelay(["--no-daemon", "--spool-dir", str(tmp_path), "--user", "root",
                        "--port", str(free_port()), "--interface", dummy + "-ipv4"], timeout=20)
    assert r.returncode == 1
    assert "--interface: network interface %s has no IPv4 address" % dummy in r.stderr


def test_unknown_interface_stops_start_up(tmp_path):
    r = run_emailrelay(["--no-daemon", "--spool-dir", str(tmp_path), "--user", "root",
                        "--port", str(free_port()), "--interface", "ppp9-ipv4"], timeout=20)
    assert r.returncode == 1
    assert "--interface: no such network interface: ppp9" in r.stderr
