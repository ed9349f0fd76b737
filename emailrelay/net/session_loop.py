"""Driving protocol conversations: one selector thread for many parked sessions.

A conversation is a generator (`SmtpSession.conversation()`) written as
straight-line code. It writes replies through `session.conn` as before
(`write`, `flush`, `pending`, `unread`, `tls`...), and wherever it would
block it yields a request instead (`requests`: line, read, call, sleep,
starttls), which its driver answers: `SessionLoop` here, or
`thread_driver.drive` in the calling thread (a session thread, --inetd,
--bsmtp and the tests).

`SessionLoop` runs every plain-TCP SMTP conversation in one thread, the
half-sync/half-async pattern: a session waiting for its client costs no
thread, and the listening sockets are accepted from in the same thread (a
few connections per turn, so that a flood to refuse cannot starve the
sessions). The loop chooses where each call runs. A call of a function
its owner marked `device_waits.device_bound` (a message's commit: syncs
and renames) whose device waits have lately been short (tmpfs, a disk
with a fast cache) runs in the loop thread itself; every other call
(filter and verifier programs, DNS block lists, anything that may wait
for the network, and a commit that waits for a slow disk) goes to a pool
(`call_pool`) whose threads are started only as slow calls overlap. What
decides is the time the function waited for its device
(`device_waits.waited`), not the time it took: its CPU time has to be
spent with the GIL wherever it runs, and a tracer or a busy CPU would
make quick work look slow. The pool may grow to as many threads as the
loop has sessions (`pool_size`, the listeners' connection budget), and a
call that has waited `call_pool.GROW_AFTER` for a thread gets a new one
(the loop's own timer sees to it, not only the next call): since a
conversation has at most one call at a time, no call waits behind the
slow calls of other sessions, and a policy's timeout counts from when
the call was made. A session that starts TLS moves to a thread of its
own (non-blocking TLS is not worth its complexity for the few sessions
that use it). With one thread doing the protocol work for every
connection, the GIL changes hands only when work goes to or comes back
from the pool, not on every system call of twenty session threads.
Replies are sent before a session waits for more input, so pipelining
works as in a session thread; the output owed to a client that does not
read, and the input of one that sends during a call, are bounded
(`connection.WRITE_HIGH_WATER`, `connection.READ_HIGH_WATER`). Each
conversation takes at most TURN requests from its buffered input in one
pass of the loop, then waits for the next pass: a client that pipelines
without end gets its turns, and everyone else theirs in between.
"""

import collections
import heapq
import selectors
import socket
import threading
import time

from ..runtime import device_waits, log
from . import call_pool, connection, requests, thread_driver

# Most worker threads for calls when the loop is not told its session
# budget (the default --max-connections).
POOL_SIZE = 200
# A device-bound call that has lately waited less than this many seconds
# for its device runs in the loop thread itself: handing it to the pool
# and back costs more.
QUICK = 0.0005
# Times a slow device-bound call goes to the pool between two tries in the
# loop thread.
PROBE_EVERY = 256
# Seconds between looks for conversations whose client has been idle too long.
SWEEP_INTERVAL = 0.5
# Requests ("line", "read") a conversation may serve from its buffered input
# in one pass of the loop: a pipelined transaction (MAIL, a few RCPTs, DATA
# and its text). More waits for the next pass, after every other
# conversation. A pass lasts about as long as the busy conversations' turns
# together: with 500 clients pipelining NOOPs without end, 8 gave another
# client a transaction in 0.3 s, 32 in 1 s.
TURN = 8
# What `SessionLoop._input` gives for a conversation whose turn is over.
_PARKED = object()


class LoopConnection(connection.Connection):
    """A connection served by the loop: non-blocking, input taken only from its buffer.

    The loop fills the buffer when the socket is readable and sends queued
    output when it is writable; `flush` sends what the socket takes now.
    """

    def __init__(self, sock, peer, local):
        super().__init__(sock, peer, local)
        sock.setblocking(False)
        self._timeout = self.timeout = None
        self.eof = False
        self.broken = False

    def settimeout(self, seconds):
        """Sets the idle timeout for the loop to apply (None: none)."""
        self.timeout = seconds

    def take(self, n):
        """At most `n` buffered octets, b'' at end of input; None when more is needed."""
        if self._buf:
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data
        return b"" if self.eof else None

    def receive(self):
        """Reads what the socket has into the buffer (end of input sets `eof`)."""
        try:
            data = self.sock.recv(connection.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._buf += data
        else:
            self.eof = True

    def write(self, data):
        """Queues `data`; the loop sends it (see `flush`)."""
        self._out += data

    def flush(self):
        """Sends as much queued output as the socket takes without waiting."""
        out = self._out
        while out and not self.broken:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # The peer is gone: what it was owed is dropped, and its
                # next read finds the end of input.
                self.broken = True
                self.eof = True
                out.clear()
                return
            del out[:sent]
        if self.broken:
            out.clear()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class _Entry:
    """One conversation in the loop, and what it waits for."""

    __slots__ = ("session", "gen", "conn", "request", "mask", "token", "done", "handed_off",
                 "since", "turn", "served")

    def __init__(self, session, gen, conn, done):
        self.session = session
        self.gen = gen
        self.conn = conn
        self.request = ("start",)
        self.mask = 0
        self.token = 0          # changes whenever a wait starts: stale timers are ignored
        self.done = done
        self.handed_off = False
        self.since = 0.0        # when the client last did something (idle timeout)
        self.turn = 0           # the loop pass in which `served` requests were served
        self.served = 0


class SessionLoop:
    """One thread serving many conversations; see the module docstring.

    `add(session, conn, done)` starts a conversation (`session.conn` is the
    LoopConnection `conn`); `done()` is called once it has ended and its
    socket is closed, or once a thread it was handed to has ended it.
    `register(sock, conn)` is told of the blocking connection a session
    gets when it starts TLS, so that shutdown can reach it. `pool_size`
    bounds the threads for calls: give it the most sessions the loop may
    serve at once, so that no call ever waits for another session's. `stop()` ends
    waiting conversations as if their clients had gone, lets running calls
    finish, and returns at once; `done` callbacks say when each has ended.
    """

    def __init__(self, register=None, stop_event=None, name="smtp", pool_size=POOL_SIZE):
        self._register = register
        self._stop_event = stop_event
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._inbox = collections.deque()   # (entry, value, exc) from other threads
        self._cost = {}                      # call -> running mean of its waits here
        self._skipped = {}                   # call -> pool calls since it was last tried here
        self._timers = []                    # heap of (deadline, seq, entry, token): sleeps
        self._seq = 0
        self._entries = set()
        self._passes = 0
        self._parked = collections.deque()  # (entry, token): turns over, resumed next pass
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self._stopping = False
        self._pool = call_pool.CallPool(pool_size, "%s work" % name)
        self._grow_at = None                 # when queued calls may need another worker
        self._thread = threading.Thread(target=self._run, name="%s loop" % name, daemon=True)
        self._thread.start()

    # -- other threads ---------------------------------------------------

    def add(self, session, conn, done):
        """Starts `session.conversation()` in the loop (from any thread).

        Raises ValueError, and starts nothing, for a session whose class
        declares THREAD_ONLY true (`server.session_core.LineSession`): its
        handlers block inline, which would stop every conversation here.
        """
        if getattr(session, "THREAD_ONLY", False):
            raise ValueError("%s is thread-only: the session loop cannot serve it"
                             % type(session).__name__)
        entry = _Entry(session, None, conn, done)
        if threading.get_ident() == self._thread.ident:
            self._start(entry)
        else:
            self._post(entry, None, None)

    def watch(self, sock, on_ready):
        """Calls on_ready() in the loop thread whenever listening socket `sock` is readable.

        Accepting here saves handing each connection from one thread to
        another, which is most of what a connection costs.
        """
        self._post(None, lambda: self._selector.register(sock, selectors.EVENT_READ, on_ready),
                   None)

    def unwatch(self, sock):
        """Stops watching listening socket `sock` (from any thread), so it can be closed.

        Waits (briefly) until the loop has let go of it: a socket closed
        while registered could keep signalling through a copy another
        process holds (--workers). From the loop thread itself (an accept
        that pauses its listener) it lets go at once.
        """
        done = threading.Event()

        def forget():
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            done.set()
        if threading.get_ident() == self._thread.ident:
            forget()
            return
        self._post(None, forget, None)
        done.wait(5)

    def stop(self):
        """Ends the conversations that wait for their clients (from any thread)."""
        with self._lock:
            self._stopping = True
        self._wake()

    def _here(self, key):
        """True when a call of device-bound function `key` should run in the loop thread (see QUICK).

        A function never seen is tried here once; one found to wait goes to
        the pool, and is tried here again every PROBE_EVERY times in case it
        has become quick (the disk is idle again, say). Waits are measured
        only here: in the pool they would include waits for the GIL.
        """
        cost = self._cost.get(key)
        if cost is None or cost < QUICK:
            return True
        n = self._skipped.get(key, 0) + 1
        self._skipped[key] = 0 if n >= PROBE_EVERY else n
        return n >= PROBE_EVERY

    def _learn(self, key, seconds):
        """Keeps a running mean of how long calls to `key` wait here."""
        old = self._cost.get(key)
        self._cost[key] = seconds if old is None else old + (seconds - old) / 4

    def _post(self, entry, value, exc):
        with self._lock:
            idle = not self._inbox
            self._inbox.append((entry, value, exc))
        # A loop with an inbox already waiting to be read has been woken.
        if idle:
            self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop thread -------------------------------------------------

    def _run(self):
        select = self._selector.select
        while True:
            self._passes += 1
            if self._parked:
                self._resume_parked()
            now = time.monotonic()
            timeout = self._next_sweep - now if self._entries else None
            for wake in (self._timers[0][0] if self._timers else None, self._grow_at):
                if wake is not None:
                    timeout = wake - now if timeout is None else min(timeout, wake - now)
            if self._parked:
                timeout = 0
            events = select(None if timeout is None else max(timeout, 0))
            now = time.monotonic()
            for key, mask in events:
                entry = key.data
                if entry is None:
                    self._drain_wake()
                    continue
                if type(entry) is not _Entry:
                    try:
                        entry()         # a listener (see watch)
                    except Exception as e:
                        log.error("%s: accepting failed: %s" % (self._name, e))
                    continue
                try:
                    entry.since = now
                    if mask & selectors.EVENT_READ:
                        entry.conn.receive()
                    self._pump(entry)
                except Exception as e:  # a bug here must not stop every session
                    self._fail(entry, e)
            self._take_inbox()
            now = time.monotonic()
            if self._timers and self._timers[0][0] <= now:
                self._fire_timers(now)
            if self._grow_at is not None and now >= self._grow_at:
                self._grow_at = self._pool.grow(now)
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_INTERVAL
                self._sweep(now)

    def _resume_parked(self):
        """Gives the conversations parked in the last pass their next turn."""
        parked = self._parked
        for _ in range(len(parked)):
            entry, token = parked.popleft()
            if token != entry.token or entry.request is None:
                continue
            try:
                self._pump(entry)
            except Exception as e:
                self._fail(entry, e)

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _take_inbox(self):
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            stopping = self._stopping
        for entry, value, exc in items:
            if entry is None:
                value()         # a registration from watch() or unwatch()
                continue
            try:
                if entry.gen is None:
                    self._start(entry)
                else:
                    self._step(entry, value, exc)
            except Exception as e:
                self._fail(entry, e)
        if stopping:
            for entry in list(self._entries):
                try:
                    self._end_input(entry)
                except Exception as e:
                    self._fail(entry, e)

    def _end_input(self, entry):
        """Shutdown: the client of a waiting conversation is treated as gone."""
        conn = entry.conn
        if entry.handed_off or conn.eof:
            return
        conn.eof = True
        conn.discard_input()
        # Whatever it waited for (a timer, its next turn) is forgotten.
        entry.token += 1
        if entry.request is not None and entry.request[0] == requests.SLEEP:
            self._step(entry, None, None)
        elif entry.request is not None and entry.request[0] in (requests.LINE, requests.READ):
            self._pump(entry)

    def _start(self, entry):
        self._entries.add(entry)
        try:
            entry.gen = entry.session.conversation()
        except Exception as e:
            self._fail(entry, e)
            return
        with self._lock:
            stopping = self._stopping
        if stopping:
            entry.conn.eof = True
        self._step(entry, None, None)

    def _step(self, entry, value, exc):
        """Resumes a conversation and serves its requests until it must wait."""
        conn = entry.conn
        gen = entry.gen
        while True:
            try:
                request = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration:
                entry.request = ("end",)
                self._pump(entry)
                return
            except Exception as e:
                self._fail(entry, e)
                return
            value = exc = None
            kind = request[0]
            entry.request = request
            if kind == requests.LINE or kind == requests.READ:
                if conn.unsent() >= connection.WRITE_HIGH_WATER:
                    conn.flush()
                    if conn.unsent() >= connection.WRITE_HIGH_WATER:
                        self._wait(entry, selectors.EVENT_WRITE)
                        return
                try:
                    got = self._input(entry, request)
                except connection.LineTooLong as e:
                    exc = e
                    continue
                if got is _PARKED:
                    return
                if got is not None:
                    value = got
                    continue
                self._pump(entry)
                return
            if kind == requests.CALL:
                conn.flush()
                fn = request[1]
                key = getattr(fn, "__func__", fn)
                if device_waits.is_device_bound(fn) and self._here(key):
                    before = device_waits.waited()
                    try:
                        value = fn(*request[2])
                    except Exception as e:
                        exc = e
                    self._learn(key, device_waits.waited() - before)
                    continue
                # The socket stays registered: input that arrives meanwhile
                # is buffered (up to READ_HIGH_WATER, see _pump).
                entry.request = (requests.CALL,)
                due = self._pool.submit(entry, fn, request[2], self._post)
                if due is not None and (self._grow_at is None or due < self._grow_at):
                    self._grow_at = due
                return
            if kind == requests.SLEEP:
                self._pump(entry)
                return
            if kind == requests.STARTTLS:
                self._hand_off(entry, request)
                return
            exc = ValueError("unknown conversation request %r" % (kind,))

    def _pump(self, entry):
        """Moves a waiting conversation on: output first, then input, a timer or the end."""
        conn = entry.conn
        request = entry.request
        if request is None or request[0] == requests.STARTTLS:
            return      # ended, or another thread has it
        if request[0] == requests.CALL:
            # Stop listening once there is enough to read, or the end of
            # input (which would be reported again and again meanwhile).
            if conn.eof or conn.buffered() >= connection.READ_HIGH_WATER:
                self._wait(entry, 0)
            return
        if conn.unsent():
            conn.flush()
            if conn.unsent():
                # Replies go out before the session waits for more input.
                self._wait(entry, selectors.EVENT_WRITE)
                return
        kind = request[0]
        if kind == requests.LINE or kind == requests.READ:
            try:
                got = self._input(entry, request)
            except connection.LineTooLong as e:
                self._step(entry, None, e)
                return
            if got is _PARKED:
                return
            if got is not None:
                self._step(entry, got, None)
                return
            self._wait(entry, selectors.EVENT_READ)
        elif kind == requests.SLEEP:
            self._wait(entry, 0)
            self._seq += 1
            heapq.heappush(self._timers, (time.monotonic() + request[1], self._seq, entry,
                                          entry.token))
        elif kind == "end":
            self._finish(entry)

    def _input(self, entry, request):
        """What a "line" or "read" request gets from the buffered input now.

        None when more input is needed; _PARKED when the conversation has
        had its TURN in this pass: it stops listening (its input stays
        bounded) and is resumed at the start of the next pass.
        """
        conn = entry.conn
        if conn.buffered():
            if entry.turn != self._passes:
                entry.turn = self._passes
                entry.served = 0
            entry.served += 1
            if entry.served > TURN:
                self._wait(entry, 0)
                self._parked.append((entry, entry.token))
                return _PARKED
        elif not conn.eof:
            # Nothing buffered and more to come: more input is needed, as
            # next_line and take would say. The common case (the client
            # waits for our reply), answered without calling them.
            return None
        return conn.next_line(request[1], conn.eof) if request[0] == requests.LINE else conn.take(request[1])

    def _wait(self, entry, mask):
        entry.token += 1
        if mask == entry.mask:
            return
        if mask:
            entry.since = time.monotonic()
        sock = entry.conn.sock
        if entry.mask == 0:
            self._selector.register(sock, mask, entry)
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, entry)
        entry.mask = mask

    def _fire_timers(self, now):
        """Ends the sleeps that are due."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, entry, token = heapq.heappop(timers)
            if token != entry.token or entry not in self._entries:
                continue
            try:
                self._step(entry, None, None)
            except Exception as e:
                self._fail(entry, e)

    def _sweep(self, now):
        """Ends the waits of clients that have been idle (not sending, not reading) too long.

        A conversation gets connection.Timeout at the request it is at; one that
        has ended and still has output for a client that does not read is
        closed.
        """
        for entry in list(self._entries):
            timeout = entry.conn.timeout
            if not (entry.mask and timeout and now - entry.since >= timeout) \
                    or entry.request[0] == requests.CALL:
                continue
            try:
                if entry.request[0] == "end":
                    self._finish(entry)
                else:
                    self._wait(entry, 0)
                    self._step(entry, None, connection.Timeout())
            except Exception as e:
                self._fail(entry, e)

    def _hand_off(self, entry, request):
        """STARTTLS: the conversation goes on in a thread of its own, over a blocking socket."""
        self._wait(entry, 0)
        self._entries.discard(entry)
        entry.handed_off = True
        old = entry.conn
        sock = old.sock
        try:
            sock.setblocking(True)
            conn = connection.Connection(sock, old.peer, old.local)
            conn.settimeout(old.timeout)
        except OSError as e:
            self._fail(entry, e)
            return
        # What the loop could not send yet goes first, from the new thread
        # (starttls flushes before the handshake).
        old.hand_over_output(conn)
        entry.session.conn = conn
        if self._register is not None:
            self._register(sock, conn)
        threading.Thread(target=self._threaded, args=(entry, request),
                         name="%s tls" % self._name, daemon=True).start()

    def _threaded(self, entry, request):
        try:
            thread_driver.drive_from(entry.session, entry.gen, request, self._stop_event)
        except Exception as e:
            log.error("%s: session failed: %s: %s" % (self._name, type(e).__name__, e))
        finally:
            entry.done()

    def _fail(self, entry, e):
        log.error("%s: session failed: %s: %s" % (self._name, type(e).__name__, e))
        if entry.gen is not None:
            try:
                entry.gen.close()
            except Exception:
                pass
        self._finish(entry)

    def _finish(self, entry):
        if entry.request is None:
            return
        entry.request = None
        self._wait(entry, 0)
        self._entries.discard(entry)
        entry.conn.close()
        try:
            entry.done()
        except Exception as e:
            log.error("%s: after-session action failed: %s" % (self._name, e))
