"""--proxy-protocol: the relay behind a load balancer, with headers written by the test.

The test client plays the balancer: it connects from an allowed address
(127.0.0.1) and writes a PROXY header naming any client it likes, such as
203.0.113.7, which no loopback client could be; then smtplib, poplib or
raw bytes carry on over the same connection. tests/test_haproxy.py runs
the same relay behind the real HAProxy.
"""

import ipaddress
import poplib
import re
import smtplib
import socket
import ssl
import struct

import pytest

from certs import certs  # noqa: F401  (a fixture)
from helpers import Relay, run_emailrelay

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source, destination=("127.0.0.1", 25)):
    family = "TCP6" if ":" in source[0] else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (family, source[0], destination[0], source[1],
                                          destination[1])).encode()


def v2(source, destination=("127.0.0.1", 25)):
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        dst = ipaddress.ip_address("::1")
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return SIG + struct.pack("!BBH", 0x21, 0x11 if src.version == 4 else 0x21,
                             len(block)) + block


class ProxiedSMTP(smtplib.SMTP):
    """smtplib.SMTP whose connection starts with `header`, as a balancer's would."""

    def __init__(self, port, header, source="127.0.0.1"):
        self._header = header
        super().__init__("127.0.0.1", port, source_address=(source, 0), timeout=20)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self._header)
        return sock


class ProxiedPOP3(poplib.POP3):
    def __init__(self, port, header):
        self._header = header
        super().__init__("127.0.0.1", port, timeout=20)

    def _create_socket(self, timeout):
        sock = super()._create_socket(timeout)
        sock.sendall(self._header)
        return sock


def raw(port, data, source="127.0.0.1"):
    """Sends `data` from `source` and returns all the relay says until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as s:
        if data:
            s.sendall(data)
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return got
                got += chunk
                if got.startswith(b"220 ") and got.endswith(b"\r\n"):
                    s.sendall(b"QUIT\r\n")
        except ConnectionResetError:
            return got


def send(port, header, subject, source="127.0.0.1"):
    with ProxiedSMTP(port, header, source) as smtp:
        smtp.sendmail("a@x.test", ["b@y.test"], "Subject: %s\r\n\r\nhello\r\n" % subject)


def stored(relay):
    """{subject: (X-MailRelay-Client value, Received line)} for every committed message."""
    out = {}
    for name in relay.files(".envelope"):
        with open("%s/%s" % (relay.spool, name), encoding="utf-8") as f:
            client = re.search(r"X-MailRelay-Client: (.*)\r?\n", f.read()).group(1)
        with open("%s/%s" % (relay.spool, name[:-len(".envelope")] + ".content"),
                  encoding="utf-8") as f:
            text = f.read()
        subject = re.search(r"Subject: (.*)\r?\n", text).group(1)
        received = re.search(r"Received: (.*)\r?\n", text).group(1)
        out[subject] = (client, received)
    return out


def test_client_named_by_v1_and_v2_headers_is_in_envelope_and_received(tmp_path):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1", "--remote-clients"]) as relay:
        send(relay.port, v1(("203.0.113.7", 40001)), "one")
        send(relay.port, v2(("198.51.100.9", 40002)), "two")
        send(relay.port, v2(("2001:db8::7", 40003)), "three")
        got = stored(relay)
        relay.wait_log(r"smtp: PROXY v1 header from 127\.0\.0\.1:\d+: client 203\.0\.113\.7:40001")
        relay.wait_log(r"smtp: PROXY v2 header from 127\.0\.0\.1:\d+: client 198\.51\.100\.9:40002")
        relay.wait_log(r"smtp connection from 203\.0\.113\.7:40001")
    assert got["one"][0] == "203.0.113.7"
    assert " ([203.0.113.7]) by relay.test with ESMTP " in got["one"][1]
    assert got["two"][0] == "198.51.100.9"
    assert " ([198.51.100.9]) by relay.test " in got["two"][1]
    assert got["three"][0] == "2001:db8::7"
    assert " ([IPv6:2001:db8::7]) by relay.test " in got["three"][1]


def test_guard_refuses_a_non_local_client_seen_through_the_balancer(tmp_path):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1"]) as relay:
        refused = b"554 no SMTP service for your address\r\n"
        assert raw(relay.port, v1(("203.0.113.7", 40000))) == refused
        relay.wait_log(r"smtp: connection refused from non-local address 203\.0\.113\.7 "
                       r"\(see --remote-clients\)")
        assert raw(relay.port, v2(("203.0.113.8", 40000))) == refused
        relay.wait_log(r"non-local address 203\.0\.113\.8")
        # A local client behind the same balancer is served.
        assert raw(relay.port, v1(("192.168.1.5", 40000))).startswith(b"220 ")
        assert relay.files(".content") == []


def test_per_address_limit_counts_the_real_clients(tmp_path):
    args = ["--proxy-protocol", "127.0.0.1", "--remote-clients",
            "--max-connections-per-address", "1"]
    with Relay(tmp_path, args) as relay:
        first = ProxiedSMTP(relay.port, v1(("203.0.113.7", 1000)))
        try:
            # Every connection comes from the balancer's 127.0.0.1, yet
            # another client is served...
            other = ProxiedSMTP(relay.port, v1(("203.0.113.8", 1000)))
            assert other.noop()[0] == 250
            other.quit()
            # ...and a second session of the first client is refused.
            text = raw(relay.port, v2(("203.0.113.7", 1001)))
            assert text.startswith(b"450 "), text
            relay.wait_log(r"smtp: too many connections from one address: refused 203\.0\.113\.7")
        finally:
            first.quit()


BAD_HEADERS = [
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 25" + b" " * 70 + b"\r\n",
     "v1 line longer than 107 octets"),
    (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12) + b"EHLO x\r\n",
     "v2 signature is wrong"),
    (SIG + b"\x21\x11\x00\x08" + bytes(8) + b"EHLO x\r\n",
     r"v2 address block truncated \(8 octets, TCP4 needs 12\)"),
    (SIG + b"\x21\x11\x00\x0c" + bytes(6), "connection ended inside the header"),
    (b"EHLO client.test\r\n", "not a PROXY header"),
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000\r\nEHLO x\r\n", "v1 line needs four fields after TCP4"),
]


@pytest.mark.parametrize("data, why", BAD_HEADERS)
def test_bad_headers_are_refused_cleanly(tmp_path, data, why):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1", "--remote-clients"]) as relay:
        if why.startswith("connection ended"):
            with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b""
        else:
            assert raw(relay.port, data) == b""
        relay.wait_log(r"warning: smtp: bad PROXY header from 127\.0\.0\.1:\d+: %s: "
                       r"connection closed" % why)
        # Nothing was stored, nothing crashed: the next header is served.
        assert relay.files(".content") == [] and relay.files(".envelope.new") == []
        send(relay.port, v1(("203.0.113.7", 40000)), "after")
        assert list(stored(relay)) == ["after"]


def test_header_from_an_address_not_allowed_is_refused(tmp_path):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1,10.0.0.0/8",
                          "--remote-clients"]) as relay:
        assert raw(relay.port, v1(("203.0.113.7", 40000)), source="127.0.0.2") == b""
        relay.wait_log(r"warning: smtp: connection refused from 127\.0\.0\.2: "
                       r"not a --proxy-protocol address")
        assert "PROXY v1 header" not in relay.log()
        assert relay.files(".content") == []


def test_missing_header_times_out(tmp_path):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1",
                          "--proxy-protocol-timeout", "0.5"]) as relay:
        assert raw(relay.port, b"") == b""
        relay.wait_log(r"warning: smtp: bad PROXY header from 127\.0\.0\.1:\d+: none within "
                       r"0\.5s: connection closed")


def test_local_header_keeps_the_balancer_address(tmp_path):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1"]) as relay:
        send(relay.port, SIG + b"\x20\x00\x00\x00", "check")
        send(relay.port, b"PROXY UNKNOWN\r\n", "unknown")
        got = stored(relay)
    assert got["check"][0] == "127.0.0.1" and got["unknown"][0] == "127.0.0.1"


def test_pop_only_and_the_auth_failure_log_shows_the_real_client(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.write_text("server plain bob secret\n")
    args = ["--proxy-protocol", "pop=127.0.0.1", "--remote-clients", "--pop-auth", str(secrets)]
    with Relay(tmp_path, args, pop=True) as relay:
        pop = ProxiedPOP3(relay.pop_port, v2(("203.0.113.9", 5555)))
        with pytest.raises(poplib.error_proto):
            pop.user("bob")
            pop.pass_("wrong")
        pop.user("bob")
        pop.pass_("secret")
        assert pop.stat() == (0, 0)
        pop.quit()
        relay.wait_log(r"pop: authentication failed \(USER/PASS\) for bob from 203\.0\.113\.9")
        # SMTP has no header on this listener: a direct client is served.
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as smtp:
            assert smtp.noop()[0] == 250


def test_header_before_implicit_tls(tmp_path, certs):  # noqa: F811
    args = ["--proxy-protocol", "127.0.0.1", "--remote-clients", "--server-tls",
            "--server-tls-connection", "--server-tls-certificate", certs.server]
    with Relay(tmp_path, args) as relay:
        context = ssl.create_default_context(cafile=certs.ca)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as s:
            s.sendall(v1(("203.0.113.7", 40000)))
            with context.wrap_socket(s, server_hostname="localhost") as t:
                assert t.recv(100).startswith(b"220 ")
        relay.wait_log(r"smtp connection from 203\.0\.113\.7:40000")


def test_workers_serve_proxied_connections(tmp_path):
    args = ["--proxy-protocol", "127.0.0.1", "--remote-clients", "--workers", "2"]
    with Relay(tmp_path, args) as relay:
        relay.wait_log(r"worker serving smtp(.|\n)*worker serving smtp")
        for i in range(6):
            send(relay.port, (v1 if i % 2 else v2)(("203.0.113.%d" % (i + 1), 40000 + i)),
                 "m%d" % i)
        got = stored(relay)
    assert {s: c for s, (c, _) in got.items()} == {
        "m%d" % i: "203.0.113.%d" % (i + 1) for i in range(6)}
    # The worker processes stored them (a file name holds its writer's pid).
    assert str(relay.proc.pid) not in {name.split(".")[1] for name in relay.files(".envelope")}


@pytest.mark.parametrize("args, message", [
    (["--proxy-protocol", "admin=127.0.0.1"], "invalid prefix admin="),
    (["--proxy-protocol", "127.0.0.300"], "invalid address pattern"),
    (["--proxy-protocol", ","], "no addresses"),
    (["--proxy-protocol", "127.0.0.1", "--inetd"], "cannot be used with --inetd"),
])
def test_bad_option_values_are_usage_errors(args, message):
    result = run_emailrelay(args + ["--no-daemon"])
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_relay_stops_cleanly_with_headers_pending(tmp_path):
    relay = Relay(tmp_path, ["--proxy-protocol", "127.0.0.1"])
    with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as s:
        s.sendall(b"PROXY TCP4 ")
        assert relay.stop() == 0
        assert s.recv(100) == b""


def test_connections_waiting_for_their_header_are_limited(tmp_path):
    args = ["--proxy-protocol", "127.0.0.1", "--max-connections", "2",
            "--proxy-protocol-timeout", "60"]
    with Relay(tmp_path, args) as relay:
        waiting = [socket.create_connection(("127.0.0.1", relay.port), timeout=20)
                   for _ in range(2)]
        try:
            for s in waiting:
                s.sendall(b"PROXY TCP4 ")
            assert raw(relay.port, v1(("192.168.1.5", 40000))) == b""
            relay.wait_log(r"warning: smtp: too many connections waiting for a PROXY header: "
                           r"refused 127\.0\.0\.1")
            # Once a header is complete its connection is a session like any other.
            waiting[0].sendall(b"192.168.1.6 127.0.0.1 1 25\r\n")
            assert waiting[0].recv(100).startswith(b"220 ")
        finally:
            for s in waiting:
                s.close()
