"""The forwarding thread: when the spool is sent to the --forward-to server.

One `Forwarder` per process, and its thread runs the forwarding passes
(`passes`). It runs them when triggered: at start-up (--forward), on the
--poll timer, when a message's retry time comes (`retry`), and whenever
`trigger()` is called (end of an SMTP session with --forward-on-disconnect,
ETRN, the admin `forward` command, a filter's exit 103 through `rescan()`).
Only one pass runs at a time; triggers that arrive during a pass make
exactly one more pass afterwards, so none is lost. `flush()` asks for a
pass and waits for its result; `run_once()` is the whole of --as-client
(one pass in the caller's thread). Passes other than `flush()` and
--as-client skip messages whose retry time has not come; the thread wakes
for the earliest one by itself, without --poll. For --immediate,
`immediate_link()` gives an SMTP session an `immediate.ImmediateLink`,
which sends in the session's thread; the forwarding thread only sends its
QUIT (`submit()`).

`stop()` lets the message in hand finish for STOP_GRACE seconds; a next
hop still silent then is abandoned (its connection shut down, which wakes
the thread wherever it waits), and the messages in hand go back to the
queue with a warning naming each, not counted as an attempt.
"""

import collections
import threading
import time

from ..runtime import log
from ..util.stats import Stats
from . import passes, retry
from .immediate import ImmediateLink
from .sending import PassResult, Sender

# Seconds stop() lets the message in hand finish before abandoning it.
STOP_GRACE = 5.0


class Forwarder:
    """Forwards the spool to the next hop; see the module docstring.

    `client_filters` are `filters.Filter` objects run before each message;
    `client_secret` is the --client-auth secret (or None); `tls_context`
    the client TLS context (or None); `events` an `events.Events` (or
    None); `stats` a `stats.Stats` whose `messages-forwarded`,
    `messages-failed` and `messages-deferred` counters are incremented.
    The next hop is `cfg.forward_address`, as the option parser read it.
    """

    def __init__(self, cfg, spool, client_filters=(), client_secret=None, tls_context=None,
                 events=None, stats=None):
        self.cfg = cfg
        self.spool = spool
        self._cond = threading.Condition()
        self._pending = False
        self._force = False
        self._requested = 0
        self._completed = 0
        self._last = None
        self._stopping = False
        self._thread = None
        self._jobs = collections.deque()
        # Messages waiting for a retry; --immediate sessions add to it too.
        self._schedule = retry.Schedule(self._cond)
        self._sender = Sender(cfg, spool, client_filters, client_secret, tls_context, events,
                              stats if stats is not None else Stats(), retry.Policy(cfg),
                              self._schedule)

    # -- triggers ------------------------------------------------------

    def start(self, initial=False):
        """Starts the forwarding thread; with `initial`, a pass runs at once."""
        if initial:
            self.trigger()
        self._thread = threading.Thread(target=self._loop, name="forwarder", daemon=True)
        self._thread.start()

    @property
    def running(self):
        """True while the thread runs and is not stopping."""
        return not self._stopping and self._thread is not None

    def trigger(self):
        """Asks for a pass (asynchronous). Returns at once."""
        with self._cond:
            self._pending = True
            self._requested += 1
            self._cond.notify_all()
        return True

    def rescan(self):
        """A --filter exited 103 after its message was committed: a pass, logged."""
        log.info("forwarding: [rescan]")
        self.trigger()

    def flush(self):
        """Runs a pass now (after any running one), retry times or not, and waits.

        Returns (ok, text): `OK`, `error: no messages to send`, or
        `error: <what went wrong>`, as the admin `flush` command answers.
        """
        # A message a running pass holds (.busy) is still a message to send.
        if not any(state in ("ready", "busy") for _, state in self.spool.list_messages()):
            return False, "error: no messages to send"
        with self._cond:
            self._pending = True
            self._force = True
            self._requested += 1
            wanted = self._requested
            self._cond.notify_all()
            while self._completed < wanted and not self._stopping:
                self._cond.wait(1.0)
            if self._completed < wanted:
                return False, "error: forwarding is stopping"
            result = self._last
        return result.ok, result.text()

    def stop(self, grace=STOP_GRACE):
        """Stops after the message in hand (thread or run_once), waiting `grace` seconds at most.

        Past the grace the sessions with the next hop are aborted and the
        messages in hand stay queued (see the module docstring).
        """
        sender = self._sender
        with self._cond:
            self._stopping = True
            sender.stop()
            self._jobs.clear()
            self._cond.notify_all()
        if not sender.wait_idle(grace):
            log.warning("forwarding: stopping: the next hop has not finished within %ss: "
                        "abandoning the session" % retry.seconds(grace))
            sender.abort()
            # Aborted, the senders release their claims at once (--immediate
            # ones run in session threads, which the process does not wait for).
            sender.wait_idle(grace)
        if self._thread is not None:
            self._thread.join(30)

    def immediate_link(self):
        """A handle for one SMTP session's --immediate messages (see ImmediateLink)."""
        return ImmediateLink(self, self._sender)

    def submit(self, fn):
        """Has the forwarding thread call `fn` soon (not at all when it is stopping)."""
        with self._cond:
            if self._stopping or self._thread is None:
                return
            self._jobs.append(fn)
            self._cond.notify_all()

    def run_once(self):
        """Forwards everything now, in this thread (--as-client, --dont-serve).

        One pass that tries every queued message, retry time or not. True
        only when every message went (none failed or waits for a retry).
        """
        return self.run_pass(force=True).ok

    def run_pass(self, force=False):
        """One pass over the spool in this thread (see `passes.run()`); returns a PassResult.

        With `force`, messages waiting for their retry time are tried too.
        """
        return passes.run(self._sender, force, between=self._run_jobs)

    # -- the thread ----------------------------------------------------

    def _run_jobs(self):
        while True:
            with self._cond:
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception as e:  # the thread must survive anything a job meets
                log.error("forwarding: unexpected error: %s: %s" % (type(e).__name__, e))

    def _next_wake(self, next_poll):
        """The monotonic time the thread must wake by itself, or None."""
        times = [next_poll] if next_poll is not None else []
        due = self._schedule.earliest()
        if due is not None:
            times.append(time.monotonic() + max(0.0, due - time.time()))
        return min(times) if times else None

    def _loop(self):
        poll = self.cfg.poll if self.cfg.poll and self.cfg.poll > 0 else None
        next_poll = time.monotonic() + poll if poll else None
        while True:
            with self._cond:
                while not self._pending and not self._jobs and not self._stopping:
                    wake = self._next_wake(next_poll)
                    if wake is None:
                        self._cond.wait()
                        continue
                    remaining = wake - time.monotonic()
                    if remaining <= 0:
                        self._pending = True
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    break
                if self._jobs:
                    run_pass = False
                else:
                    run_pass = True
                    self._pending = False
                    force, self._force = self._force, False
                    generation = self._requested
            if not run_pass:
                self._run_jobs()
                continue
            if poll:
                next_poll = time.monotonic() + poll
            try:
                result = self.run_pass(force)
            except Exception as e:  # the thread must survive anything a pass meets
                log.error("forwarding: unexpected error: %s: %s" % (type(e).__name__, e))
                result = PassResult()
                result.error = str(e)
            with self._cond:
                self._completed = max(self._completed, generation)
                self._last = result
                self._cond.notify_all()
