"""The connection object protocol sessions use, over a socket, two fds or bytes.

Protocol sessions never see a socket: they get a `Connection` (or `FdConnection`
for --bsmtp and --inetd on a pipe, or in unit tests tests/'s `MemoryConnection`) with
buffered line and block reads, buffered writes, and a server-side TLS upgrade.
Timeouts raise `Timeout`, a peer that vanishes mid-write raises `Closed`, and
a line over its limit raises `LineTooLong` after it has been consumed.
"""

import os
import socket
import ssl
import struct

from ..runtime import descriptors

RECV_SIZE = 65536
# Writes are buffered for pipelining; a large backlog is sent at once.
WRITE_HIGH_WATER = 65536
# Seconds an implicit-TLS client has for its handshake.
TLS_HANDSHAKE_TIMEOUT = 60
# Input buffered for a session that is busy elsewhere: past this much the
# session loop stops reading its socket.
READ_HIGH_WATER = 65536


class LineTooLong(Exception):
    """A line exceeded the limit; the rest of it has been read and dropped."""


class Timeout(Exception):
    """Nothing arrived from the peer within the idle timeout."""


class Closed(Exception):
    """The peer went away while we were writing."""


class Buffered:
    """Line and block reading over a `_recv()` primitive, with pushback.

    The base of every connection look-alike: a subclass gives `_recv()`
    (bytes, b'' at the end), `_send(data)`, `settimeout`, `starttls` and
    `close` (the test double `MemoryConnection` in tests/ is one).
    """

    def __init__(self):
        self._buf = bytearray()
        self._out = bytearray()
        self._overlong = False      # the line being received is over its limit
        self.tls = False
        self.tls_cipher = None      # (cipher, protocol, secret bits) once TLS is active
        self.peer_certificate_pem = ""

    def _fill(self):
        data = self._recv()
        if data:
            self._buf += data
        return bool(data)

    def pending(self):
        """True when input is already buffered (the client pipelined)."""
        return bool(self._buf)

    def readline(self, limit=1000):
        """Reads one line including its ending (LF, CRLF); b'' at end of input.

        A line longer than `limit` octets raises LineTooLong after everything
        up to and including its LF has been consumed, so the caller can reply
        and carry on; memory never grows past `limit` plus one receive.
        Input that ends without a line ending is returned as it is.
        """
        while True:
            line = self.next_line(limit, at_end=False)
            if line is not None:
                return line
            if not self._fill():
                return self.next_line(limit, at_end=True)

    def next_line(self, limit, at_end):
        """The next line from the buffered input, as `readline` gives it, or None.

        None means that more input is needed; `at_end` says that none will
        come, so what is buffered is the last line (b'' when nothing is). The
        one line-framing rule of every connection, the session loop's too: an
        overlong line is dropped as it arrives and reported by LineTooLong
        once its end has been consumed.
        """
        buf = self._buf
        i = buf.find(b"\n")
        if i >= 0:
            line = bytes(buf[:i + 1])
            del buf[:i + 1]
            if self._overlong or len(line) > limit:
                self._overlong = False
                raise LineTooLong()
            return line
        if len(buf) > limit:
            self._overlong = True
            buf.clear()
        if not at_end:
            return None
        if self._overlong:
            self._overlong = False
            raise LineTooLong()
        line = bytes(buf)
        buf.clear()
        return line

    def buffered(self):
        """Octets of input received and not yet read."""
        return len(self._buf)

    def discard_input(self):
        """Forgets the input received and not yet read."""
        self._buf.clear()

    def unsent(self):
        """Octets queued by write() and not yet sent."""
        return len(self._out)

    def hand_over_output(self, other):
        """Moves the output not yet sent to `other`, which takes over the peer."""
        other._out += self._out
        self._out.clear()

    def read(self, n):
        """Reads at most `n` octets (at least one), or b'' at end of input."""
        if not self._buf and not self._fill():
            return b""
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def unread(self, data):
        """Puts `data` back in front of the input (bytes read too far)."""
        if data:
            self._buf[:0] = data

    def write(self, data):
        """Queues `data`; it is sent by flush(), or at once when the queue is large."""
        self._out += data
        if len(self._out) >= WRITE_HIGH_WATER:
            self.flush()

    def flush(self):
        """Sends everything queued by write()."""
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            self._send(data)


class Connection(Buffered):
    """A connected socket as a session sees it.

    `peer` and `local` are (ip, port) tuples; `tls` says whether TLS is
    active, and `tls_cipher` is then ssl's (cipher, protocol, secret bits);
    `peer_certificate_pem` holds a verified client certificate (or '').
    Timeouts raise `Timeout`; a peer that vanishes mid-write raises
    `Closed`; end of input is b'' from readline/read.
    """

    def __init__(self, sock, peer=None, local=None):
        """`peer` and `local` may be given when known (from accept() and a
        listener's specific address), saving the look-ups."""
        super().__init__()
        self.sock = sock
        self.peer = address_pair(peer or sock.getpeername())
        self.local = address_pair(local or sock.getsockname())
        self._timeout = sock.gettimeout()

    def _recv(self):
        try:
            return self.sock.recv(RECV_SIZE)
        except (socket.timeout, BlockingIOError):
            raise Timeout() from None
        except OSError:
            # Reset, TLS alert, closed under us at shutdown: the peer is gone.
            return b""

    def _send(self, data):
        try:
            self.sock.sendall(data)
        except (socket.timeout, BlockingIOError):
            raise Timeout() from None
        except OSError as e:
            raise Closed(str(e)) from None

    def settimeout(self, seconds):
        """Sets the idle timeout for reads and writes (None: no timeout)."""
        self._timeout = seconds
        if self.tls:
            self.sock.settimeout(seconds)
            return
        # A kernel timeout on a blocking socket: Python's own socket timeout
        # polls before every recv and send, which doubles the system calls on
        # the hot path (and the points where session threads contend).
        if self.sock.gettimeout() is not None:
            self.sock.settimeout(None)
        tv = _timeval(seconds or 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def starttls(self, context):
        """Upgrades to TLS as the server, after flushing our reply.

        Anything the client sent before the handshake is discarded (the
        CVE-2011-0411 class of injection). Raises OSError/ssl.SSLError on a
        failed handshake.
        """
        self.flush()
        self._buf.clear()
        self.accept_tls(context)

    def accept_tls(self, context):
        """Starts TLS at once, for implicit-TLS ports (SMTPS, POP3S).

        Before a session has set its own timeout, the handshake gets
        TLS_HANDSHAKE_TIMEOUT seconds.
        """
        if self._timeout is None:
            self.settimeout(TLS_HANDSHAKE_TIMEOUT)
        # TLS needs Python's timeout handling, not the kernel's.
        zero = _timeval(0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, zero)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, zero)
        self.sock.settimeout(self._timeout)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        self.tls_cipher = self.sock.cipher()
        der = self.sock.getpeercert(binary_form=True)
        if der:
            self.peer_certificate_pem = ssl.DER_cert_to_PEM_cert(der)

    def close(self):
        """Flushes what it can and closes the socket."""
        try:
            self.flush()
        except (Closed, Timeout):
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class FdConnection(Buffered):
    """A `Connection` look-alike over two file descriptors that are not a socket.

    For --bsmtp and --inetd on a pipe: reads from `rfd` (a pipe, a file or
    a terminal), writes to `wfd`. `peer` is given by the caller, since a
    pipe has no address; there is no TLS. The idle timeout is kept with
    poll(), which a regular file always passes.
    """

    def __init__(self, rfd, wfd, peer, local=("unknown", 0)):
        super().__init__()
        self.rfd = rfd
        self.wfd = wfd
        self.peer = peer
        self.local = local
        self._timeout = None

    def _recv(self):
        try:
            if not descriptors.readable(self.rfd, self._timeout):
                raise Timeout()
            return os.read(self.rfd, RECV_SIZE)
        except OSError:
            return b""

    def _send(self, data):
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.wfd, view):]
        except OSError as e:
            raise Closed(str(e)) from None

    def settimeout(self, seconds):
        """Sets the idle timeout for reads (None: no timeout)."""
        self._timeout = seconds

    def starttls(self, context):
        raise OSError("TLS needs a socket on the standard input")

    def close(self):
        """Flushes what it can; the descriptors belong to the process."""
        try:
            self.flush()
        except (Closed, Timeout):
            pass


def shut_down_from_another_thread(sock):
    """Shuts a connection down from another thread, so the thread using it wakes up.

    The shutdown goes to a duplicate of the descriptor: it acts on the
    connection (and, on Linux, ends a connect() in progress) and leaves the
    (TLS) socket object, which the other thread is using, untouched.
    """
    try:
        fd = sock.fileno()
        if fd < 0:
            return
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()


def answer_and_close(sock, reply):
    """Sends `reply` (one short line) on a socket just accepted, then closes it.

    Never blocks and never raises: a fresh socket's send buffer takes one
    line, and a client already gone is nothing to report.
    """
    try:
        sock.setblocking(False)
        sock.send(reply)
    except OSError:
        pass
    sock.close()


def address_pair(addr):
    """(host, port) of a socket address, whatever its family adds."""
    return (addr[0], addr[1])


def _timeval(seconds):
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))
