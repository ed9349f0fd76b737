"""Policy daemons for tests: a line-per-request server like a site's `net:`
filter or verifier daemon, on TCP or a unix-domain socket.

`LineDaemon(answer)` listens on a free 127.0.0.1 port (or `port=`, or on
`path=`, a unix socket) and serves each connection in a thread of its own: it reads request
lines and calls `answer(line)`. The answer decides what the peer sees:

- bytes ending with a newline: sent, and the connection stays open;
- bytes without a newline (a half line): sent, then the connection closes;
- None: the connection closes without an answer;
- HANG: nothing is sent until the daemon stops (a slow daemon).

`requests` lists every request line received, `connections` counts
accepted connections; `drop_connections()` closes the open ones (as a
restarted daemon would), `stop()` ends everything. `address` is what
follows `net:` in a spec.
"""

import os
import socket
import threading

HANG = object()


class LineDaemon:
    def __init__(self, answer, path=None, port=0):
        self.answer = answer
        self.requests = []
        self.connections = 0
        self._open = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if path is None:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", port))
            self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(path)
            self.address = path
        self.path = path
        self.sock.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                while b"\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buf += data
                line, _, buf = buf.partition(b"\n")
                text = line.decode("utf-8", "replace")
                with self._lock:
                    self.requests.append(text)
                reply = self.answer(text)
                if reply is HANG:
                    self._stop.wait()
                    return
                if reply is None:
                    return
                conn.sendall(reply)
                if not reply.endswith(b"\n"):
                    return
        except OSError:
            return
        finally:
            conn.close()
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)

    def drop_connections(self):
        """Closes every open connection, keeping the listening socket."""
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.drop_connections()
        self._thread.join(5)
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
