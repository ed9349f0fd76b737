"""One-line requests to a policy daemon: `net:` filters and verifiers.

`Location.parse(text)` reads a transport address: `host:port`,
`[ipv6]:port`, `ipv6-literal:port`, a host name and port, or the absolute
path of a unix-domain socket. `RequestClient(location, timeout)` sends one
line and reads one line back with `request(line) -> str`; `timeout` bounds
the whole request, from the call to the answer (connecting and a second try
included), so that a filter or verifier timeout holds as written.

Connections are kept open between requests and reused, as E-MailRelay's
filter and verifier clients do; several sessions may ask at once, each on a
connection of its own (an idle connection is taken from a pool, or a new one
made). A kept connection that the daemon has closed is noticed and replaced
before the request is sent, or, if it goes during the request, the request
is made once more on a new connection. Every failure (cannot connect,
timeout, connection closed, no complete line) raises `RequestError` with a
short reason; the caller decides what that means (a temporary failure).
"""

import socket
import threading
import time

from ..util import addresses
from ..runtime import descriptors

RESPONSE_LIMIT = 10000


class RequestError(Exception):
    """The daemon could not be asked or gave no complete answer; str() is the reason."""


class Location:
    """Where a daemon listens: `family`, `address` (for connect or getaddrinfo)
    and `display` (the text as given, for log lines)."""

    def __init__(self, family, address, display):
        self.family = family
        self.address = address
        self.display = display

    @classmethod
    def parse(cls, text):
        """The Location for a transport address; raises ValueError."""
        text = text.strip()
        if text.startswith("/"):
            return cls(socket.AF_UNIX, text, text)
        if not text:
            raise ValueError("empty transport address")
        host, port = addresses.parse_hostport(text)
        return cls(None, (host, port), text)

    def connect(self, timeout):
        """A connected socket with `timeout` set; raises OSError."""
        if self.family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            return sock
        host, port = self.address
        sock = socket.create_connection((host, port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def describe(error):
    """A short reason for an OSError from connecting, sending or receiving."""
    if isinstance(error, socket.timeout):
        return "timeout"
    if isinstance(error, socket.gaierror):
        return "cannot resolve host: %s" % error.strerror
    return (error.strerror or str(error)).lower()


class RequestClient:
    """Line requests to one daemon; `request` may be called from several threads."""

    def __init__(self, location, timeout):
        self.location = location
        self.timeout = timeout
        self._idle = []
        self._lock = threading.Lock()

    def request(self, line):
        """Sends `line` (a str without line ending) and returns the answer line.

        The answer has its CR/LF ending removed. Raises RequestError.
        """
        data = line.encode("utf-8", "surrogateescape") + b"\n"
        deadline = time.monotonic() + self.timeout
        sock = self._take()
        if sock is not None:
            try:
                return self._exchange(sock, data, deadline)
            except _Gone:
                # The daemon closed a kept connection (restarted, or an idle
                # limit of its own): ask again on a new one, in the time left.
                pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestError("%s: timeout" % self.location.display)
        try:
            sock = self.location.connect(remaining)
        except OSError as e:
            raise RequestError("cannot connect to %s: %s"
                               % (self.location.display, describe(e))) from None
        try:
            return self._exchange(sock, data, deadline)
        except _Gone:
            raise RequestError("connection closed by %s" % self.location.display) from None

    def close(self):
        """Closes the kept connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _take(self):
        """A kept connection that still looks open, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            # An idle connection has nothing to read unless the daemon closed
            # it (end of input) or broke protocol (stray data): drop it then.
            if not descriptors.readable(sock, 0):
                return sock
            sock.close()

    def _exchange(self, sock, data, deadline):
        answer = bytearray()
        try:
            # (Never 0, which would make the socket non-blocking.)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                raise _Gone() from None
            while True:
                i = answer.find(b"\n")
                if i >= 0:
                    break
                if len(answer) > RESPONSE_LIMIT:
                    raise RequestError("response from %s too long" % self.location.display)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    if answer:
                        raise RequestError("incomplete response from %s" % self.location.display)
                    raise _Gone()
                answer += chunk
        except (_Gone, RequestError):
            sock.close()
            raise
        except socket.timeout:
            sock.close()
            raise RequestError("response timeout: %s" % self.location.display) from None
        except OSError as e:
            sock.close()
            raise RequestError("%s: %s" % (self.location.display, describe(e))) from None
        if i + 1 != len(answer):
            # More than one line: the daemon is out of step; do not reuse.
            sock.close()
        else:
            with self._lock:
                self._idle.append(sock)
        return answer[:i].rstrip(b"\r").decode("utf-8", "replace")


class _Gone(Exception):
    """The connection ended before any answer."""
