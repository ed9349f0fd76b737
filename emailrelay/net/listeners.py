"""Listening sockets, the accept loop and connection admission.

`Server` owns every listening socket of the process. One accept loop in
the main thread accepts on each of them but plain SMTP's, and an accepted
connection runs its session in a thread of its own; plain SMTP is
accepted in the session loop's thread (`session_loop`), a few connections
per turn, and its sessions run there. The connection object sessions use
is in `connection`.

Why one selector loop rather than one `socketserver.ThreadingTCPServer` per
listening address (the usual Python shape): E-MailRelay listens on
several addresses for several protocols at once, and one loop gives a single
place for the connection caps, the open-relay guard and a prompt, signal-driven
shutdown (the loop wakes on a socketpair), without a thread per listener.

Connection budgets are per kind of service: SMTP, POP and admin each count
their own sessions (total and per client address), so a flood on one port
cannot make another answer "too many connections". The accept loop never
waits for a slot: a connection over its budget goes to the refuser thread
(`over_limit`). An accept() that finds no file descriptor pauses its
listener (`descriptor_shortage` says what else happens). `listen_sockets`
says what to listen on and opens the sockets.
"""

import queue
import selectors
import socket
import threading
import time

from ..runtime import log
from ..util import addresses
from . import connection, listen_sockets, proxy_reader, session_loop
from .connection import Connection, address_pair
from .descriptor_shortage import OUT_OF_DESCRIPTORS, OUT_OF_DESCRIPTORS_PAUSE, DescriptorShortage
from .over_limit import OverLimit

# Connections accepted from one listener per wake-up of the accept loop.
ACCEPT_BATCH = 64
# Seconds an idle session thread waits for a new connection before it ends.
WORKER_IDLE = 30.0


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
        # --proxy-protocol: the address patterns of the load balancers whose
        # connections start with a PROXY header (None: no header expected).
        self.proxy_from = proxy_from


class Server(OverLimit):
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
    is closed; that happens in the refuser thread (`over_limit`), after a
    short grace for ending sessions, so the accept loop only counts. Once
    one address holds FLOOD_FACTOR times its per-address limit of a kind,
    its further connections of that kind are closed at once without a reply.

    Session threads are reused: a thread whose session has ended waits a
    while for the next connection, which saves creating a thread (and the
    accept loop's wait for it to start) per connection.
    """

    def __init__(self, remote_clients=False, max_connections=200, max_per_address=20, backlog=0,
                 proxy_timeout=5.0):
        super().__init__()
        self.remote_clients = remote_clients
        self.proxy_timeout = proxy_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.backlog = listen_sockets.listen_backlog(backlog)
        self.listeners = []
        self.on_close = []
        self._limits = {}        # kind -> (max_connections, max_per_address)
        self._lock = threading.Condition()
        self._live = {}          # raw socket -> its Connection once the session has one
        self._per_kind = {}
        self._per_address = {}   # (kind, ip) -> sessions
        self._stopping = False
        self._loop = None        # the session loop, once a parked session needs it
        self._headers = None     # the proxy_reader.HeaderReader, once a listener needs it
        self._freed = 0          # sessions ended so far (for the refuser thread)
        self._stop_event = None
        self._sessions = 0       # sessions running, until their on_close callbacks end
        self._idle = 0           # session threads waiting for work
        self._work = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.counters = {"connections": 0, "refused": 0}
        self._selector = None
        self._paused = {}        # listener -> monotonic time it accepts again
        self._shortage = DescriptorShortage()

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
        for item in items or listen_sockets.wildcard_addresses():
            sock = listen_sockets.open_socket(item, port, self.backlog)
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
        self._shortage.open_reserve()
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
            self._shortage.close_reserve()

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
        self._shortage.accepted(lst)
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
            connection.answer_and_close(sock, lst.refused_reply)
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
        """accept() found no descriptor: the shortage is handled, the listener paused."""
        refused = self._shortage.failed(lst, e)
        with self._lock:
            self.counters["refused"] += refused
            if self._stopping:
                return
            self._paused[lst] = time.monotonic() + OUT_OF_DESCRIPTORS_PAUSE
        if lst.conversation is not None:
            self._loop.unwatch(lst.sock)
        else:
            self._selector.unregister(lst.sock)
        # (From the session loop's thread: the accept loop must learn of the pause.)
        self.wake()

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
        """Hands a connection to the session loop.

        A session the loop refuses (one that declares THREAD_ONLY: a wiring
        mistake, see `SessionLoop.add`) fails like any other that cannot
        start: it is logged and its connection closed.
        """
        loop = self._session_loop()

        def done():
            self._ended(lst, sock, addr, peer)
            with self._lock:
                self._sessions -= 1
                self._lock.notify_all()
        try:
            conn = session_loop.LoopConnection(sock, addr, lst.local)
            loop.add(lst.conversation(conn), conn, done)
        except Exception as e:
            log.error("%s: session with %s failed: %s: %s" % (lst.kind, peer, type(e).__name__, e))
            done()

    def _register(self, sock, conn):
        """A parked session started TLS: shutdown reaches it through its new connection."""
        with self._lock:
            self._live[sock] = conn

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
