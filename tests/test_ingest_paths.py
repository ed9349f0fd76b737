"""The fast paths of ingest: storing without a filter, reused session threads."""

import os
import socket
import threading

from emailrelay.net import listeners
from emailrelay.store import spool as spool_mod
from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool

from helpers import wait_for


def test_finish_without_write_envelope_stores_the_message(tmp_path):
    s = Spool(str(tmp_path))
    m = s.new_message()
    m.write(b"a" * (spool_mod.WRITE_BLOCK + 10))
    m.write(b"b\r\n")
    mid = m.finish(Envelope(from_="a@b", to_remote=["c@d"]))
    assert (tmp_path / (mid + ".content")).read_bytes() == b"a" * (spool_mod.WRITE_BLOCK + 10) + b"b\r\n"
    assert os.stat(str(tmp_path / (mid + ".envelope"))).st_size > 0
    assert s.ids() == [mid]


def test_session_threads_are_reused(tmp_path):
    stop = threading.Event()
    server = listeners.Server(max_connections=5, max_per_address=5)
    seen = []

    def handler(conn):
        seen.append((threading.get_ident(), conn.local))
        conn.write(b"bye\r\n")
        conn.flush()

    server.add("smtp", {None: ["127.0.0.1"]}, 0, handler)
    port = server.listeners[0].sock.getsockname()[1]
    t = threading.Thread(target=server.serve, args=(stop,))
    t.start()
    try:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                assert c.recv(100) == b"bye\r\n"
                assert c.recv(100) == b""
            # The thread is back in the pool once its clean-up is done.
            wait_for(lambda: server._idle == 1, 5, what="an idle session thread")
    finally:
        stop.set()
        server.wake()
        t.join(10)
    assert not t.is_alive()
    assert len(seen) == 5
    assert all(local == ("127.0.0.1", port) for _, local in seen)
    # One connection at a time: the first thread served them all.
    assert len({ident for ident, _ in seen}) == 1
