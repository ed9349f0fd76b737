"""Listening sockets, the accept loop and connection admission.

`Server` owns every listening socket of the process and runs one accept
loop in the main thread; an accepted connection runs its session in a
thread of its own, or in the session loop (`session_loop`) for plain SMTP.
The connection object sessions use is in `connection`.

Why one selector loop rather than one `socketserver.ThreadingTCPServer` per
listening address (the usual Python shape): E-MailRelay listens on
several addresses for several protocols at once, and one loop gives a single
place for the connection caps, the open-relay guard and a prompt, signal-driven
shutdown (the loop wakes on a socketpair), without a thread per listener.

Connection budgets are per kind of service: SMTP, POP and admin each count
their own sessions (total and per client address), so a flood on one port
cannot make another answer "too many connections". The accept loop never
waits for a slot: a connection over its budget is handed to one refuser
thread, which gives ending sessions a moment to free a slot and otherwise
sends the busy reply and closes.

Running out of file descriptors (EMFILE, ENFILE) is the same condition
seen from the kernel: the accept loop cannot take the connection, and the
listening socket stays readable, so retrying at once would spin. The
listener is paused instead (its connections wait in the kernel's queue
while ending sessions free descriptors); if accepting still fails after
the pause, the waiting connections are answered with the busy reply
through a reserve descriptor kept for that, and the listener is paused
again. One warning says so; one line says when connections are accepted
again.
"""

import collections
import errno
import os
import queue
import selectors
import socket
import threading
import time

from ..runtime import descriptors, log
from ..util import addresses
from . import connection, interfaces, proxy_reader, session_loop
from .connection import Connection, address_pair

# Seconds an over-the-limit connection waits (in the refuser thread, never in
# the accept loop) for ending sessions to free a slot.
OVER_LIMIT_GRACE = 0.25
# Over-the-limit connections held for that grace at once; beyond this they
# are refused at once.
OVER_LIMIT_HELD = 64
# Connections accepted from one listener per wake-up of the accept loop.
ACCEPT_BATCH = 64
# Connections from one address beyond this many times the per-address limit
# are closed at once, with no reply (ZMailer's MaxSameIpSource).
FLOOD_FACTOR = 4
# Seconds an idle session thread waits for a new connection before it ends.
WORKER_IDLE = 30.0
# accept() errors that mean the process or the system is out of descriptors
# (or of the memory behind them): the connection stays queued.
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# Seconds a listener that ran out of descriptors rests before it tries again.
OUT_OF_DESCRIPTORS_PAUSE = 0.25
# Connections answered with the busy reply per try while out of descriptors.
OUT_OF_DESCRIPTORS_REFUSALS = 256
# Seconds between two warnings about running out of descriptors.
OUT_OF_DESCRIPTORS_WARNING = 60.0


def parse_interfaces(values):
    """Splits --interface values into {kind: [address, ...]}.

    Values may be comma lists and carry `smtp=`, `pop=` or `admin=` prefixes;
    an unprefixed address applies to every kind (key None). `fd#N` names an
    inherited listening socket. An interface name (`eth0`, `ppp0-ipv4`)
    stands for its addresses now (see `interfaces`). Raises ValueError.
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
                    name, family = interfaces.split_name(item)
                    result.setdefault(kind, []).extend(interfaces.addresses(name, family))
                    continue
            elif not item[3:].isdigit():
                raise ValueError("invalid interface %r" % item)
            result.setdefault(kind, []).append(item)
    return result


def listen_backlog(wanted=0):
    """The listen() backlog to use: `wanted`, or the system maximum when 0.

    The maximum is /proc/sys/net/core/somaxconn where Linux has it (the
    kernel silently caps any larger value there), else socket.SOMAXCONN.
    """
    if wanted:
        return wanted
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(int(f.read().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return socket.SOMAXCONN


SD_LISTEN_FDS_START = 3
KINDS = ("smtp", "pop", "admin")


def systemd_sockets(environ=None):
    """Sockets passed by systemd socket activation (Accept=no), as interfaces.

    Returns {kind: ["fd#N", ...]} for the descriptors that LISTEN_FDS and
    LISTEN_PID give this process, each under the kind its LISTEN_FDNAMES
    entry names (smtp, pop or admin; anything else is smtp), or {} when
    there are none. The variables are removed, as sd_listen_fds() does, so
    that no child takes the sockets for its own.
    """
    environ = os.environ if environ is None else environ
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return {}
    result = {}
    for i in range(int(count)):
        name = names[i] if i < len(names) else ""
        kind = name if name in KINDS else "smtp"
        result.setdefault(kind, []).append("fd#%d" % (SD_LISTEN_FDS_START + i))
    return result


def _bind(host, port, backlog):
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
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """One listening socket and what to do with its connections."""

    def __init__(self, sock, kind, handler, tls_context, busy_reply, address_busy_reply=None,
                 conversation=None, proxy_from=None, refused_reply=b""):
        self.sock = sock
        self.kind = kind
        self.handler = handler
        # conn -> session with a conversation(): served by the session loop.
        self.conversation = conversation if tls_context is None else None
        self.tls_context = tls_context
        self.busy_reply = busy_reply
        self.address_busy_reply = busy_reply if address_busy_reply is None else address_busy_reply
        self.refused_reply = refused_reply
        local = address_pair(sock.getsockname())
        self.address = addresses.format_address(*local)
        # The local address of every accepted connection, unless the
        # listener is bound to a wildcard address.
        self.local = None if local[0] in ("0.0.0.0", "::") else local
        # Connections refused for want of descriptors since accepting last
        # worked (None: accepting works), and whether that was warned of.
        self.starved = None
        self.starved_warned = False
        # --proxy-protocol: the address patterns of the load balancers whose
        # connections start with a PROXY header (None: no header expected).
        self.proxy_from = proxy_from


class Server:
    """Every listening socket of the process, and the accept loop.

    `add()` binds (raising OSError or ValueError before anything runs);
    `serve(stop_event)` accepts until the event is set, then stops listening,
    ends live sessions and waits briefly for them. Each session runs
    `handler(conn)` in a daemon thread of its own; `on_close(kind)`
    callbacks run after a session ends (used for --forward-on-disconnect).

    `max_connections` and `max_per_address` are the budget of each kind of
    service (smtp, pop, admin) on its own; `add()` may give a kind other
    limits. `backlog` is the listen() backlog (0: the system maximum).

    A listener added with `proxy_from` (--proxy-protocol) takes connections
    only from those load balancer addresses, and reads each one's PROXY
    header (`proxy_reader`, within `proxy_timeout` seconds) before
    anything else: the client the header names is then the one the
    open-relay guard, the budgets and the session see.

    Over a limit a connection gets the listener's `busy_reply` (too many
    connections) or `address_busy_reply` (too many from its address) and
    is closed; that happens in the refuser thread, after a short grace for
    ending sessions, so the accept loop only counts. Once one address holds
    FLOOD_FACTOR times its per-address limit of a kind (sessions and
    connections waiting to be refused), its further connections of that
    kind are closed at once without a reply.

    Session threads are reused: a thread whose session has ended waits a
    while for the next connection, which saves creating a thread (and the
    accept loop's wait for it to start) per connection.
    """

    def __init__(self, remote_clients=False, max_connections=200, max_per_address=20, backlog=0,
                 proxy_timeout=5.0):
        self.remote_clients = remote_clients
        self.proxy_timeout = proxy_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.backlog = listen_backlog(backlog)
        self.listeners = []
        self.on_close = []
        self._limits = {}        # kind -> (max_connections, max_per_address)
        self._lock = threading.Condition()
        self._live = {}          # raw socket -> its Connection once the session has one
        self._per_kind = {}
        self._per_address = {}   # (kind, ip) -> sessions
        self._held = collections.deque()  # over-limit connections in their grace
        self._refuser = None
        self._stopping = False
        self._loop = None        # the session loop, once a parked session needs it
        self._headers = None     # the proxy_reader.HeaderReader, once a listener needs it
        self._freed = 0          # sessions ended so far (for the refuser thread)
        self._stop_event = None
        self._refusing = {}      # (kind, ip) -> held over-limit connections
        self._sessions = 0       # sessions running, until their on_close callbacks end
        self._idle = 0           # session threads waiting for work
        self._work = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.counters = {"connections": 0, "refused": 0}
        self._selector = None
        self._paused = {}        # listener -> monotonic time it accepts again
        # A descriptor held back to answer connections when none is left.
        self._reserve = None
        self._reserve_lock = threading.Lock()
        self._starved_warning = None   # monotonic time of the last warning

    def wakeup_fd(self):
        """An fd to give signal.set_wakeup_fd() so signals wake the loop."""
        return self._wake_w.fileno()

    def wake(self):
        """Wakes the accept loop (from any thread) to look at its stop event."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def add(self, kind, interfaces, port, handler, tls_context=None, busy_reply=b"",
            max_connections=None, max_per_address=None, address_busy_reply=None,
            conversation=None, proxy_from=None, refused_reply=b""):
        """Listens for `kind` on the given interfaces (all if empty) and port.

        `max_connections` / `max_per_address` override the server's budget
        for this kind of service. `address_busy_reply` (default
        `busy_reply`) is sent over the per-address limit, `refused_reply`
        to a non-local client without --remote-clients. With
        `conversation(conn) -> session` (a `session_loop` conversation),
        plain connections are served by the session loop instead of a
        thread each; `handler` still serves implicit-TLS ones. With
        `proxy_from` (address patterns) every connection must come from one
        of those addresses and start with a PROXY header.
        """
        self._limits[kind] = (max_connections or self.max_connections,
                              max_per_address or self.max_per_address)
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
                    sock = _bind(item, port, self.backlog)
                except OSError as e:
                    hint = ""
                    if e.errno == errno.EACCES and port < 1024:
                        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                    raise OSError(e.errno, "cannot listen on %s: %s%s"
                                  % (addresses.format_address(item, port), e.strerror,
                                     hint)) from None
            self.listeners.append(Listener(sock, kind, handler, tls_context, busy_reply,
                                           address_busy_reply, conversation, proxy_from,
                                           refused_reply))

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
        self._stop_event = stop_event
        self._selector = sel = selectors.DefaultSelector()
        self._open_reserve()
        for lst in self.listeners:
            lst.sock.setblocking(False)
            self._watch(lst)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not stop_event.is_set():
                for key, _ in sel.select(self._resume_paused()):
                    if key.data is None:
                        try:
                            while self._wake_r.recv(512):
                                pass
                        except OSError:
                            pass
                        continue
                    self._accept_batch(key.data)
                if on_wake is not None:
                    on_wake()
        finally:
            sel.close()
            self._shutdown()
            with self._reserve_lock:
                if self._reserve is not None:
                    os.close(self._reserve)
                    self._reserve = None

    def _watch(self, lst):
        """Has the accept loop (or the session loop) accept on `lst`."""
        if lst.conversation is not None:
            # Accepted in the session loop's thread, a few at a time so
            # that a flood of connections to refuse does not starve the
            # sessions it serves.
            self._session_loop().watch(lst.sock, lambda: self._accept_batch(lst, 8))
        else:
            self._selector.register(lst.sock, selectors.EVENT_READ, lst)

    def _resume_paused(self):
        """Watches again the listeners whose pause is over; seconds to the next, or None."""
        with self._lock:
            if not self._paused or self._stopping:
                return None
            now = time.monotonic()
            due = [lst for lst, when in self._paused.items() if when <= now]
            for lst in due:
                del self._paused[lst]
            rest = [when - now for when in self._paused.values()]
        for lst in due:
            self._watch(lst)
        return min(rest) if rest else None

    def _accept_batch(self, lst, most=ACCEPT_BATCH):
        # A burst fills the backlog faster than one accept per wake-up
        # would empty it.
        for _ in range(most):
            if not self._accept(lst):
                break

    def _accept(self, lst):
        """Accepts one connection; False when there was none waiting."""
        try:
            sock, addr = lst.sock.accept()
        except OSError as e:
            if e.errno in OUT_OF_DESCRIPTORS:
                self._out_of_descriptors(lst, e)
            return False
        if lst.starved is not None:
            if lst.starved_warned:
                log.info("%s: accepting connections again (%d refused while out of file "
                         "descriptors)" % (lst.kind, lst.starved))
            lst.starved, lst.starved_warned = None, False
        if lst.proxy_from is not None:
            self._expect_header(lst, sock, addr)
        else:
            self._accepted(lst, sock, addr)
        return True

    def _accepted(self, lst, sock, addr):
        """Admits a connection from client `addr`, holds it, or refuses it (the guard)."""
        ip = addr[0]
        peer = addresses.format_address(ip, addr[1])
        if addresses.refused_by_guard(ip, self.remote_clients):
            log.warning("%s: connection refused from non-local address %s (%s)"
                        % (lst.kind, ip, addresses.GUARD_HINT))
            with self._lock:
                self.counters["refused"] += 1
            # A fresh socket's send buffer takes one short line without
            # blocking the accept loop; the client then knows why.
            try:
                sock.setblocking(False)
                sock.send(lst.refused_reply)
            except OSError:
                pass
            sock.close()
            return
        if not self._admit(lst, sock, addr, peer):
            self._hold(lst, sock, addr, peer)

    def _expect_header(self, lst, sock, addr):
        """A connection to a --proxy-protocol listener: its PROXY header is read first.

        Only the load balancers may send one (anyone else could claim to be
        any client); connections waiting for their header are limited to
        the kind's connection budget.
        """
        ip = addr[0]
        refusal = None
        if not any(addresses.match_pattern(ip, p) for p in lst.proxy_from):
            refusal = "connection refused from %s: not a --proxy-protocol address" % ip
        else:
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                if self._headers is None:
                    self._headers = proxy_reader.HeaderReader()
                reader = self._headers
                total = self._limits.get(lst.kind, (self.max_connections, 0))[0]
            if reader.waiting() >= total:
                refusal = "too many connections waiting for a PROXY header: refused %s" % ip
        if refusal is not None:
            log.warning("%s: %s" % (lst.kind, refusal))
            with self._lock:
                self.counters["refused"] += 1
            sock.close()
            return
        reader.add(sock, lst.kind, addr, self.proxy_timeout,
                   lambda header: self._proxied(lst, sock, addr, header))

    def _proxied(self, lst, sock, addr, header):
        """The PROXY header has arrived: the client it names is the connection's."""
        client = header.source or addr
        named = "client %s" % addresses.format_address(client[0], client[1]) \
            if header.source else "no client address (LOCAL or UNKNOWN)"
        log.info("%s: PROXY v%d header from %s: %s"
                 % (lst.kind, header.version, addresses.format_address(addr[0], addr[1]), named))
        self._accepted(lst, sock, client)

    def _out_of_descriptors(self, lst, e):
        """accept() found no descriptor for a connection: warn, refuse or wait, pause.

        The first time, the connections wait in the kernel's queue for the
        pause; when accepting fails again after it, those waiting are
        answered with the busy reply (see the module docstring).
        """
        if lst.starved is None:
            lst.starved = 0
            now = time.monotonic()
            if self._starved_warning is None \
                    or now - self._starved_warning >= OUT_OF_DESCRIPTORS_WARNING:
                self._starved_warning = now
                lst.starved_warned = True
                log.warning("%s: cannot accept connections: %s (open-files limit %s): new "
                            "connections wait, then get the busy reply, until sessions end "
                            "(see --max-connections, LimitNOFILE)"
                            % (lst.kind, e.strerror or e, descriptors.limit_text()))
        else:
            lst.starved += self._refuse_waiting(lst)
        with self._lock:
            if self._stopping:
                return
            self._paused[lst] = time.monotonic() + OUT_OF_DESCRIPTORS_PAUSE
        if lst.conversation is not None:
            self._loop.unwatch(lst.sock)
        else:
            self._selector.unregister(lst.sock)
        # (From the session loop's thread: the accept loop must learn of the pause.)
        self.wake()

    def _open_reserve(self):
        """Opens the reserve descriptor if it is not open; False when it cannot be."""
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return False
        return True

    def _refuse_waiting(self, lst):
        """Answers waiting connections with the busy reply, through the reserve descriptor.

        Returns how many. Another thread may take the descriptor freed for
        a connection first; then the rest wait for the next try.
        """
        refused = 0
        with self._reserve_lock:
            while refused < OUT_OF_DESCRIPTORS_REFUSALS and self._open_reserve():
                os.close(self._reserve)
                self._reserve = None
                try:
                    sock, _ = lst.sock.accept()
                except OSError:
                    break
                try:
                    sock.setblocking(False)
                    sock.send(lst.busy_reply)
                except OSError:
                    pass
                sock.close()
                refused += 1
            self._open_reserve()
        with self._lock:
            self.counters["refused"] += refused
        return refused

    def _admit(self, lst, sock, addr, peer):
        """Starts the session if its kind's budget allows; False if over it."""
        ip = addr[0]
        kind = lst.kind
        with self._lock:
            total, per_address = self._limits.get(kind, (self.max_connections,
                                                         self.max_per_address))
            if self._stopping or self._per_kind.get(kind, 0) >= total \
                    or self._per_address.get((kind, ip), 0) >= per_address:
                return False
            self._per_kind[kind] = self._per_kind.get(kind, 0) + 1
            self._per_address[(kind, ip)] = self._per_address.get((kind, ip), 0) + 1
            self._live[sock] = sock
            self._sessions += 1
            parked = lst.conversation is not None
            spawn = not parked and self._idle == 0
            if not parked and not spawn:
                self._idle -= 1
        self.counters["connections"] += 1
        log.info("%s connection from %s" % (kind, peer))
        if parked:
            self._park(lst, sock, addr, peer)
            return True
        self._work.put((lst, sock, addr, peer))
        if spawn:
            threading.Thread(target=self._worker, name="session", daemon=True).start()
        return True

    def _session_loop(self):
        """The session loop, started on first use."""
        with self._lock:
            if self._loop is None:
                # As many call threads as sessions the loop may hold: no
                # session's policy call waits for another's (session_loop).
                kinds = {lst.kind for lst in self.listeners if lst.conversation is not None}
                self._loop = session_loop.SessionLoop(
                    register=self._register, stop_event=self._stop_event, name="smtp",
                    pool_size=sum(self._limits[kind][0] for kind in kinds))
            return self._loop

    def _park(self, lst, sock, addr, peer):
        """Hands a connection to the session loop."""
        loop = self._session_loop()

        def done():
            self._ended(lst, sock, addr, peer)
            with self._lock:
                self._sessions -= 1
                self._lock.notify_all()
        try:
            conn = session_loop.LoopConnection(sock, addr, lst.local)
            session = lst.conversation(conn)
        except Exception as e:
            log.error("%s: session with %s failed: %s: %s" % (lst.kind, peer, type(e).__name__, e))
            done()
            return
        loop.add(session, conn, done)

    def _register(self, sock, conn):
        """A parked session started TLS: shutdown reaches it through its new connection."""
        with self._lock:
            self._live[sock] = conn

    def _hold(self, lst, sock, addr, peer):
        """Passes an over-limit connection to the refuser thread.

        A client that reconnects as soon as it reads our 221 can beat its
        old session's thread to the clean-up, so the refuser gives ending
        sessions OVER_LIMIT_GRACE to free a slot before refusing. An address
        already holding FLOOD_FACTOR times its limit is closed at once,
        without a reply, so a flood from one host costs nothing more.
        """
        key = (lst.kind, addr[0])
        with self._lock:
            per_address = self._limits.get(lst.kind, (0, self.max_per_address))[1]
            if self._per_address.get(key, 0) + self._refusing.get(key, 0) \
                    >= FLOOD_FACTOR * per_address:
                self.counters["refused"] += 1
                sock.close()
                return
            if len(self._held) < OVER_LIMIT_HELD and not self._stopping:
                self._held.append((time.monotonic() + OVER_LIMIT_GRACE, lst, sock, addr, peer))
                self._refusing[key] = self._refusing.get(key, 0) + 1
                if self._refuser is None:
                    self._refuser = threading.Thread(target=self._refuse_loop,
                                                     name="refuser", daemon=True)
                    self._refuser.start()
                self._lock.notify_all()
                return
        self._refuse(lst, sock, addr)

    def _refuse_loop(self):
        """The refuser thread: admits held connections as slots free, refuses the rest."""
        seen = None
        while True:
            with self._lock:
                while not self._held and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._held:
                    self._refuser = None
                    return
                deadline = self._held[0][0]
                now = time.monotonic()
                # A session that ended while the last round was being tried
                # notified nobody: look again at once rather than wait.
                if now < deadline and not self._stopping and self._freed == seen:
                    self._lock.wait(deadline - now)
                seen = self._freed
                held = list(self._held)
                self._held.clear()
            keep = []
            now = time.monotonic()
            for item in held:
                deadline, lst, sock, addr, peer = item
                admitted = self._admit(lst, sock, addr, peer)
                if not admitted and now < deadline and not self._stopping:
                    keep.append(item)
                    continue
                self._unhold(lst.kind, addr[0])
                if not admitted:
                    self._refuse(lst, sock, addr)
            if keep:
                with self._lock:
                    self._held.extendleft(reversed(keep))

    def _unhold(self, kind, ip):
        with self._lock:
            key = (kind, ip)
            n = self._refusing.get(key, 0) - 1
            if n > 0:
                self._refusing[key] = n
            else:
                self._refusing.pop(key, None)

    def _refuse(self, lst, sock, addr):
        """Sends the busy reply (the per-address one when that is the limit hit) and closes."""
        ip = addr[0]
        with self._lock:
            per_address = self._limits.get(lst.kind, (0, self.max_per_address))[1]
            one_address = self._per_address.get((lst.kind, ip), 0) >= per_address
            self.counters["refused"] += 1
        log.warning("%s: too many connections%s: refused %s"
                    % (lst.kind, " from one address" if one_address else "", ip))
        try:
            sock.setblocking(False)
            sock.send(lst.address_busy_reply if one_address else lst.busy_reply)
        except OSError:
            pass
        sock.close()

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

    def _session(self, lst, sock, addr, peer):
        try:
            sock.setblocking(True)
            conn = Connection(sock, addr, lst.local)
            with self._lock:
                # Shutdown wakes the session through its current socket,
                # which is the TLS one once TLS has started.
                self._live[sock] = conn
            if lst.tls_context is not None:
                try:
                    conn.accept_tls(lst.tls_context)
                except (OSError, ValueError) as e:
                    log.warning("tls error: %s (%s connection from %s)" % (e, lst.kind, peer))
                    return
            lst.handler(conn)
        except Exception as e:  # a session must never take the server down
            log.error("%s: session with %s failed: %s: %s" % (lst.kind, peer, type(e).__name__, e))
        finally:
            self._ended(lst, sock, addr, peer)

    def _ended(self, lst, sock, addr, peer):
        """A session is over: its socket is closed, its budget freed, on_close run."""
        ip = addr[0]
        try:
            sock.close()
        except OSError:
            pass
        log.info("%s connection closed" % lst.kind, peer=peer)
        with self._lock:
            self._live.pop(sock, None)
            key = (lst.kind, ip)
            n = self._per_address.get(key, 1) - 1
            if n:
                self._per_address[key] = n
            else:
                self._per_address.pop(key, None)
            self._per_kind[lst.kind] = self._per_kind.get(lst.kind, 1) - 1
            self._freed += 1
            self._lock.notify_all()
        for cb in self.on_close:
            try:
                cb(lst.kind)
            except Exception as e:
                log.error("%s: after-session action failed: %s" % (lst.kind, e))

    def _shutdown(self, grace=5.0):
        for lst in self.listeners:
            if lst.conversation is not None and self._loop is not None:
                self._loop.unwatch(lst.sock)
            try:
                lst.sock.close()
            except OSError:
                pass
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            live = list(self._live.values())
            headers = self._headers
        if headers is not None:
            headers.stop()
        for item in live:
            connection.shut_down_from_another_thread(getattr(item, "sock", item))
        if self._loop is not None:
            self._loop.stop()
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
