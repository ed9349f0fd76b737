"""Listening sockets, the accept loop, and the connection object sessions use.

Protocol sessions never see a socket: they get a `Connection` (or, in unit
tests, a `MemoryConnection`) with buffered line and block reads, buffered
writes, and a server-side TLS upgrade. `Server` owns every listening socket
of the process and runs one accept loop in the main thread; each accepted
connection runs its session in a thread of its own.

Why one selector loop rather than one `socketserver.ThreadingTCPServer` per
listening address (the design card's suggestion): E-MailRelay listens on
several addresses for several protocols at once, and one loop gives a single
place for the connection caps, the open-relay guard and a prompt, signal-driven
shutdown (the loop wakes on a socketpair), without a thread per listener.
"""

import queue
import selectors
import socket
import struct
import threading
import time

from . import addresses
from . import log

RECV_SIZE = 65536
# Writes are buffered for pipelining; a large backlog is sent at once.
WRITE_HIGH_WATER = 65536
# Seconds an over-the-limit connection waits for ending sessions to free a slot.
OVER_LIMIT_GRACE = 0.25
# Seconds an idle session thread waits for a new connection before it ends.
WORKER_IDLE = 30.0


class LineTooLong(Exception):
    """A line exceeded the limit; the rest of it has been read and dropped."""


class Timeout(Exception):
    """Nothing arrived from the peer within the idle timeout."""


class Closed(Exception):
    """The peer went away while we were writing."""


class _Buffered:
    """Line and block reading over a `_recv()` primitive, with pushback."""

    def __init__(self):
        self._buf = bytearray()
        self._out = bytearray()
        self.tls = False
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
        start = 0
        overlong = False
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                if overlong or len(line) > limit:
                    raise LineTooLong()
                return line
            if len(self._buf) > limit:
                overlong = True
                self._buf.clear()
            start = len(self._buf)
            if not self._fill():
                if overlong:
                    raise LineTooLong()
                line = bytes(self._buf)
                self._buf.clear()
                return line

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


class Connection(_Buffered):
    """A connected socket as a session sees it.

    `peer` and `local` are (ip, port) tuples; `tls` says whether TLS is
    active; `peer_certificate_pem` holds a verified client certificate (or
    ''). Timeouts raise `Timeout`; a peer that vanishes mid-write raises
    `Closed`; end of input is b'' from readline/read.
    """

    def __init__(self, sock, peer=None, local=None):
        """`peer` and `local` may be given when known (from accept() and a
        listener's specific address), saving the look-ups."""
        super().__init__()
        self.sock = sock
        self.peer = _pair(peer or sock.getpeername())
        self.local = _pair(local or sock.getsockname())
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
        """Starts TLS at once, for implicit-TLS ports (SMTPS, POP3S)."""
        # TLS needs Python's timeout handling, not the kernel's.
        zero = _timeval(0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, zero)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, zero)
        self.sock.settimeout(self._timeout)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        der = self.sock.getpeercert(binary_form=True)
        if der:
            import ssl
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


class MemoryConnection(_Buffered):
    """A `Connection` look-alike over bytes, for testing sessions.

    The whole input is given up front (it may be a list of chunks, each
    returned by one receive, to exercise buffering); `output` collects what
    the session wrote, flushed or not.
    """

    def __init__(self, data=b"", peer=("127.0.0.1", 40000), local=("127.0.0.1", 25)):
        super().__init__()
        self._chunks = list(data) if isinstance(data, list) else [data]
        self.output = bytearray()
        self.peer = peer
        self.local = local
        self.closed = False
        self.timeout = None

    def _recv(self):
        while self._chunks:
            chunk = self._chunks.pop(0)
            if chunk:
                return chunk
        return b""

    def _send(self, data):
        self.output += data

    def write(self, data):
        self.output += data

    def flush(self):
        pass

    def settimeout(self, seconds):
        self.timeout = seconds

    def starttls(self, context):
        raise OSError("TLS is not available on a memory connection")

    def close(self):
        self.closed = True


def _pair(addr):
    return (addr[0], addr[1])


def _timeval(seconds):
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


def parse_interfaces(values):
    """Splits --interface values into {kind: [address, ...]}.

    Values may be comma lists and carry `smtp=`, `pop=` or `admin=` prefixes;
    an unprefixed address applies to every kind (key None). `fd#N` names an
    inherited listening socket. Raises ValueError for an interface name,
    which this version cannot resolve to addresses.
    """
    result = {}
    for value in values or []:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            kind = None
            if "=" in item:
                kind, _, item = item.partition("=")
                if kind not in ("smtp", "pop", "admin"):
                    raise ValueError("invalid interface prefix %r" % (kind + "="))
            if not item.startswith("fd#"):
                try:
                    addresses._ip(item)
                except ValueError:
                    raise ValueError("invalid interface %r: give an IP address "
                                     "(interface names are not supported)" % item) from None
            elif not item[3:].isdigit():
                raise ValueError("invalid interface %r" % item)
            result.setdefault(kind, []).append(item)
    return result


def _bind(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" means IPv6 only, as the reference says; 0.0.0.0 covers IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
            sock.bind(info)
        else:
            sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """One listening socket and what to do with its connections."""

    def __init__(self, sock, kind, handler, tls_context, busy_reply):
        self.sock = sock
        self.kind = kind
        self.handler = handler
        self.tls_context = tls_context
        self.busy_reply = busy_reply
        local = _pair(sock.getsockname())
        self.address = addresses.format_address(*local)
        # The local address of every accepted connection, unless the
        # listener is bound to a wildcard address.
        self.local = None if local[0] in ("0.0.0.0", "::") else local


class Server:
    """Every listening socket of the process, and the accept loop.

    `add()` binds (raising OSError or ValueError before anything runs);
    `serve(stop_event)` accepts until the event is set, then stops listening,
    ends live sessions and waits briefly for them. Each session runs
    `handler(conn)` in a daemon thread of its own; `on_close(kind)`
    callbacks run after a session ends (used for --forward-on-disconnect).

    Session threads are reused: a thread whose session has ended waits a
    while for the next connection, which saves creating a thread (and the
    accept loop's wait for it to start) per connection.
    """

    def __init__(self, remote_clients=False, max_connections=200, max_per_address=20):
        self.remote_clients = remote_clients
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.listeners = []
        self.on_close = []
        self._lock = threading.Condition()
        self._live = {}
        self._per_address = {}
        self._sessions = 0       # sessions running, until their on_close callbacks end
        self._idle = 0           # session threads waiting for work
        self._work = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.counters = {"connections": 0, "refused": 0}

    def wakeup_fd(self):
        """An fd to give signal.set_wakeup_fd() so signals wake the loop."""
        return self._wake_w.fileno()

    def wake(self):
        """Wakes the accept loop (from any thread) to look at its stop event."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def add(self, kind, interfaces, port, handler, tls_context=None, busy_reply=b""):
        """Listens for `kind` on the given interfaces (all if empty) and port."""
        items = list(interfaces.get(kind, [])) + list(interfaces.get(None, []))
        if not items:
            items = ["0.0.0.0"]
            if socket.has_ipv6 and _ipv6_works():
                items.append("::")
        for item in items:
            if item.startswith("fd#"):
                sock = socket.socket(fileno=int(item[3:]))
            else:
                try:
                    sock = _bind(item, port)
                except OSError as e:
                    raise OSError(e.errno, "cannot listen on %s: %s"
                                  % (addresses.format_address(item, port), e.strerror)) from None
            self.listeners.append(Listener(sock, kind, handler, tls_context, busy_reply))

    def addresses(self):
        """(kind, address) for every listener, for logs and `status`."""
        return [(lst.kind, lst.address) for lst in self.listeners]

    def live_count(self):
        """Sessions running now."""
        with self._lock:
            return len(self._live)

    def serve(self, stop_event, on_wake=None):
        """Accepts connections until `stop_event` is set.

        `on_wake()` runs in this thread after every wake-up, so signal
        flags (SIGHUP) are handled outside signal handlers.
        """
        sel = selectors.DefaultSelector()
        for lst in self.listeners:
            lst.sock.setblocking(False)
            sel.register(lst.sock, selectors.EVENT_READ, lst)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not stop_event.is_set():
                for key, _ in sel.select():
                    if key.data is None:
                        try:
                            while self._wake_r.recv(512):
                                pass
                        except OSError:
                            pass
                        continue
                    self._accept(key.data)
                if on_wake is not None:
                    on_wake()
        finally:
            sel.close()
            self._shutdown()

    def _accept(self, lst):
        try:
            sock, addr = lst.sock.accept()
        except OSError:
            return
        sock.setblocking(True)
        ip = addr[0]
        peer = addresses.format_address(ip, addr[1])
        if not self.remote_clients and not addresses.is_local(ip):
            log.warning("%s: connection refused from non-local address %s "
                        "(see --remote-clients)" % (lst.kind, ip))
            self.counters["refused"] += 1
            sock.close()
            return
        with self._lock:
            # A client that reconnects as soon as it reads our 221 can beat
            # its old session's thread to the clean-up; give ending sessions
            # a moment before counting this one as over the limit.
            over = self._over(ip)
            deadline = time.monotonic() + OVER_LIMIT_GRACE
            while over and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
                over = self._over(ip)
            if not over:
                self._per_address[ip] = self._per_address.get(ip, 0) + 1
                self._live[sock] = ip
        if over:
            log.warning("%s: too many connections: refused %s" % (lst.kind, ip))
            self.counters["refused"] += 1
            try:
                sock.settimeout(1)
                sock.sendall(lst.busy_reply)
            except OSError:
                pass
            sock.close()
            return
        self.counters["connections"] += 1
        log.info("%s connection from %s" % (lst.kind, peer))
        with self._lock:
            self._sessions += 1
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._work.put((lst, sock, addr, peer))
        if spawn:
            threading.Thread(target=self._worker, name="session", daemon=True).start()

    def _worker(self):
        """Runs queued sessions; ends after WORKER_IDLE seconds without one."""
        while True:
            try:
                job = self._work.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self._lock:
                    if self._idle == 0:
                        # _accept has just handed this thread a connection.
                        continue
                    self._idle -= 1
                    return
            if job is None:
                return
            self._session(*job)
            with self._lock:
                self._sessions -= 1
                self._idle += 1
                self._lock.notify_all()

    def _over(self, ip):
        return (len(self._live) >= self.max_connections
                or self._per_address.get(ip, 0) >= self.max_per_address)

    def _session(self, lst, sock, addr, peer):
        ip = addr[0]
        try:
            conn = Connection(sock, addr, lst.local)
            if lst.tls_context is not None:
                conn.settimeout(60)
                try:
                    conn.accept_tls(lst.tls_context)
                except (OSError, ValueError) as e:
                    log.warning("tls error: %s (%s connection from %s)" % (e, lst.kind, peer))
                    return
            lst.handler(conn)
        except Exception as e:  # a session must never take the server down
            log.error("%s: session with %s failed: %s: %s" % (lst.kind, peer, type(e).__name__, e))
        finally:
            try:
                sock.close()
            except OSError:
                pass
            log.info("%s connection closed" % lst.kind, peer=peer)
            with self._lock:
                self._live.pop(sock, None)
                n = self._per_address.get(ip, 1) - 1
                if n:
                    self._per_address[ip] = n
                else:
                    self._per_address.pop(ip, None)
                self._lock.notify_all()
            for cb in self.on_close:
                try:
                    cb(lst.kind)
                except Exception as e:
                    log.error("%s: after-session action failed: %s" % (lst.kind, e))

    def _shutdown(self, grace=5.0):
        for lst in self.listeners:
            try:
                lst.sock.close()
            except OSError:
                pass
        with self._lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        with self._lock:
            while self._sessions and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            for _ in range(self._idle):
                self._work.put(None)
            self._idle = 0
        self._wake_r.close()
        self._wake_w.close()


def _ipv6_works():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.close()
        return True
    except OSError:
        return False

