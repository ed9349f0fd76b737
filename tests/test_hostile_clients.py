"""Clients that attack the session loop rather than speak the protocol.

Every test runs the real program and measures what a user of the server
sees: its memory (VmHWM from /proc), how soon an unrelated client is
served, and when a client is cut off.
"""

import smtplib
import socket
import threading
import time

import pytest

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
