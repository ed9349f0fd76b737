"""`net:` filters (--filter and --client-filter) against a filter daemon
written here, over TCP and a unix socket, through the real relay."""

import os
import smtplib
import time

import pytest

from daemons import HANG, LineDaemon
from helpers import Relay, run_emailrelay, smtp_sink, stop_process, free_port, wait_for


def policy(line):
    """The daemon's rules: the content decides the answer."""
    with open(line, "rb") as f:
        text = f.read()
    if b"REJECT" in text:
        return b"no thanks\tcontains REJECT\n"
    if b"PLAIN" in text:
        return b"not wanted here\n"
    if b"SLOW" in text:
        return HANG
    if b"HALF" in text:
        return b"rej"
    if b"SILENT" in text:
        return None
    return b"ok\n"


def send(port, body, rcpt="b@y.test"):
    """Sends one message; returns (code, text) of the reply to the content."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("a@x.test")
        s.rcpt(rcpt)
        code, text = s.data(b"Subject: t\r\n\r\n" + body + b"\r\n")
        return code, text.decode()


@pytest.fixture(params=["tcp", "unix"])
def daemon(request, tmp_path):
    path = str(tmp_path / "filter.sock") if request.param == "unix" else None
    with LineDaemon(policy, path=path) as d:
        yield d


def test_accepts_and_keeps_one_connection(tmp_path, daemon):
    with Relay(tmp_path, ["--filter", "net:" + daemon.address]) as relay:
        for n in range(3):
            code, text = send(relay.port, b"hello %d" % n)
            assert code == 250, text
        assert len(relay.files(".envelope")) == 3
        assert daemon.connections == 1
        contents = [os.path.join(relay.spool, n) for n in relay.files(".content")]
        assert sorted(daemon.requests) == sorted(contents)


def test_reject_uses_text_before_tab_and_logs_text_after(tmp_path, daemon):
    with Relay(tmp_path, ["--filter", "net:" + daemon.address]) as relay:
        code, text = send(relay.port, b"REJECT me")
        assert code == 452 and "no thanks" in text and "contains REJECT" not in text
        relay.wait_log(r"filter net:\S+: rejected: contains REJECT")
        code, text = send(relay.port, b"PLAIN")
        assert code == 452 and "not wanted here" in text
        assert relay.files(".envelope") == [] and relay.files(".content") == []


@pytest.mark.parametrize("body,why", [(b"SLOW", "response timeout: "), (b"HALF", "incomplete response"),
                                      (b"SILENT", "connection closed")])
def test_slow_half_or_silent_daemon_is_a_temporary_failure(tmp_path, daemon, body, why):
    """As E-MailRelay 2.6: `452 failed`, and the reason in the log."""
    with Relay(tmp_path, ["--filter", "net:" + daemon.address, "--filter-timeout", "1"]) as relay:
        code, text = send(relay.port, body)
        assert (code, text) == (452, "failed")
        relay.wait_log(r"warning: filter \[net:\S+\]: \[\S+\]: failed response=\[failed\] "
                       r"reason=\[%s" % why)
        assert relay.files(".envelope") == [] and relay.files(".content") == []
        # The relay carries on with the next message on a new connection.
        code, text = send(relay.port, b"fine")
        assert code == 250, text


def test_daemon_down_is_a_temporary_failure(tmp_path):
    port = free_port()
    with Relay(tmp_path, ["--filter", "net:127.0.0.1:%d" % port]) as relay:
        code, text = send(relay.port, b"hello")
        assert (code, text) == (452, "failed")
        relay.wait_log(r"warning: filter \[net:127.0.0.1:%d\]: \[\S+\]: failed response=\[failed\] "
                       r"reason=\[cannot connect to .*refused" % port)
        assert relay.files(".envelope") == [] and relay.files(".content") == []


def test_reconnects_when_the_daemon_drops_the_connection(tmp_path, daemon):
    with Relay(tmp_path, ["--filter", "net:" + daemon.address]) as relay:
        assert send(relay.port, b"one")[0] == 250
        daemon.drop_connections()
        assert send(relay.port, b"two")[0] == 250
        assert daemon.connections == 2
        assert len(relay.files(".envelope")) == 2


def test_the_filter_timeout_bounds_a_request_retried_on_a_new_connection(tmp_path):
    # The daemon closes the kept connection without answering after most
    # of the timeout, then never answers on the new one: the retry gets
    # only the time left.
    timeout = 4
    seen = set()

    def closes_late_then_hangs(line):
        with open(line, "rb") as f:
            if b"LATE" not in f.read():
                return b"ok\n"
        if line in seen:
            return HANG
        seen.add(line)
        time.sleep(timeout - 1)
        return None
    with LineDaemon(closes_late_then_hangs) as daemon:
        with Relay(tmp_path, ["--filter", "net:" + daemon.address,
                              "--filter-timeout", str(timeout)]) as relay:
            assert send(relay.port, b"first")[0] == 250
            start = time.monotonic()
            code, text = send(relay.port, b"LATE")
            took = time.monotonic() - start
            assert code // 100 == 4, text
            relay.wait_log(r"warning: filter \[net:\S+\]: \[\S+\]: failed response=\[failed\] reason=\[.*timeout")
            assert daemon.connections == 2
    assert took < 1.5 * timeout, "the reply came after %.1fs" % took


def test_daemon_restarted_on_the_same_address(tmp_path):
    first = LineDaemon(policy)
    port = int(first.address.rsplit(":", 1)[1])
    with Relay(tmp_path, ["--filter", "net:" + first.address]) as relay:
        assert send(relay.port, b"one")[0] == 250
        first.stop()
        assert send(relay.port, b"two")[0] // 100 == 4
        second = LineDaemon(policy, port=port)
        try:
            assert send(relay.port, b"three")[0] == 250
        finally:
            second.stop()
        assert len(relay.files(".envelope")) == 2


def _store(tmp_path, bodies):
    """Stores messages with a relay that has no filter; returns the spool."""
    with Relay(tmp_path, name="store") as relay:
        for body in bodies:
            assert send(relay.port, body)[0] == 250
        return relay.spool


def test_client_filter_reject_goes_bad_with_the_reason(tmp_path, daemon):
    spool = _store(tmp_path, [b"REJECT this one", b"a good one"])
    port = free_port()
    sink = smtp_sink(port)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--user", "root", "--spool-dir", spool,
                            "--client-filter", "net:" + daemon.address])
    finally:
        stop_process(sink)
    assert r.returncode == 1, r.stderr
    bad = [n for n in os.listdir(spool) if n.endswith(".envelope.bad")]
    assert len(bad) == 1
    with open(os.path.join(spool, bad[0]), "rb") as f:
        assert b"X-MailRelay-Reason: contains REJECT" in f.read()
    assert [n for n in os.listdir(spool) if n.endswith(".envelope")] == []


def test_client_filter_daemon_down_leaves_messages_queued(tmp_path):
    spool = _store(tmp_path, [b"one", b"two"])
    port, down = free_port(), free_port()
    sink = smtp_sink(port)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--user", "root", "--spool-dir", spool,
                            "--client-filter", "net:127.0.0.1:%d" % down,
                            "--filter-timeout", "2"])
    finally:
        stop_process(sink)
    assert r.returncode == 1
    assert "temporary failure 1: client filter failed" in r.stderr
    assert "client filter [net:127.0.0.1:%d]: failed response=[failed] reason=[cannot connect" \
        % down in r.stderr
    names = os.listdir(spool)
    assert len([n for n in names if n.endswith(".envelope")]) == 2
    assert not [n for n in names if ".bad" in n or ".busy" in n]


def test_client_filter_ok_forwards(tmp_path, daemon):
    spool = _store(tmp_path, [b"one"])
    port = free_port()
    sink = smtp_sink(port)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--user", "root", "--spool-dir", spool,
                            "--client-filter", "net:" + daemon.address])
    finally:
        stop_process(sink)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not [n for n in os.listdir(spool) if ".envelope" in n],
             what="the spool to empty")
    assert len(daemon.requests) == 1
