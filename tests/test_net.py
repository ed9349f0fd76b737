"""The connection object: line limits, pushback, buffered writes, interface parsing."""

import socket
import threading

import pytest

from emailrelay.config import options
from emailrelay.net import connection, listen_sockets, listeners
from emailrelay.server import pop_server
from memory_connection import MemoryConnection


def test_readline_splits_chunks_and_keeps_endings():
    c = MemoryConnection([b"HELO a", b"\r\nNOOP\r\nQU", b"IT\r\n"])
    assert c.readline() == b"HELO a\r\n"
    assert c.pending()
    assert c.readline() == b"NOOP\r\n"
    assert c.readline() == b"QUIT\r\n"
    assert c.readline() == b""


def test_overlong_line_is_consumed_and_reported_then_reading_goes_on():
    c = MemoryConnection([b"X" * 300, b"Y" * 300, b"Z" * 300 + b"\r\nNOOP\r\n"])
    with pytest.raises(connection.LineTooLong):
        c.readline(limit=512)
    assert c.readline(limit=512) == b"NOOP\r\n"


def test_overlong_line_buffering_is_bounded():
    big = [b"A" * 65536] * 64  # 4 MiB without a newline
    c = MemoryConnection(big + [b"\r\n"])
    with pytest.raises(connection.LineTooLong):
        c.readline(limit=1000)
    assert len(c._buf) == 0


def test_read_and_unread():
    c = MemoryConnection(b"0123456789")
    assert c.read(4) == b"0123"
    c.unread(b"xy")
    assert c.read(100) == b"xy456789"
    assert c.read(1) == b""


def test_parse_interfaces():
    got = listen_sockets.parse_interfaces(["127.0.0.1,smtp=::1", "pop=127.0.0.2", "admin=fd#3"])
    assert got == {None: ["127.0.0.1"], "smtp": ["::1"], "pop": ["127.0.0.2"], "admin": ["fd#3"]}
    for bad in (["nosuchif9"], ["imap=127.0.0.1"], ["fd#x"]):
        with pytest.raises(ValueError):
            listen_sockets.parse_interfaces(bad)


def test_socket_connection_writes_are_buffered_until_flush():
    a, b = socket.socketpair()
    conn = connection.Connection.__new__(connection.Connection)
    connection.Buffered.__init__(conn)
    conn.sock, conn.peer, conn.local = a, ("127.0.0.1", 1), ("127.0.0.1", 2)
    conn.write(b"250 one\r\n")
    conn.write(b"250 two\r\n")
    b.settimeout(0.2)
    with pytest.raises(socket.timeout):
        b.recv(100)
    conn.flush()
    b.settimeout(5)
    assert b.recv(100) == b"250 one\r\n250 two\r\n"
    conn.settimeout(0.05)
    with pytest.raises(connection.Timeout):
        conn.readline()
    a.close()
    b.close()


def test_server_refuses_over_the_connection_cap():
    stop = threading.Event()
    server = listeners.Server(max_connections=1, max_per_address=5)
    release = threading.Event()

    def handler(conn):
        conn.write(b"hello\r\n")
        conn.flush()
        release.wait(10)

    server.add("smtp", {None: ["127.0.0.1"]}, 0, handler, busy_reply=b"421 busy\r\n")
    port = server.listeners[0].sock.getsockname()[1]
    t = threading.Thread(target=server.serve, args=(stop,))
    t.start()
    try:
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert first.recv(100) == b"hello\r\n"
        second = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert second.recv(100) == b"421 busy\r\n"
        assert second.recv(100) == b""
        second.close()
        release.set()
        first.close()
    finally:
        release.set()
        stop.set()
        server.wake()
        t.join(10)
    assert not t.is_alive()


def test_a_thread_only_session_handed_to_the_session_loop_fails_alone():
    # A wiring mistake (a POP conversation for the loop) costs the client
    # its session, and nothing else: the budget is freed, the loop lives.
    services = pop_server.PopServices(
        settings=pop_server.PopSettings.from_config(options.parse(["--pop"])))
    stop = threading.Event()
    server = listeners.Server(max_connections=1, max_per_address=1)
    server.add("pop", {None: ["127.0.0.1"]}, 0, lambda conn: None,
               conversation=lambda conn: pop_server.PopSession(conn, services),
               busy_reply=b"-ERR busy\r\n")
    port = server.listeners[0].sock.getsockname()[1]
    t = threading.Thread(target=server.serve, args=(stop,))
    t.start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                assert c.recv(100) == b""
        assert server.counters == {"connections": 3, "refused": 0}
    finally:
        stop.set()
        server.wake()
        t.join(10)
    assert not t.is_alive()
