"""Clients that attack the session loop rather than speak the protocol.

Every test runs the real program and measures what a user of the server
sees: its memory (VmHWM from /proc), how soon an unrelated client is
served, and when a client is cut off.
"""

import smtplib
import socket
import ssl
import threading
import time

import pytest

from certs import certs  # noqa: F401  (a pytest fixture)
from helpers import Relay, wait_for
from test_pop_clients import auth_file

MIB = 1024 * 1024


def _peak_bytes(pid):
    """The process's peak resident set size (VmHWM), in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _feed_unfinished(port, command, total, stall=5.0):
    """Sends `total` octets of pipelined `command`s, never reading a reply.

    Every send ends in the middle of a command, so the server always has
    input buffered. Returns the octets the server took before it stopped
    reading (a send that makes no progress for `stall` seconds).
    """
    line = command + b"\r\n"
    block = line[3:] + line * (65536 // len(line)) + line[:3]
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(stall)
        try:
            while sent < total:
                s.sendall(block)
                sent += len(block)
        except socket.timeout:
            pass
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    return sent


@pytest.mark.parametrize("protocol,command", [
    ("smtp", b"NOOP"),
    ("pop", b"CAPA"),
    ("admin", b"help"),
])
def test_a_client_that_never_reads_its_replies_costs_bounded_memory(tmp_path, protocol, command):
    # 50 MiB of commands pipelined with never a complete batch, from a
    # client that reads nothing: the replies owed must stop the server
    # reading, not pile up.
    args = ["--pop-auth", auth_file(tmp_path)] if protocol == "pop" else []
    with Relay(tmp_path, args, pop=protocol == "pop", admin=protocol == "admin") as relay:
        port = {"smtp": relay.port, "pop": relay.pop_port, "admin": relay.admin_port}[protocol]
        sent = _feed_unfinished(port, command, 50 * MIB)
        peak = _peak_bytes(relay.proc.pid)
    assert peak < 64 * MIB, "%s: peak RSS %.0f MiB after %.1f MiB of %s" % (
        protocol, peak / MIB, sent / MIB, command.decode())
    assert sent < 50 * MIB, "the server read all %.1f MiB" % (sent / MIB)


def _hammer(port, source, stop, block):
    """Pipelines `block` again and again from `source`, never reading, until `stop`."""
    try:
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
    except OSError:
        return
    with s:
        s.settimeout(0.5)
        while not stop.is_set():
            try:
                s.sendall(block)
            except socket.timeout:
                continue
            except OSError:
                return
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")


def _greeting_and_transaction(port):
    """Seconds to the greeting, and to the end of one message's transaction."""
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=120, source_address=("127.0.0.2", 0)) as c:
        greeted = time.monotonic() - start
        c.sendmail("a@x.test", ["b@y.test"], b"Subject: prompt\r\n\r\nhello\r\n")
        done = time.monotonic() - start
    return greeted, done


def test_clients_that_pipeline_and_never_read_do_not_delay_another(tmp_path):
    # 40 clients (from two addresses) pipeline NOOPs without end and read
    # nothing; each gets its turn, but only a turn, so a client from a
    # third address is greeted and served promptly meanwhile.
    block = b"P\r\n" + b"NOOP\r\n" * 10000 + b"NOO"
    with Relay(tmp_path) as relay:
        stop = threading.Event()
        hammers = [threading.Thread(target=_hammer, args=(relay.port, "127.0.0.%d" % (3 + i % 2),
                                                          stop, block))
                   for i in range(40)]
        for t in hammers:
            t.start()
        try:
            wait_for(lambda: relay.log().count("smtp connection from") >= 40,
                     what="the 40 clients to connect")
            times = [_greeting_and_transaction(relay.port) for _ in range(3)]
        finally:
            stop.set()
            for t in hammers:
                t.join(30)
        assert len(relay.files(".envelope")) == 3
    worst = max(done for _, done in times)
    assert worst < 5, "greeting and transaction took %s s" % (
        ", ".join("%.1f/%.1f" % pair for pair in times))


def test_half_closed_clients_with_pipelined_junk_do_not_delay_another(tmp_path):
    # 200 clients each send 128 KiB of NOOPs, close their sending side and
    # never read: the server has all that input to work through at once
    # (with end of input already seen), yet another client's greeting and
    # transaction come promptly.
    block = b"NOOP\r\n" * (128 * 1024 // 6)
    with Relay(tmp_path, ["--max-connections", "1000"]) as relay:
        held = []

        def junk(source):
            for _ in range(20):
                s = socket.socket()
                held.append(s)
                s.bind((source, 0))
                s.connect(("127.0.0.1", relay.port))
                s.settimeout(5)
                try:
                    s.sendall(block)
                except socket.timeout:
                    pass
                s.shutdown(socket.SHUT_WR)

        senders = [threading.Thread(target=junk, args=("127.0.0.%d" % (3 + i),))
                   for i in range(10)]
        for t in senders:
            t.start()
        try:
            for t in senders:
                t.join(120)
            times = [_greeting_and_transaction(relay.port) for _ in range(3)]
        finally:
            for s in held:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                s.close()
        assert len(relay.files(".envelope")) == 3
    worst = max(done for _, done in times)
    assert worst < 5, "greeting and transaction took %s s" % (
        ", ".join("%.1f/%.1f" % pair for pair in times))


def _dribble(port, command, tls=False, limit=30.0):
    """Starts a transaction with `command` (DATA or BDAT), then sends its text
    one octet every 0.1 s until the server answers or closes.

    With `tls`, STARTTLS first. Returns (seconds dribbled, what the server
    sent after the text began).
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    if tls:
        s.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        s = context.wrap_socket(s)
        f = s.makefile("rb")
    with s:
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
        replies = 3
        while replies:
            replies -= f.readline()[3:4] == b" "
        s.sendall(command)
        # DATA's text follows its 354; BDAT's follows the command at once.
        if command.startswith(b"DATA"):
            assert f.readline().startswith(b"354")
        began = time.monotonic()
        got = b""
        # The pace of the dribble: each octet waits for an answer this long.
        s.settimeout(0.1)
        while time.monotonic() - began < limit:
            try:
                s.sendall(b"x")
                data = s.recv(1000)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            got += data
        return time.monotonic() - began, got


@pytest.mark.parametrize("command,tls", [
    (b"DATA\r\n", False),
    (b"BDAT 100000 LAST\r\n", False),
    (b"DATA\r\n", True),      # a TLS session runs in a thread of its own
])
def test_a_client_dribbling_its_text_is_cut_off_by_the_min_data_rate(tmp_path, certs,  # noqa: F811
                                                                     command, tls):
    # Ten octets a second, each well within the idle timeout: the text may
    # take 2 s plus 1/100 s per octet, so the client is cut off after
    # about 2.2 s, whatever the idle timeout would allow.
    args = ["--idle-timeout", "2", "--min-data-rate", "100", "--server-smtp-config", "+chunking",
            "--server-tls", "--server-tls-certificate", certs.server]
    with Relay(tmp_path, args) as relay:
        took, got = _dribble(relay.port, command, tls)
        assert got.startswith(b"421 relay.test data timeout: message text too slow\r\n"), got
        assert 2 <= took < 20, took
        relay.wait_log(r"smtp: message text too slow \(under --min-data-rate 100 octets/s\)")
        # A client at a fair rate is not affected.
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: fair\r\n\r\n" + b"y" * 100000)
        assert len(relay.files(".content")) == 1
