"""One claimed message, from the --client-filter programs to its settling.

A `Sender` is what passes (`passes`) and --immediate sessions
(`immediate`) share: it runs the client filters on a claimed message,
checks it can go, hands it to an `smtp_client.Client` and settles its files
by the outcome. An accepted message leaves the queue (at once, or through
a pass's `deletions.Deletions`). Permanent refusals (5xx, a certificate
that fails verification, AUTH refused or impossible, a client filter's
refusal, no remote recipients, unreadable content or an address that
cannot be sent) make the message `.bad` with the reason; temporary ones
defer it for a retry, or fail it, as the `retry.Policy` says. Each
message sent, deferred or failed is counted in the stats, logged, and
published as an event for the admin `notify` command.

The Sender also keeps what `Forwarder.stop()` needs: how many passes and
--immediate sends are running, and every client they use, to wait for
and, past the grace, abort.
"""

import threading
import time
import weakref

from ..auth import sasl
from ..runtime import log
from ..store import envelope as envelope_mod, spool as spool_mod
from . import replies, retry, smtp_client


class PassResult:
    """The result of one pass (or one --immediate send): counts and the first problem, if any."""

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


class Sender:
    """Sends claimed messages to the next hop and settles them; see the module docstring.

    `client_filters` are `filters.Filter` objects run before each message;
    `client_secret` is the --client-auth secret (or None); `tls_context`
    the client TLS context (or None); `events` an `events.Events` (or
    None); `stats` a `stats.Stats` whose `messages-forwarded`,
    `messages-failed` and `messages-deferred` counters are incremented;
    `policy` a `retry.Policy` and `schedule` the `retry.Schedule` where
    deferred messages are noted. `stopping` is set by `stop()`: passes
    end after the message in hand, and a session that breaks is no
    attempt.
    """

    def __init__(self, cfg, spool, client_filters, client_secret, tls_context, events, stats,
                 policy, schedule):
        self.cfg = cfg
        self.spool = spool
        self.client_filters = list(client_filters)
        self.client_secret = client_secret
        self.tls_context = tls_context
        self.events = events
        self.stats = stats
        self.policy = policy
        self.schedule = schedule
        self.stopping = False
        self._cond = threading.Condition()
        self._sending = 0
        self._clients = weakref.WeakSet()

    # -- what is in hand, for stop() -------------------------------------

    def new_client(self):
        """A new `smtp_client.Client` to the next hop, which `abort()` reaches."""
        auth = None
        if self.client_secret is not None:
            auth = sasl.ClientAuth(self.client_secret, self.cfg.client_auth_config)
        client = smtp_client.Client(self.cfg, auth, self.tls_context)
        # (--immediate sessions make clients in their own threads.)
        with self._cond:
            self._clients.add(client)
        return client

    def begin(self):
        """A pass or --immediate send starts; `end()` must follow."""
        with self._cond:
            self._sending += 1

    def end(self):
        with self._cond:
            self._sending -= 1
            self._cond.notify_all()

    def stop(self):
        """From now on passes end after the message in hand; a broken session is no attempt."""
        self.stopping = True

    def wait_idle(self, seconds):
        """Waits until no pass or --immediate send runs; False if one still does after `seconds`."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._sending and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return not self._sending

    def abort(self):
        """Aborts every client in use (`smtp_client.Client.abort()`), from another thread."""
        with self._cond:
            clients = list(self._clients)
        for client in clients:
            client.abort()

    # -- one message -----------------------------------------------------

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

    def prepare(self, claim, result):
        """Client filters and checks before sending; False when `claim` is settled."""
        if self.client_filters:
            verdict = self._run_client_filters(claim, result)
            if verdict == "skip":
                log.info("forwarding: %s: client filter says ignore this message" % claim.id)
                release(claim)
                result.skipped += 1
                return False
            if verdict == "retry":
                self.temporary(claim, "client filter failed", 0, result)
                return False
            if verdict is not None:
                self.failed(claim, verdict[0], verdict[1], result)
                return False
            # A filter may have edited the envelope.
            try:
                claim.reread()
            except (OSError, envelope_mod.EnvelopeError) as e:
                self.failed(claim, "invalid envelope file after the client filter: %s" % e, 0, result)
                return False
        if not claim.envelope.to_remote:
            self.failed(claim, "no remote recipients", 0, result)
            return False
        try:
            claim.open_content()
        except spool_mod.ContentError as e:
            self.failed(claim, str(e), 0, result)
            return False
        return True

    def forward(self, claim, client, result, settler, following=None):
        """Filters and sends one claimed message on `client` and settles its files.

        `settler` is the pass's `deletions.Deletions`; `following` the
        claim the pass sends next (see `smtp_client.Client.send()`).
        Raises `smtp_client.ConnectionFailure` with the claim still held.
        """
        if not self.prepare(claim, result):
            return
        if following is not None and not following.envelope.to_remote:
            following = None
        outcome = client.send(claim, following)
        self.settle(claim, outcome, result, client.target, settler)

    def settle(self, claim, outcome, result, relay, settler=None):
        """Deletes, fails or defers `claim` after `outcome` from the next hop `relay`.

        With a `settler` (a `deletions.Deletions`) a sent message is left
        to it; without one it is deleted now.
        """
        if not outcome.ok:
            if outcome.temporary:
                self.temporary(claim, outcome.reason, outcome.code, result)
            else:
                self.failed(claim, outcome.reason, outcome.code, result)
            return
        if outcome.rejected:
            # --forward-to-some: the message went to the others; keep a copy
            # addressed to the refused recipients only, for a retry.
            env = claim.envelope
            refused = [r for r, _ in outcome.rejected]
            accepted = [r for r in env.to_remote if r not in refused]
            env.to_remote = refused
            claim.rewrite(env)
            reason = replies.rejection_reason("one or more", outcome.rejected)
            code = max(int(text[:3]) for _, text in outcome.rejected)
            self.sent(claim.id, _delivery(accepted, relay, outcome.reason), result)
            if 400 <= code < 500:
                self.temporary(claim, reason, code, result)
            else:
                self.failed(claim, reason, code, result)
            return
        result.sent += 1
        delivery = _delivery(claim.envelope.to_remote, relay, outcome.reason)
        if settler is None:
            claim.delete()
            self.sent(claim.id, delivery)
        else:
            settler.add(claim, delivery)

    def temporary(self, claim, reason, code, result):
        """A temporary failure: defer `claim` for a retry, or fail it (see `retry`)."""
        policy = self.policy
        if not policy.enabled:
            if code:
                self.failed(claim, reason, code, result)
            else:
                release(claim)
            return
        now = time.time()
        state = claim.envelope.retry()
        gave_up = policy.gave_up(state, reason, now)
        if gave_up is not None:
            self.failed(claim, gave_up, code, result)
            return
        later, delay = policy.next_retry(state, reason, now)
        claim.defer(later)
        self.schedule.note(claim.id, later.next_time)
        result.deferred += 1
        self.count("messages-deferred")
        log.warning("forwarding: %s: temporary failure %d: %s: next attempt in %ss"
                    % (claim.id, later.count, reason, retry.seconds(delay)))
        self.publish("deferred %s: %s" % (claim.id, reason))

    def connection_failed(self, claim, e, result):
        """The session broke (`e`, a ConnectionFailure) while `claim` was in hand: fail or defer it.

        At shutdown (stop() aborted the session) it goes back to the
        queue as it is: that was no attempt.
        """
        if self.stopping:
            log.warning("forwarding: %s: abandoned at shutdown (%s): it stays queued"
                        % (claim.id, e))
            release(claim)
            return
        if e.permanent:
            log.error("forwarding: %s" % e)
            self.failed(claim, str(e), 0, result)
            return
        self.publish("forwarding: failed: %s" % e)
        if self.policy.enabled:
            log.error("forwarding: %s" % e)
            self.temporary(claim, str(e), 0, result)
        else:
            log.error("forwarding: %s: messages stay queued until the next attempt" % e)
            release(claim)

    def sent(self, message_id, delivery, result=None):
        """Counts and logs a message the next hop took (`delivery`: see _delivery())."""
        if result is not None:
            result.sent += 1
        self.count("messages-forwarded")
        log.info("forwarding: %s: %s" % (message_id, delivery))
        self.publish("forwarded %s" % message_id)

    def failed(self, claim, reason, code, result):
        """Makes `claim` `.bad` with `reason` and `code`; counts, logs and publishes it."""
        claim.fail(reason, code)
        result.failed += 1
        result.reason = reason
        self.count("messages-failed")
        log.warning("forwarding: %s: failed: %s" % (claim.id, reason))
        self.publish("failed %s: %s" % (claim.id, reason))

    def count(self, key):
        self.stats.increment(key)

    def publish(self, text):
        """Publishes an event for the admin `notify` command (when there are events)."""
        if self.events is not None:
            self.events.publish(text)


def _delivery(recipients, relay, reply):
    """The rest of a message's "sent" log line, in Postfix's shape for log tools:
    `to=<a@b>,<c@d> relay=host:port status=sent (250 2.0.0 Ok: queued as X)`."""
    return "to=%s relay=%s status=sent (%s)" % (
        ",".join("<%s>" % log.sanitise(r) for r in recipients), relay, log.sanitise(reply))


def release(claim):
    """Gives a claimed message back to the queue; a failure is logged, not raised."""
    try:
        claim.release()
    except OSError as e:
        # A client filter that exits 100 may have moved or removed the files.
        log.verbose("forwarding: %s: not released: %s" % (getattr(claim, "id", "?"), e))
