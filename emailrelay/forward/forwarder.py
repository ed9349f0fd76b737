"""The forwarding thread: sends the spool to the --forward-to server.

One `Forwarder` per process, and its thread runs the forwarding passes
(--immediate sessions claim their own messages, below). It runs them when triggered: at
start-up (--forward), on the --poll timer, when a message's retry time comes,
and whenever `trigger()` is called (end of an SMTP session with
--forward-on-disconnect, ETRN, the admin `forward` command, a filter's exit
103 through `rescan()`). Only one pass runs at a time; triggers that arrive
during a pass make exactly one more pass afterwards, so none is lost.
`flush()` asks for a pass and waits for its result; `run_once()` is the
whole of --as-client (one pass in the caller's thread). For --immediate,
`immediate_link()` gives an SMTP session a handle whose `forward(id)`
sends the message in the calling thread, on one connection to the next hop
kept for that session: sessions forward side by side, as E-MailRelay's do,
so a next hop that is slow to answer one submitter does not hold up the
others (each waits at most the client timeouts). A claim is a rename that
only one thread or process wins, so a pass running meanwhile never sends a
message twice: whichever loses leaves it to the other.

A pass claims each ready message (so processes sharing a spool never send
one twice), runs the --client-filter programs, and hands the message to one
`smtp_client.Client` connection kept for the whole pass. An accepted message
leaves the queue as soon as its `250` is in, before anything else is sent,
so a crash sends again at most the message in flight; after --user the
spool work between two messages takes one root window. Permanent refusals (5xx,
a certificate that fails verification, AUTH refused or impossible, a client
filter's refusal, no remote recipients, unreadable content or an address
that cannot be sent) make the message `.bad` with the reason.

Temporary failures (a 4xx, or a next hop that cannot be reached) are
retried automatically (ours: E-MailRelay leaves that to a cron job running
emailrelay-resubmit): the message stays queued with its retry state in the
envelope trailer (`envelope.Retry`), tried again after --retry-interval,
twice that, four times that ... up to --retry-max-interval, until it has
been failing for --retry-lifetime, when it becomes `.bad`. Passes other than
`flush()` and --as-client skip messages whose time has not come; the thread
wakes for the earliest one by itself, without --poll. `--retry-interval 0`
keeps E-MailRelay's behaviour: a 4xx fails the message at once, and an
unreachable next hop leaves it queued for the next trigger.

`stop()` lets the message in hand finish for STOP_GRACE seconds; a next
hop still silent then is abandoned (its connection shut down, which wakes
the thread wherever it waits), and the messages in hand go back to the
queue with a warning naming each, not counted as an attempt.

`Events` is the small publish/subscribe channel behind the admin `notify`
command; the forwarder publishes one-line events to it (a pass starts or
ends, a message is deferred).
"""

import collections
import math
import os
import queue
import threading
import time
import weakref

from ..auth import sasl
from ..runtime import log, process
from ..store import envelope as envelope_mod, spool
from ..util.stats import Stats
from . import smtp_client

# Seconds stop() lets the message in hand finish before abandoning it.
STOP_GRACE = 5.0


class Events:
    """Fan-out of one-line event texts to any number of subscribers.

    `subscribe()` returns a queue that receives every text published from
    then on; `unsubscribe(q)` stops that. `publish(text)` never blocks.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers = []

    def subscribe(self):
        q = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q):
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def publish(self, text):
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            q.put(text)


class PassResult:
    """The result of one pass: counts and the first problem, if any."""

    def __init__(self):
        self.sent = 0
        self.failed = 0
        self.deferred = 0
        self.skipped = 0
        self.processed = 0
        self.error = None
        self.stopped = False
        # The reason the last message failed (for an --immediate reply).
        self.reason = None

    @property
    def ok(self):
        """True when every message went (none failed or waits for a retry)."""
        return self.failed == 0 and self.deferred == 0 and self.error is None

    def summary(self):
        """The counts, as the log line after a pass and `flush` both say them."""
        return "%d message(s) sent, %d failed%s%s" % (
            self.sent, self.failed,
            ", %d to be retried" % self.deferred if self.deferred else "",
            ", %d skipped" % self.skipped if self.skipped else "")

    def text(self):
        """`OK`, or what went wrong, for the admin `flush` command."""
        if self.error is not None:
            return "error: %s" % self.error
        if self.failed or self.deferred:
            return "error: %s" % self.summary()
        return "OK"


class ImmediateLink:
    """--immediate for one SMTP session (from `Forwarder.immediate_link()`).

    `forward(id)` sends a just-committed message in the calling thread and
    returns None when the message went, or stays queued for a retry or
    another forwarder (the next hop could not be reached: the submitter may
    be told `250`), else a refusal reply (the message is `.bad`; a refusal
    by the next hop, 4xx or 5xx, goes back to the submitter word for word,
    a client filter's as `452 <response>`). The connection to the next hop
    is kept between messages; `close()` ends it (call it when the SMTP
    session ends: the forwarding thread sends the QUIT, so the caller never
    waits).
    """

    def __init__(self, forwarder):
        self._forwarder = forwarder
        # Used by one thread at a time: the session's, then the QUIT's.
        self.client = None

    def forward(self, message_id):
        forwarder = self._forwarder
        if forwarder._stopping or forwarder._thread is None:
            # Not forwarding now: the message stays queued for the next start.
            return None
        return forwarder._forward_immediate(self, message_id)

    def close(self):
        self._forwarder._submit(self._quit)

    def _quit(self):
        if self.client is not None:
            self.client.quit()
            self.client = None


class Forwarder:
    """Forwards the spool to the next hop; see the module docstring.

    `client_filters` are `filters.Filter` objects run before each message;
    `client_secret` is the --client-auth secret (or None); `tls_context`
    the client TLS context (or None); `events` an `Events` (or None);
    `stats` a `stats.Stats` whose `messages-forwarded`/`messages-failed`
    counters are incremented. The next hop is `cfg.forward_address`, as
    the option parser read it.
    """

    def __init__(self, cfg, spool, client_filters=(), client_secret=None, tls_context=None,
                 events=None, stats=None):
        self.cfg = cfg
        self.spool = spool
        self.client_filters = list(client_filters)
        self.client_secret = client_secret
        self.tls_context = tls_context
        self.events = events
        self.stats = stats if stats is not None else Stats()
        self.retry_interval = cfg.retry_interval or 0
        self.retry_max_interval = max(cfg.retry_max_interval or 0, self.retry_interval)
        self.retry_lifetime = cfg.retry_lifetime or 0
        self._cond = threading.Condition()
        self._pending = False
        self._force = False
        self._requested = 0
        self._completed = 0
        self._last = None
        self._stopping = False
        self._thread = None
        self._jobs = collections.deque()
        # Message id -> time of its next attempt (messages waiting for a
        # retry); --immediate sessions add to it too, so it is used under
        # self._cond.
        self._schedule = {}
        # Passes and --immediate sends running, and every client they use,
        # for stop() to wait for and, past its grace, abort.
        self._sending = 0
        self._clients = weakref.WeakSet()

    # -- triggers ------------------------------------------------------

    def start(self, initial=False):
        """Starts the forwarding thread; with `initial`, a pass runs at once."""
        if initial:
            self.trigger()
        self._thread = threading.Thread(target=self._loop, name="forwarder", daemon=True)
        self._thread.start()

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
        with self._cond:
            self._stopping = True
            self._jobs.clear()
            self._cond.notify_all()
        if not self._wait_sent(grace):
            with self._cond:
                clients = list(self._clients)
            log.warning("forwarding: stopping: the next hop has not finished within %ss: "
                        "abandoning the session" % _seconds(grace))
            for client in clients:
                client.abort()
            # Aborted, the senders release their claims at once (--immediate
            # ones run in session threads, which the process does not wait for).
            self._wait_sent(grace)
        if self._thread is not None:
            self._thread.join(30)

    def _wait_sent(self, seconds):
        """Waits until no pass or --immediate send runs; False if one still does after `seconds`."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._sending and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return not self._sending

    def _begin_sending(self):
        with self._cond:
            self._sending += 1

    def _end_sending(self):
        with self._cond:
            self._sending -= 1
            self._cond.notify_all()

    def immediate_link(self):
        """A handle for one SMTP session's --immediate messages (see ImmediateLink)."""
        return ImmediateLink(self)

    def _submit(self, fn):
        """Has the forwarding thread call `fn` soon (not at all when it is stopping)."""
        with self._cond:
            if self._stopping or self._thread is None:
                return
            self._jobs.append(fn)
            self._cond.notify_all()

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
        if self._schedule:
            due = min(self._schedule.values())
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

    def run_once(self):
        """Forwards everything now, in this thread (--as-client, --dont-serve).

        One pass that tries every queued message, retry time or not. True
        only when every message went (none failed or waits for a retry).
        """
        return self.run_pass(force=True).ok

    # -- passes --------------------------------------------------------

    def _new_client(self):
        auth = None
        if self.client_secret is not None:
            auth = sasl.ClientAuth(self.client_secret, self.cfg.client_auth_config)
        client = smtp_client.Client(self.cfg, auth, self.tls_context)
        # (--immediate sessions make clients in their own threads.)
        with self._cond:
            self._clients.add(client)
        return client

    def run_pass(self, force=False):
        """One pass over the spool with one connection; returns a PassResult.

        With `force`, messages waiting for their retry time are tried too.
        Between two messages the spool work is done in one root window
        (after --user): removing the names of the message just sent (its
        `250` is in), claiming the next one and, without client filters,
        the one after it (whose commands go out with the next content) and
        opening their content. Closing the files of sent messages is left
        to _Deletions.
        """
        result = PassResult()
        self._publish("forwarding: start")
        self._begin_sending()
        client = None
        settler = _Deletions(self._sent)
        claims = self._claims(force, result)
        # Without client filters the message after the current one is known
        # before the current one is sent, so its commands can be pipelined
        # with the current content.
        ahead = not self.client_filters
        claim = following = None
        try:
            while not self._stopping:
                with process.privileged(group=False):
                    settler.flush()
                    claim, following = following, None
                    if claim is None:
                        claim = next(claims, None)
                    if ahead and claim is not None:
                        following = next(claims, None)
                        # (Client filters may replace the content: then it
                        # is opened after them, in _prepare().)
                        for c in (claim, following):
                            _open_content_quietly(c)
                settler.hand_over()
                if claim is None:
                    break
                result.processed += 1
                if client is None:
                    client = self._new_client()
                try:
                    self._forward(claim, client, result, settler, following)
                except smtp_client.ConnectionFailure as e:
                    result.error = str(e)
                    self._connection_failed(claim, e, result)
                    claim = None
                    break
                claim = None
                if result.stopped:
                    break
                self._run_jobs()
        finally:
            if client is not None:
                client.quit()
            for unsent in (claim, following):
                if unsent is not None:
                    _release(unsent)
            settler.close()
            self._end_sending()
        self._publish("forwarding: done: %d sent, %d failed" % (result.sent, result.failed))
        if result.processed:
            log.info("forwarding: %s" % result.summary())
        return result

    def _connection_failed(self, claim, e, result):
        """The session broke while `claim` was in hand: fail or defer it.

        At shutdown (stop() aborted the session) it goes back to the
        queue as it is: that was no attempt.
        """
        if self._stopping:
            log.warning("forwarding: %s: abandoned at shutdown (%s): it stays queued"
                        % (claim.id, e))
            _release(claim)
            return
        if e.permanent:
            log.error("forwarding: %s" % e)
            self._failed(claim, str(e), 0, result)
            return
        self._publish("forwarding: failed: %s" % e)
        if self.retry_interval:
            log.error("forwarding: %s" % e)
            self._temporary(claim, str(e), 0, result)
        else:
            log.error("forwarding: %s: messages stay queued until the next attempt" % e)
            _release(claim)

    def _claims(self, force, result):
        """Claims the messages due for an attempt one at a time, oldest first.

        A message whose envelope cannot be read is failed by the spool and
        counted in `result`.
        """
        def unreadable(reason):
            result.failed += 1
            result.reason = reason
            self._count("messages-failed")
        ids = self.spool.ids()
        present = set(ids)
        with self._cond:
            for gone in [i for i in self._schedule if i not in present]:
                del self._schedule[gone]
        for message_id in ids:
            now = time.time()
            with self._cond:
                due = self._schedule.get(message_id)
            if not force and due is not None and due > now:
                continue
            claim = self.spool.claim(message_id, failed=unreadable)
            if claim is None:
                self._retry_at(message_id, None)
                continue
            state = claim.envelope.retry() if self.retry_interval else None
            due = self._retry_due(claim, state) if state is not None else None
            if not force and due is not None and due > now:
                # Deferred by another process, or by us before a restart.
                self._retry_at(message_id, due)
                _release(claim)
                continue
            self._retry_at(message_id, None)
            yield claim

    def _retry_due(self, claim, state):
        """When a deferred message is due: its stored time, capped by today's settings.

        The time was chosen by whoever deferred it (an earlier run, maybe
        with a longer --retry-max-interval), so it is brought forward to
        at most --retry-max-interval after the deferral, which is when the
        envelope was last written.
        """
        try:
            deferred = os.stat(claim.envelope_path).st_mtime
        except OSError:
            return state.next_time
        return min(state.next_time, int(math.ceil(deferred + self.retry_max_interval)))

    def _run_client_filters(self, claim, result):
        """Runs --client-filter programs on a claimed message.

        Returns None to go on, `'skip'` when a filter said ignore the message
        (exit 100), `'retry'` when a filter could not decide (timeout, crash,
        filter daemon down), or `(reason, code)` when a filter failed it. A
        request to stop scanning after this message is noted in `result`.
        """
        for f in self.client_filters:
            r = f.run(claim.content_path, claim.envelope_path)
            if r.stop:
                result.stopped = True
            if r.cancel:
                return "skip"
            if not r.ok and r.temporary:
                log.warning("forwarding: %s: client filter [%s]: failed response=[%s] reason=[%s]"
                            % (claim.id, log.sanitise(f.spec), r.response, log.sanitise(r.reason)))
                return "retry"
            if not r.ok:
                return (r.reason or "client filter failed", r.code if r.code is not None else 0)
        return None

    def _prepare(self, claim, result):
        """Client filters and checks before sending; False when `claim` is settled."""
        if self.client_filters:
            verdict = self._run_client_filters(claim, result)
            if verdict == "skip":
                log.info("forwarding: %s: client filter says ignore this message" % claim.id)
                _release(claim)
                result.skipped += 1
                return False
            if verdict == "retry":
                self._temporary(claim, "client filter failed", 0, result)
                return False
            if verdict is not None:
                self._failed(claim, verdict[0], verdict[1], result)
                return False
            # A filter may have edited the envelope.
            try:
                claim.reread()
            except (OSError, envelope_mod.EnvelopeError) as e:
                self._failed(claim, "invalid envelope file after the client filter: %s" % e, 0, result)
                return False
        if not claim.envelope.to_remote:
            self._failed(claim, "no remote recipients", 0, result)
            return False
        try:
            claim.open_content()
        except spool.ContentError as e:
            self._failed(claim, str(e), 0, result)
            return False
        return True

    def _forward(self, claim, client, result, settler, following=None):
        """Filters and sends one claimed message and settles its files."""
        if not self._prepare(claim, result):
            return
        if following is not None and not following.envelope.to_remote:
            following = None
        outcome = client.send(claim, following)
        self._settle(claim, outcome, result, client.target, settler)

    def _settle(self, claim, outcome, result, relay, settler=None):
        """Deletes, fails or defers `claim` after `outcome` from the next hop `relay`."""
        if not outcome.ok:
            if outcome.temporary:
                self._temporary(claim, outcome.reason, outcome.code, result)
            else:
                self._failed(claim, outcome.reason, outcome.code, result)
            return
        if outcome.rejected:
            # --forward-to-some: the message went to the others; keep a copy
            # addressed to the refused recipients only, for a retry.
            env = claim.envelope
            refused = [r for r, _ in outcome.rejected]
            accepted = [r for r in env.to_remote if r not in refused]
            env.to_remote = refused
            claim.rewrite(env)
            reason = smtp_client.rejection_reason("one or more", outcome.rejected)
            code = max(int(text[:3]) for _, text in outcome.rejected)
            self._sent(claim.id, _delivery(accepted, relay, outcome.reason), result)
            if 400 <= code < 500:
                self._temporary(claim, reason, code, result)
            else:
                self._failed(claim, reason, code, result)
            return
        result.sent += 1
        delivery = _delivery(claim.envelope.to_remote, relay, outcome.reason)
        if settler is None:
            claim.delete()
            self._sent(claim.id, delivery)
        else:
            settler.add(claim, delivery)

    def _temporary(self, claim, reason, code, result):
        """A temporary failure: defer `claim` for a retry, or fail it (see the module docstring)."""
        if not self.retry_interval:
            if code:
                self._failed(claim, reason, code, result)
            else:
                _release(claim)
            return
        now = time.time()
        state = claim.envelope.retry()
        count = state.count + 1 if state is not None else 1
        first = state.first_time if state is not None else int(now)
        if now - first >= self.retry_lifetime:
            self._failed(claim, "%s (gave up after %d attempts in %ds)" % (reason, count, now - first),
                         code, result)
            return
        delay = min(self.retry_interval * 2 ** (count - 1), self.retry_max_interval)
        # Whole seconds, as the envelope keeps them.
        next_time = int(math.ceil(now + delay))
        claim.defer(envelope_mod.Retry(count, next_time, first, reason))
        self._retry_at(claim.id, next_time)
        result.deferred += 1
        self._count("messages-deferred")
        log.warning("forwarding: %s: temporary failure %d: %s: next attempt in %ss"
                    % (claim.id, count, reason, _seconds(delay)))
        self._publish("deferred %s: %s" % (claim.id, reason))

    def _retry_at(self, message_id, when):
        """Notes when message `message_id` is due again (None: not waiting).

        The forwarding thread is woken to work out its next wake-up, for a
        message an --immediate session deferred.
        """
        with self._cond:
            if when is None:
                self._schedule.pop(message_id, None)
            else:
                self._schedule[message_id] = when
                self._cond.notify_all()

    def _sent(self, message_id, delivery, result=None):
        """Counts and logs a message the next hop took (`delivery`: see _delivery())."""
        if result is not None:
            result.sent += 1
        self._count("messages-forwarded")
        log.info("forwarding: %s: %s" % (message_id, delivery))
        self._publish("forwarded %s" % message_id)

    def _failed(self, claim, reason, code, result):
        claim.fail(reason, code)
        result.failed += 1
        result.reason = reason
        self._count("messages-failed")
        log.warning("forwarding: %s: failed: %s" % (claim.id, reason))
        self._publish("failed %s: %s" % (claim.id, reason))

    def _count(self, key):
        self.stats.increment(key)

    def _publish(self, text):
        if self.events is not None:
            self.events.publish(text)

    # -- --immediate (runs in the submitting session's thread) ----------

    def _forward_immediate(self, session, message_id):
        """Sends one message on the session's connection; see ImmediateLink.forward()."""
        result = PassResult()
        claim = self.spool.claim(message_id)
        if claim is None:
            return None
        self._begin_sending()
        try:
            if not self._prepare(claim, result):
                claim = None
                # A client filter's rejection is `452 <response>`, as a
                # --filter's is.
                return _refusal(result, "452", "4.7.1")
            if session.client is None:
                session.client = self._new_client()
            try:
                outcome = session.client.send(claim)
            except smtp_client.ConnectionFailure as e:
                self._connection_failed(claim, e, result)
                claim = None
                return "554 5.0.0 %s" % e if e.permanent else None
            settling, claim = claim, None
            if outcome.ok or not outcome.code:
                self._settle(settling, outcome, result, session.client.target)
            else:
                # The next hop refused (4xx too): its reply goes back to the
                # submitter, who owns the retry, so the message is not kept
                # for one of ours (it fails, as in E-MailRelay 2.6).
                self._failed(settling, outcome.reason, outcome.code, result)
        finally:
            if claim is not None:
                _release(claim)
            self._end_sending()
        if outcome.ok:
            return None
        if outcome.rejected:
            return outcome.rejected[0][1]
        reason = outcome.reason
        return reason if reason[:3].isdigit() else "%d %s" % (outcome.code or 554, reason)


def _refusal(result, code, status):
    """The reply for a message that _prepare() settled: None unless it failed."""
    if not result.failed:
        return None
    return "%s %s %s" % (code, status, result.reason)


def _delivery(recipients, relay, reply):
    """The rest of a message's "sent" log line, in Postfix's shape for log tools:
    `to=<a@b>,<c@d> relay=host:port status=sent (250 2.0.0 Ok: queued as X)`."""
    return "to=%s relay=%s status=sent (%s)" % (
        ",".join("<%s>" % log.sanitise(r) for r in recipients), relay, log.sanitise(reply))


def _seconds(value):
    return ("%d" % value) if value == int(value) else ("%.1f" % value)


class _Deletions:
    """Removes sent messages from the spool, bounding what a crash sends twice.

    `add(claim)` notes a message the next hop accepted; `flush()` (called
    by run_pass() in its root window as soon as send() has returned, before
    anything else is sent, and by `close()`) removes the envelope names of
    those noted, so at most the message in flight is sent again after a
    crash, and then their content names. What is left is closing their
    files, which frees them, and needs no root: `hand_over()` (outside the
    window) closes them BATCH at a time. On a journalling file system
    freeing a message's files costs more than the whole SMTP transaction
    (about 115 microseconds on ext4 against 2.5 on tmpfs on the development
    VM), so once a batch has taken more than SLOW seconds a message,
    hand_over() gives the batches to a helper thread instead, which closes
    them while the session goes on; it waits while BACKLOG batches are
    pending, so open files stay bounded. Where freeing is cheap the files
    are closed in this thread: the helper would take the interpreter lock
    back after every close, and passing it between the two threads costs
    more than the closing. `sent(id, delivery)` is called for each removed
    envelope, with the delivery text add() was given.
    """

    BATCH = 16
    BACKLOG = 4
    SLOW = 0.00005

    def __init__(self, sent):
        self._sent = sent
        self._claims = []
        self._removed = []
        self._queue = queue.Queue(self.BACKLOG)
        self._thread = None

    def add(self, claim, delivery):
        self._claims.append((claim, delivery))

    def flush(self):
        claims, self._claims = self._claims, []
        if not claims:
            return
        with process.privileged(group=False):
            for claim, delivery in claims:
                try:
                    claim.remove_envelope()
                except OSError as e:
                    # (The claim keeps its lock: no one else sends it while we run.)
                    log.error("forwarding: %s: cannot remove the envelope: %s" % (claim.id, e))
                    continue
                self._sent(claim.id, delivery)
                self._removed.append(claim)
                try:
                    claim.remove_content(close=False)
                except OSError as e:  # one message's clean-up must not stop the rest
                    log.error("forwarding: %s: cannot remove the content: %s" % (claim.id, e))

    def hand_over(self, everything=False):
        """Closes a full batch of removed claims (with `everything`, what there is), or queues it."""
        if len(self._removed) < self.BATCH and not (everything and self._removed):
            return
        removed, self._removed = self._removed, []
        if self._thread is None:
            start = time.monotonic()
            _close(removed)
            if time.monotonic() - start > self.SLOW * len(removed):
                self._thread = threading.Thread(target=self._run, name="forwarder clean-up",
                                                daemon=True)
                self._thread.start()
            return
        self._queue.put(removed)

    def _run(self):
        while True:
            claims = self._queue.get()
            if claims is None:
                return
            _close(claims)

    def close(self):
        self.flush()
        self.hand_over(everything=True)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


def _close(claims):
    for claim in claims:
        try:
            claim.close()
        except OSError as e:
            log.error("forwarding: %s: cannot close the files: %s" % (claim.id, e))


def _open_content_quietly(claim):
    """Opens a claim's content ahead of its turn; a failure shows in its turn."""
    if claim is None:
        return
    try:
        claim.open_content()
    except spool.ContentError:
        pass


def _release(claim):
    try:
        claim.release()
    except OSError as e:
        # A client filter that exits 100 may have moved or removed the files.
        log.verbose("forwarding: %s: not released: %s" % (getattr(claim, "id", "?"), e))
