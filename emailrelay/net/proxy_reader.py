"""Reading the PROXY headers of accepted connections, in one thread for all of them.

With --proxy-protocol a listener's connections come from a load balancer,
and each starts with a header naming the real client (`proxy_header`).
Until it has arrived nothing is known about the client, so neither the
open-relay guard nor the connection budgets can be applied: the accept
loop hands the socket here and goes on accepting. This thread peeks at
what has arrived, takes exactly the header's octets (what follows stays in
the socket for the session, a TLS handshake included) and passes the
header on; a connection whose header is malformed, missing after the
timeout or cut short is logged and closed, before any session sees it.

Why a thread of its own rather than the accept loop or the session loop:
the header must be read before admission, for SMTP and POP alike, and
waiting for it must block neither accepting nor the sessions.
"""

import collections
import selectors
import socket
import threading
import time

from ..runtime import log
from ..util import addresses
from . import proxy_header


class _Waiting:
    """One connection whose header is being read."""

    __slots__ = ("sock", "kind", "peer", "timeout", "deadline", "parser", "done", "over")

    def __init__(self, sock, kind, peer, timeout, done):
        self.sock = sock
        self.kind = kind
        self.peer = peer
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.parser = proxy_header.Parser()
        self.done = done
        self.over = False


class HeaderReader:
    """Reads PROXY headers for the listeners of one `listeners.Server`.

    `add(sock, kind, addr, timeout, done)` (from any thread) reads the
    header of an accepted socket and calls `done(header)` in this thread
    once it has all arrived; failures are logged (as `kind`) and the socket
    closed. `waiting()` is how many headers are awaited; `stop()` closes
    those connections and ends the thread.
    """

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._inbox = []
        self._count = 0
        self._stopping = False
        # Oldest first; every listener of a server has the same timeout,
        # so deadlines come in order.
        self._queue = collections.deque()
        self._thread = threading.Thread(target=self._run, name="proxy header", daemon=True)
        self._thread.start()

    def add(self, sock, kind, addr, timeout, done):
        """Reads the header of `sock` (accepted from `addr`) within `timeout` seconds."""
        peer = addresses.format_address(addr[0], addr[1])
        item = _Waiting(sock, kind, peer, timeout, done)
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._inbox.append(item)
            self._count += 1
        self._wake()

    def waiting(self):
        """Connections whose header has not arrived yet."""
        with self._lock:
            return self._count

    def stop(self):
        """Closes the connections still without a header and ends the thread."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(5)

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self):
        try:
            while True:
                timeout = None
                if self._queue:
                    timeout = max(self._queue[0].deadline - time.monotonic(), 0)
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        try:
                            self._read(key.data)
                        except Exception as e:  # a bug must not stop every header
                            self._end(key.data, "%s: %s" % (type(e).__name__, e))
                with self._lock:
                    new, self._inbox = self._inbox, []
                    stopping = self._stopping
                for item in new:
                    item.sock.setblocking(False)
                    self._selector.register(item.sock, selectors.EVENT_READ, item)
                    self._queue.append(item)
                if stopping:
                    for item in self._queue:
                        if not item.over:   # (the others belong to their sessions now)
                            self._end(item, None)
                    return
                self._expire(time.monotonic())
        finally:
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self):
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _expire(self, now):
        queue = self._queue
        while queue and (queue[0].over or queue[0].deadline <= now):
            item = queue.popleft()
            if not item.over:
                self._end(item, "none within %gs" % item.timeout)

    def _read(self, item):
        """Takes what has arrived of the header (peeked first: never an octet past it)."""
        sock = item.sock
        try:
            data = sock.recv(item.parser.wanted(), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._end(item, "connection error: %s" % (e.strerror or e))
            return
        if not data:
            self._end(item, "connection ended %s the header"
                      % ("inside" if item.parser.started() else "before"))
            return
        try:
            taken = item.parser.feed(data)
        except proxy_header.HeaderError as e:
            self._end(item, str(e))
            return
        sock.recv(taken)
        header = item.parser.header
        if header is None:
            return
        self._forget(item)
        try:
            item.done(header)
        except Exception as e:  # a failure here must not stop other connections' headers
            log.error("%s: after the PROXY header from %s: %s: %s"
                      % (item.kind, item.peer, type(e).__name__, e))
            sock.close()

    def _end(self, item, reason):
        """Closes a connection without a valid header, logging `reason` (None: at shutdown)."""
        self._forget(item)
        if reason is not None:
            log.warning("%s: bad PROXY header from %s: %s: connection closed"
                        % (item.kind, item.peer, reason))
        sock = item.sock
        try:
            # What the peer sent is read first, so that it sees the
            # connection end rather than reset.
            for _ in range(16):
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        sock.close()

    def _forget(self, item):
        if item.over:
            return
        item.over = True
        self._selector.unregister(item.sock)
        with self._lock:
            self._count -= 1
