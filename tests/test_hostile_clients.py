"""Clients that attack the session loop rather than speak the protocol.

Every test runs the real program and measures what a user of the server
sees: its memory (VmHWM from /proc), how soon an unrelated client is
served, and when a client is cut off.
"""

import socket
import time

import pytest

from helpers import Relay
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
