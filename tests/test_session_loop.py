"""The session loop: plain SMTP sessions parked in one thread, work in a pool that grows as calls wait."""

import os
import smtplib
import socket
import threading
import time

import pytest

from emailrelay.config import options
from emailrelay.net import call_pool, connection, requests, session_loop
from emailrelay.runtime import device_waits
from emailrelay.server import admin, pop_server, smtp_server
from emailrelay.store import spool
from helpers import Relay, wait_for


def _threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def test_many_idle_connections_are_held_without_a_thread_each(tmp_path):
    with Relay(tmp_path, ["--max-connections", "400", "--max-connections-per-address", "400"]) as relay:
        before = _threads(relay.proc.pid)
        held = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
                held.append(s)
            for s in held:
                assert s.makefile("rb").readline().startswith(b"220 ")
            during = _threads(relay.proc.pid)
            # A message still goes through while they wait.
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                c.sendmail("a@x.test", ["b@y.test"], b"Subject: among many\r\n\r\nhi\r\n")
        finally:
            for s in held:
                s.close()
        wait_for(lambda: len(relay.files(".envelope")) == 1, what="the message")
    assert during - before < 10, (before, during)


def test_pop_and_admin_sessions_each_have_a_thread_and_still_work(tmp_path):
    auth = tmp_path / "pop.auth"
    auth.write_text("server plain alice secret\n")
    auth.chmod(0o600)
    with Relay(tmp_path, ["--pop-auth", str(auth)], pop=True, admin=True) as relay:
        before = _threads(relay.proc.pid)
        held = []
        try:
            for _ in range(5):
                pop = socket.create_connection(("127.0.0.1", relay.pop_port), timeout=10)
                held.append(pop)
                assert pop.makefile("rb").readline().startswith(b"+OK ")
                watcher = socket.create_connection(("127.0.0.1", relay.admin_port), timeout=10)
                held.append(watcher)
                watcher.sendall(b"pid\r\n")
                assert watcher.makefile("rb").readline() == b"%d\r\n" % relay.proc.pid
            during = _threads(relay.proc.pid)
            # One more of each, served to its end while the others wait.
            with socket.create_connection(("127.0.0.1", relay.pop_port), timeout=10) as pop:
                f = pop.makefile("rb")
                f.readline()
                pop.sendall(b"USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n")
                assert [f.readline() for _ in range(4)][2] == b"+OK 0 0\r\n"
            with socket.create_connection(("127.0.0.1", relay.admin_port), timeout=10) as a:
                a.sendall(b"list\r\nquit\r\n")
                assert a.makefile("rb").readline() == b"<none>\r\n"
        finally:
            for s in held:
                s.close()
    # POP and admin sessions block inline (THREAD_ONLY): a thread each.
    assert during - before >= 10, (before, during)


@pytest.mark.parametrize("protocol", ["pop", "admin"])
def test_the_loop_refuses_a_thread_only_session_and_starts_nothing(protocol):
    cfg = options.parse(["--pop"])
    pair = _Pair()
    loop = session_loop.SessionLoop(name="toy")
    ended = threading.Event()
    try:
        if protocol == "pop":
            session = pop_server.PopSession(pair.conn, pop_server.PopServices(
                settings=pop_server.PopSettings.from_config(cfg)))
        else:
            session = admin.AdminSession(pair.conn, admin.AdminServices(
                settings=admin.AdminSettings.from_config(cfg)))
        with pytest.raises(ValueError, match="thread-only"):
            loop.add(session, pair.conn, ended.set)
        pair.theirs.settimeout(0.3)
        with pytest.raises(socket.timeout):
            pair.theirs.recv(1)    # no greeting: the conversation never started
        assert not ended.is_set()
    finally:
        loop.stop()
        pair.close()
    assert not smtp_server.SmtpSession.THREAD_ONLY


def test_pipelined_commands_around_a_verifier_get_their_replies_in_order(tmp_path):
    verifier = tmp_path / "verifier"
    verifier.write_text('#!/bin/sh\necho ""; echo "$1"; exit 1\n')
    verifier.chmod(0o755)
    with Relay(tmp_path, ["--address-verifier", str(verifier)]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                      b"RCPT TO:<c@y.test>\r\nDATA\r\n")
            while f.readline().startswith(b"250-"):
                pass    # the EHLO reply, up to its last line
            lines = [f.readline() for _ in range(4)]
            s.sendall(b"hi\r\n.\r\nQUIT\r\n")
            lines += [f.readline(), f.readline()]
    assert lines == [b"250 sender <a@x.test> OK\r\n", b"250 recipient <b@y.test> OK\r\n",
                     b"250 recipient <c@y.test> OK\r\n",
                     b"354 start mail input -- end with <CRLF>.<CRLF>\r\n",
                     b"250 message processed\r\n", b"221 OK\r\n"]


class _Pair:
    """A LoopConnection over one end of a socket pair, the other end for the test."""

    def __init__(self):
        self.ours, self.theirs = socket.socketpair()
        self.conn = session_loop.LoopConnection(self.ours, ("127.0.0.1", 1), ("127.0.0.1", 25))

    def feed(self, data):
        self.theirs.sendall(data)
        wait_for(lambda: self.conn.receive() or self.conn.buffered() or self.conn.eof,
                 what="input")

    def close(self):
        self.ours.close()
        self.theirs.close()


def test_loop_connection_lines_and_overlong_lines_as_readline_gives_them():
    pair = _Pair()
    try:
        assert pair.conn.next_line(10, pair.conn.eof) is None
        pair.feed(b"NOOP\r\nxx")
        assert pair.conn.next_line(10, pair.conn.eof) == b"NOOP\r\n"
        assert pair.conn.next_line(10, pair.conn.eof) is None
        # An overlong line is dropped as it arrives and reported at its end.
        pair.feed(b"y" * 20)
        assert pair.conn.next_line(10, pair.conn.eof) is None
        pair.feed(b"yyy\r\nQUIT\r\n")
        with pytest.raises(connection.LineTooLong):
            pair.conn.next_line(10, pair.conn.eof)
        assert pair.conn.next_line(10, pair.conn.eof) == b"QUIT\r\n"
        pair.theirs.shutdown(socket.SHUT_WR)
        wait_for(lambda: pair.conn.receive() or pair.conn.eof, what="end of input")
        assert pair.conn.next_line(10, pair.conn.eof) == b""
        assert pair.conn.take(10) == b""
    finally:
        pair.close()


def test_loop_connection_output_to_a_vanished_peer_is_dropped_not_raised():
    pair = _Pair()
    pair.theirs.close()
    pair.conn.write(b"250 OK\r\n" * 100000)
    pair.conn.flush()
    pair.conn.flush()
    assert pair.conn.broken and pair.conn.eof and not pair.conn._out
    pair.ours.close()


def _peak_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_message_streams_through_the_loop_in_flat_memory(tmp_path):
    size = 100 * 1024 * 1024
    line = b"x" * 998 + b"\r\n"
    with Relay(tmp_path) as relay:
        before = _peak_kib(relay.proc.pid)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            while not f.readline().startswith(b"354"):
                pass
            block = line * 1024
            blocks = size // len(block)
            for _ in range(blocks):
                s.sendall(block)
            s.sendall(b".\r\nQUIT\r\n")
            assert f.readline() == b"250 message processed\r\n"
        growth = _peak_kib(relay.proc.pid) - before
        [name] = relay.files(".content")
        assert os.path.getsize(os.path.join(relay.spool, name)) > blocks * len(block)
    assert growth < 20 * 1024, "peak memory grew by %d KiB" % growth


def test_a_client_gone_during_a_slow_filter_costs_no_cpu_meanwhile(tmp_path):
    flt = tmp_path / "filter"
    marker = tmp_path / "started"
    flt.write_text('#!/bin/sh\ntouch %s\nsleep 2\nexit 0\n' % marker)
    flt.chmod(0o755)
    with Relay(tmp_path, ["--filter", str(flt)]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            while not f.readline().startswith(b"354"):
                pass
            s.sendall(b"hi\r\n.\r\n")
            wait_for(marker.exists, what="the filter to start")
            f.close()
        # The client has gone while the filter runs: the loop must not spin.
        with open("/proc/%d/stat" % relay.proc.pid) as stat:
            before = sum(int(x) for x in stat.read().rsplit(")", 1)[1].split()[11:13])
        wait_for(lambda: relay.files(".envelope"), timeout=15, what="the message")
        with open("/proc/%d/stat" % relay.proc.pid) as stat:
            after = sum(int(x) for x in stat.read().rsplit(")", 1)[1].split()[11:13])
    ticks = os.sysconf("SC_CLK_TCK")
    assert (after - before) / ticks < 0.5, "the server used %.2fs of CPU" % ((after - before) / ticks)


class _Jobs:
    """A toy conversation of calls; records the thread each ran in."""

    def __init__(self, conn):
        self.conn = conn
        self.threads = []

    @device_waits.device_bound
    def quick_but_busy(self):
        # Wall time spent on the CPU (as under a tracer, or on a busy
        # machine), but no wait for a device.
        end = time.monotonic() + 2 * session_loop.QUICK
        while time.monotonic() < end:
            pass
        self.threads.append(threading.current_thread().name)

    @device_waits.device_bound
    def waiting(self):
        device_waits.timed(time.sleep, 2 * session_loop.QUICK)
        self.threads.append(threading.current_thread().name)

    def unmarked(self):
        self.threads.append(threading.current_thread().name)

    def conversation(self):
        for _ in range(3):
            yield requests.call(self.quick_but_busy)
        for _ in range(3):
            yield requests.call(self.waiting)
        yield requests.call(self.unmarked)


def test_device_bound_calls_stay_in_the_loop_thread_unless_they_wait():
    pair = _Pair()
    loop = session_loop.SessionLoop(name="toy")
    done = threading.Event()
    try:
        jobs = _Jobs(pair.conn)
        loop.add(jobs, pair.conn, done.set)
        assert done.wait(10)
    finally:
        loop.stop()
        pair.close()
    # A device-bound function is tried in the loop once; one that waited
    # then goes to the pool, and so does every unmarked call.
    assert jobs.threads == ["toy loop"] * 4 + ["toy work"] * 3


def test_a_decorated_commit_is_marked_device_bound(tmp_path):
    msg = spool.Spool(str(tmp_path)).new_message()
    try:
        assert device_waits.is_device_bound(msg.finish)
        assert not device_waits.is_device_bound(msg.abandon)
    finally:
        msg.abandon()


class _Call:
    """A toy conversation of one "call" request."""

    def __init__(self, conn, fn, args=()):
        self.conn = conn
        self.fn = fn
        self.args = args

    def conversation(self):
        yield ("call", self.fn, self.args)


def _workers(name):
    return sum(1 for t in threading.enumerate() if t.name == name)


def test_the_pool_starts_a_thread_for_every_waiting_call_and_ends_idle_ones(monkeypatch):
    monkeypatch.setattr(call_pool, "IDLE_EXIT", 0.2)
    loop = session_loop.SessionLoop(name="burst")
    release = threading.Event()
    pairs = [_Pair() for _ in range(31)]
    ended = [threading.Event() for _ in pairs]
    try:
        # Thirty calls that wait, made at once: each gets a thread.
        for pair, done in zip(pairs[:30], ended):
            loop.add(_Call(pair.conn, release.wait, (30,)), pair.conn, done.set)
        wait_for(lambda: _workers("burst work") == 30, what="a thread per waiting call")
        # A call made meanwhile does not wait for them.
        loop.add(_Call(pairs[30].conn, time.sleep, (0,)), pairs[30].conn, ended[30].set)
        assert ended[30].wait(10)
        assert not any(done.is_set() for done in ended[:30])
        release.set()
        for done in ended:
            assert done.wait(10)
        wait_for(lambda: _workers("burst work") == 0, what="idle threads to end")
    finally:
        release.set()
        loop.stop()
        for pair in pairs:
            pair.close()
