"""Relays behind the real HAProxy (Debian's haproxy): PROXY protocol v1 and v2.

HAProxy runs in the foreground (`haproxy -f CFG -db`) with a `mode tcp`
frontend on a free port and a backend of one or two relays, `send-proxy`
(v1) for one and `send-proxy-v2` for the other. Clients connect to the
frontend from 127.0.0.2 or 127.0.0.3, which HAProxy passes on in the
header; to show a non-local client, the frontend rewrites the source
with `tcp-request connection set-src`.
"""

import os
import re
import smtplib
import socket
import subprocess
import threading

import pytest

from helpers import Relay, free_port, stop_process, wait_for
from test_client import dumping_sink, sink_dumps
from test_dnsbl import dns_server  # noqa: F401  (a fixture)


def listening(port):
    """True when a socket listens on TCP `port` (read from /proc: no connection is spent)."""
    wanted = ":%04X" % port
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(wanted) and fields[3] == "0A":
                        return True
        except FileNotFoundError:
            continue
    return False


class HAProxy:
    """haproxy in the foreground in front of `servers`: [(port, "send-proxy" or
    "send-proxy-v2" and any other server options), ...], round robin;
    `frontend` and `backend` lines are added to those sections."""

    def __init__(self, tmp_path, servers, frontend=(), backend=()):
        self.port = free_port()
        self.cfg = os.path.join(str(tmp_path), "haproxy.cfg")
        lines = ["global", "    maxconn 500",
                 "defaults", "    mode tcp", "    timeout connect 5s",
                 "    timeout client 60s", "    timeout server 60s",
                 "frontend smtp", "    bind 127.0.0.1:%d" % self.port]
        lines += ["    " + line for line in frontend]
        lines += ["    default_backend relays", "backend relays", "    balance roundrobin"]
        lines += ["    " + line for line in backend]
        lines += ["    server r%d 127.0.0.1:%d %s" % (i, port, how)
                  for i, (port, how) in enumerate(servers, 1)]
        with open(self.cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log_path = os.path.join(str(tmp_path), "haproxy.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["haproxy", "-f", self.cfg, "-db"], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)

        def up():
            if self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    raise AssertionError("haproxy exited: %s" % f.read())
            return listening(self.port)
        wait_for(up, 15, what="haproxy to listen")

    def stop(self):
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def balancer(tmp_path):
    started = []

    def make(servers, frontend=(), backend=()):
        b = HAProxy(tmp_path, servers, frontend, backend)
        started.append(b)
        return b
    yield make
    for b in started:
        b.stop()


def connect(port, source):
    return smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30)


def send(port, source, subject):
    with connect(port, source) as smtp:
        smtp.sendmail("a@x.test", ["b@y.test"], "Subject: %s\r\n\r\nhello\r\n" % subject)


def greeting(port, source):
    """The first thing the relay says through the balancer (b'' if the connection just ends)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=(source, 0)) as s:
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            return b""
        if data.startswith(b"220"):
            s.sendall(b"QUIT\r\n")
        return data


def stored(spool):
    """{subject: (X-MailRelay-Client, Received line)} of the committed messages."""
    out = {}
    for name in sorted(os.listdir(spool)):
        if not name.endswith(".envelope"):
            continue
        with open(os.path.join(spool, name), encoding="utf-8", newline="") as f:
            client = re.search(r"X-MailRelay-Client: (.*)\r\n", f.read()).group(1)
        with open(os.path.join(spool, name[:-len("envelope")] + "content"), encoding="utf-8", newline="") as f:
            text = f.read()
        out[re.search(r"Subject: (.*)\r\n", text).group(1)] = (
            client, re.search(r"Received: (.*)\r\n", text).group(1))
    return out


def test_real_client_address_through_send_proxy_and_send_proxy_v2(tmp_path, balancer):
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    args = ["--proxy-protocol", "127.0.0.1"]
    with Relay(tmp_path, args, spool=spool, name="r1") as r1, \
            Relay(tmp_path, args, spool=spool, name="r2") as r2:
        front = balancer([(r1.port, "send-proxy"), (r2.port, "send-proxy-v2")])
        sources = ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
        for i, source in enumerate(sources):
            send(front.port, source, "m%d" % i)
        got = stored(spool)
        # Round robin: each relay had two of the four, each with its header.
        assert len(re.findall(r"smtp: PROXY v1 header from 127\.0\.0\.1", r1.log())) == 2
        assert len(re.findall(r"smtp: PROXY v2 header from 127\.0\.0\.1", r2.log())) == 2
    for i, source in enumerate(sources):
        client, received = got["m%d" % i]
        assert client.split(":")[0] == source
        assert " ([%s]) by relay.test with ESMTP id " % source in received


def test_smtp_health_checks_with_check_send_proxy(tmp_path, balancer):
    # The README's configuration: HAProxy checks each relay with EHLO,
    # sending a PROXY header (v2: LOCAL) first.
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1"], name="r1") as r1, \
            Relay(tmp_path, ["--proxy-protocol", "127.0.0.1"], name="r2") as r2:
        balancer([(r1.port, "send-proxy-v2 check check-send-proxy inter 200ms"),
                  (r2.port, "send-proxy check check-send-proxy inter 200ms")],
                 backend=["option smtpchk EHLO lb.test"])
        for relay in (r1, r2):
            relay.wait_log(r"smtp: PROXY v[12] header from 127\.0\.0\.1:\d+: ")
            relay.wait_log(r"smtp: rx: EHLO lb\.test(.|\n)*smtp: tx: 221 ")
        assert "no client address (LOCAL or UNKNOWN)" in r1.log()
        assert "bad PROXY header" not in r1.log() + r2.log()


def test_guard_refuses_a_non_local_client_seen_through_haproxy(tmp_path, balancer):
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1"]) as relay:
        front = balancer([(relay.port, "send-proxy-v2")],
                         frontend=["tcp-request connection set-src ipv4(203.0.113.7)"])
        # The guard's reply reaches the client through the balancer.
        assert greeting(front.port, "127.0.0.2") == b"554 no SMTP service for your address\r\n"
        relay.wait_log(r"smtp: connection refused from non-local address 203\.0\.113\.7 "
                       r"\(see --remote-clients\)")
    # With --remote-clients the same client is served, and stored as itself.
    with Relay(tmp_path, ["--proxy-protocol", "127.0.0.1", "--remote-clients"],
               name="open") as relay:
        front = balancer([(relay.port, "send-proxy")],
                         frontend=["tcp-request connection set-src ipv4(203.0.113.7)"])
        send(front.port, "127.0.0.2", "remote")
        assert stored(relay.spool)["remote"][0] == "203.0.113.7"


def test_per_address_limit_counts_real_clients_through_haproxy(tmp_path, balancer):
    args = ["--proxy-protocol", "127.0.0.1", "--max-connections-per-address", "1"]
    with Relay(tmp_path, args) as relay:
        front = balancer([(relay.port, "send-proxy")])
        first = connect(front.port, "127.0.0.2")
        try:
            assert first.noop()[0] == 250
            # Another client behind the same balancer is served...
            assert greeting(front.port, "127.0.0.3").startswith(b"220 ")
            # ...a second connection of the first client is not.
            assert greeting(front.port, "127.0.0.2").startswith(b"450 ")
            relay.wait_log(r"too many connections from one address: refused 127\.0\.0\.2")
        finally:
            first.quit()


def test_dnsbl_checks_the_real_client_through_haproxy(tmp_path, balancer, dns_server,  # noqa: F811
                                                      monkeypatch):
    monkeypatch.setenv("EMAILRELAY_DNSBL_CHECK_LOCAL", "1")
    args = ["--proxy-protocol", "127.0.0.1", "--dnsbl", "bl.test,1,5000," + dns_server]
    with Relay(tmp_path, args) as relay:
        front = balancer([(relay.port, "send-proxy-v2")])
        assert greeting(front.port, "127.0.0.2").startswith(b"554 client address 127.0.0.2 ")
        assert greeting(front.port, "127.0.0.3").startswith(b"220 ")
        relay.wait_log(r"dnsbl: client address \[127\.0\.0\.2\] blocked by \[bl\.test\]")


def test_two_relays_on_one_spool_forward_each_message_once(tmp_path, balancer):
    count = 60
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    sink_port = free_port()
    sink = dumping_sink(sink_port, dumps)
    args = ["--proxy-protocol", "127.0.0.1", "--forward-to", "127.0.0.1:%d" % sink_port,
            "--forward-on-disconnect", "--poll", "1"]
    try:
        with Relay(tmp_path, args, spool=spool, name="r1") as r1, \
                Relay(tmp_path, args, spool=spool, name="r2") as r2:
            front = balancer([(r1.port, "send-proxy"), (r2.port, "send-proxy-v2")])
            errors = []

            def client(source, numbers):
                try:
                    for n in numbers:
                        send(front.port, source, "n%d" % n)
                except Exception as e:
                    errors.append(e)
            threads = [threading.Thread(target=client, args=(source, range(k, count, 3)))
                       for k, source in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.4"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert errors == []
            wait_for(lambda: len(os.listdir(str(dumps))) >= count
                     and not [n for n in os.listdir(spool) if ".envelope" in n],
                     60, what="every message forwarded")
            # Both relays stored and forwarded some of them.
            for relay in (r1, r2):
                assert re.search(r"forwarding: [1-9]\d* message\(s\) sent", relay.log())
    finally:
        stop_process(sink)
    subjects = sorted(re.search(rb"Subject: (n\d+)\r?\n", d).group(1).decode()
                      for d in sink_dumps(dumps))
    assert subjects == sorted("n%d" % n for n in range(count))
