"""The forwarding thread: sends the spool to the --forward-to server.

One `Forwarder` per process. Its thread runs forwarding passes when
triggered: at start-up (--forward), on the --poll timer, and whenever
`trigger()` is called (end of an SMTP session with --forward-on-disconnect,
ETRN, the admin `forward` command, a filter's exit 103). Only one pass runs
at a time; triggers that arrive during a pass make exactly one more pass
afterwards, so none is lost. `flush()` asks for a pass and waits for its
result; `run_once()` is the whole of --as-client; `forward_now()` is
--immediate, run in the SMTP session's own thread.

A pass claims each ready message (so processes sharing a spool never send
one twice), runs the --client-filter programs, and hands the message to one
`smtp_client.Client` connection kept for the whole pass. Accepted messages
are deleted; refused ones become `.bad` with the reason; when the next hop
cannot be reached the message is released and the pass ends, leaving the
rest queued for the next trigger.

`Events` is the small publish/subscribe channel behind the admin `notify`
command; the forwarder and the SMTP server publish one-line events to it.
"""

import queue
import threading
import time

from . import addresses
from . import envelope as envelope_mod
from . import log
from .stats import Stats


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
        self.skipped = 0
        self.processed = 0
        self.error = None
        self.stopped = False
        self.rescan = False

    @property
    def ok(self):
        """True when nothing failed and the next hop was reachable."""
        return self.failed == 0 and self.error is None

    def text(self):
        """`OK`, or what went wrong, for the admin `flush` command."""
        if self.error is not None:
            return "error: %s" % self.error
        if self.failed:
            return "error: %d message(s) failed" % self.failed
        return "OK"


class Forwarder:
    """Forwards the spool to the next hop; see the module docstring.

    `client_filters` are `filters.Filter` objects run before each message;
    `client_secret` is the --client-auth secret (or None); `tls_context`
    the client TLS context (or None); `events` an `Events` (or None);
    `stats` a `stats.Stats` whose `messages-forwarded`/`messages-failed`
    counters are incremented. Raises ValueError for a bad --forward-to address.
    """

    def __init__(self, cfg, spool, client_filters=(), client_secret=None, tls_context=None,
                 events=None, stats=None):
        addresses.parse_forward_to(cfg.forward_to)
        self.cfg = cfg
        self.spool = spool
        self.client_filters = list(client_filters)
        self.client_secret = client_secret
        self.tls_context = tls_context
        self.events = events
        self.stats = stats if stats is not None else Stats()
        self._cond = threading.Condition()
        self._pending = False
        self._requested = 0
        self._completed = 0
        self._last = None
        self._stopping = False
        self._thread = None

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

    def flush(self):
        """Runs a pass (after any running one) and waits: returns (ok, text)."""
        with self._cond:
            self._pending = True
            self._requested += 1
            wanted = self._requested
            self._cond.notify_all()
            while self._completed < wanted and not self._stopping:
                self._cond.wait(1.0)
            if self._completed < wanted:
                return False, "error: forwarding is stopping"
            result = self._last
        return result.ok, result.text()

    def stop(self):
        """Stops the thread after the message in hand; waits for it briefly."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self):
        poll = self.cfg.poll if self.cfg.poll and self.cfg.poll > 0 else None
        next_poll = time.monotonic() + poll if poll else None
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    if next_poll is not None:
                        remaining = next_poll - time.monotonic()
                        if remaining <= 0:
                            self._pending = True
                            break
                        self._cond.wait(remaining)
                    else:
                        self._cond.wait()
                if self._stopping:
                    return
                self._pending = False
                generation = self._requested
            if poll:
                next_poll = time.monotonic() + poll
            try:
                result = self.run_pass()
            except Exception as e:  # the thread must survive anything a pass meets
                log.error("forwarding: unexpected error: %s: %s" % (type(e).__name__, e))
                result = PassResult()
                result.error = str(e)
            with self._cond:
                if result.rescan:
                    self._pending = True
                self._completed = max(self._completed, generation)
                self._last = result
                self._cond.notify_all()

    def run_once(self):
        """Forwards everything now, in this thread (--as-client, --dont-serve).

        Repeats while a client filter asks for a rescan. True only when
        every message went (none failed, the next hop was reachable).
        """
        ok = True
        while True:
            result = self.run_pass()
            ok = ok and result.ok
            if not result.rescan or result.error is not None:
                return ok

    # -- passes --------------------------------------------------------

    def _new_client(self):
        from . import smtp_client
        auth = None
        if self.client_secret is not None:
            from . import sasl
            auth = sasl.ClientAuth(self.client_secret, self.cfg.client_auth_config)
        return smtp_client.Client(self.cfg, auth, self.tls_context)

    def run_pass(self):
        """One pass over the spool with one connection; returns a PassResult.

        Deleting sent messages (slow on a journalling file system) is done
        by a helper thread, overlapping the next message's network waits.
        """
        from . import smtp_client
        result = PassResult()
        self._publish("forwarding: start")
        client = None
        settler = _Settler()
        claims = self._claims()
        claim = next(claims, None)
        following = None
        try:
            while claim is not None:
                if self._stopping:
                    break
                result.processed += 1
                if client is None:
                    client = self._new_client()
                # Without client filters the next message is known now, so
                # its commands can be pipelined with this one's content.
                following = None if self.client_filters else next(claims, None)
                try:
                    self._forward(claim, client, result, settler, following)
                except smtp_client.ConnectionFailure as e:
                    result.error = str(e)
                    log.error("forwarding: %s: messages stay queued until the next attempt" % e)
                    self._publish("forwarding: failed: %s" % e)
                    break
                claim = None
                if result.stopped:
                    break
                claim = following if not self.client_filters else next(claims, None)
                following = None
        finally:
            if client is not None:
                client.quit()
            for unsent in (claim, following):
                if unsent is not None:
                    _release(unsent)
            settler.close()
        if result.processed == 0:
            result.rescan = False
        self._publish("forwarding: done: %d sent, %d failed" % (result.sent, result.failed))
        if result.processed:
            log.info("forwarding: %d message(s) sent, %d failed%s" % (
                result.sent, result.failed, ", %d skipped" % result.skipped if result.skipped else ""))
        return result

    def _claims(self):
        """Claims the ready messages one at a time, oldest first."""
        for message_id in self.spool.ids():
            claim = self.spool.claim(message_id)
            if claim is not None:
                yield claim

    def _run_client_filters(self, claim, result):
        """Runs --client-filter programs on a claimed message.

        Returns None to go on, `'skip'` when a filter said ignore the message
        (exit 100), `'retry'` when a filter could not decide (timeout, crash,
        filter daemon down), or `(reason, code)` when a filter failed it.
        Requests to rescan and to stop scanning after this message are noted
        in `result`.
        """
        for f in self.client_filters:
            r = f.run(claim.content_path, claim.envelope_path)
            if r.rescan:
                result.rescan = True
            if r.stop:
                result.stopped = True
            if r.cancel:
                return "skip"
            if not r.ok and r.temporary:
                return "retry"
            if not r.ok:
                return (r.reason or "client filter failed", r.code if r.code is not None else 0)
        return None

    def _forward(self, claim, client, result, settler, following=None):
        """Filters and sends one claimed message and settles its files."""
        if self.client_filters:
            verdict = self._run_client_filters(claim, result)
            if verdict == "skip":
                log.info("forwarding: %s: client filter says ignore this message" % claim.id)
                _release(claim)
                result.skipped += 1
                return
            if verdict == "retry":
                log.warning("forwarding: %s: client filter failed: message stays queued" % claim.id)
                _release(claim)
                result.error = "client filter failed"
                return
            if verdict is not None:
                self._failed(claim, verdict[0], verdict[1], result)
                return
            # A filter may have edited the envelope.
            claim.envelope = envelope_mod.Envelope.read(claim.envelope_path)
        env = claim.envelope
        if not env.to_remote:
            log.info("forwarding: %s: no remote recipients: removed" % claim.id)
            claim.delete()
            return
        outcome = client.send(claim, following)
        if not outcome.ok:
            self._failed(claim, outcome.reason, outcome.code, result)
            return
        if outcome.rejected:
            # --forward-to-some: the message went to the others; keep a .bad
            # copy addressed to the refused recipients only, for a retry.
            env.to_remote = [r for r, _ in outcome.rejected]
            claim.rewrite(env)
            reason = "recipient(s) rejected: %s" % "; ".join(
                "<%s> %s" % (r, text) for r, text in outcome.rejected)
            code = int(outcome.rejected[0][1][:3])
            self._sent(claim.id, result)
            self._failed(claim, reason, code, result)
            return
        result.sent += 1
        settler.put(self._settle_sent, claim)

    def _settle_sent(self, claim):
        claim.delete()
        self._sent(claim.id)

    def _sent(self, message_id, result=None):
        if result is not None:
            result.sent += 1
        self._count("messages-forwarded")
        log.verbose("forwarding: %s: sent" % message_id)
        self._publish("forwarded %s" % message_id)

    def _failed(self, claim, reason, code, result):
        claim.fail(reason, code)
        result.failed += 1
        self._count("messages-failed")
        log.warning("forwarding: %s: failed: %s" % (claim.id, reason))
        self._publish("failed %s: %s" % (claim.id, reason))

    def _count(self, key):
        self.stats.increment(key)

    def _publish(self, text):
        if self.events is not None:
            self.events.publish(text)

    # -- --immediate ---------------------------------------------------

    def forward_now(self, message_id):
        """Forwards one message now, in the caller's thread (--immediate).

        Returns (ok, reply) where reply starts with a three-digit code: the
        next hop's reply, or `451 4.4.1 ...` when it could not be reached.
        On failure the message has been removed from the spool: the
        submitter is told, so the retry is its job. A message another
        process already claimed, or one with only local recipients, is
        (True, `250 ...`): it is in other hands.
        """
        from . import smtp_client
        claim = self.spool.claim(message_id)
        if claim is None:
            return True, "250 2.0.0 queued"
        result = PassResult()
        client = self._new_client()
        try:
            verdict = self._run_client_filters(claim, result) if self.client_filters else None
            if verdict == "skip":
                _release(claim)
                return True, "250 2.0.0 queued"
            if verdict == "retry":
                claim.delete()
                return False, "451 4.3.0 client filter failed"
            if verdict is not None:
                claim.delete()
                return False, "554 5.7.1 %s" % verdict[0]
            env = envelope_mod.Envelope.read(claim.envelope_path) if self.client_filters else claim.envelope
            claim.envelope = env
            if not env.to_remote:
                claim.delete()
                return True, "250 2.0.0 delivered locally"
            outcome = client.send(claim)
        except smtp_client.ConnectionFailure as e:
            log.error("forwarding: %s: %s" % (message_id, e))
            claim.delete()
            return False, "451 4.4.1 next hop unavailable: %s" % e
        except BaseException:
            _release(claim)
            raise
        finally:
            client.quit()
        if outcome.ok and not outcome.rejected:
            claim.delete()
            self._sent(message_id)
            return True, outcome.reason
        claim.delete()
        log.warning("forwarding: %s: refused by the next hop: %s" % (message_id, outcome.reason))
        self._publish("failed %s: %s" % (message_id, outcome.reason))
        if outcome.ok:
            return False, outcome.rejected[0][1]
        code = outcome.code if outcome.code else 554
        reason = outcome.reason
        return False, reason if reason[:3].isdigit() else "%d %s" % (code, reason)


class _Settler:
    """Runs spool clean-up calls in order in a helper thread; close() waits."""

    def __init__(self):
        self._queue = queue.Queue()
        self._thread = None

    def put(self, fn, *args):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="forwarder settle", daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as e:  # one message's clean-up must not stop the rest
                log.error("forwarding: clean-up failed: %s" % e)

    def close(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


def _release(claim):
    try:
        claim.release()
    except OSError as e:
        # A client filter that exits 100 may have moved or removed the files.
        log.verbose("forwarding: %s: not released: %s" % (getattr(claim, "id", "?"), e))
