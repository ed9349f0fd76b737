"""--immediate: an SMTP session forwards each message it commits, in its own thread.

Each session gets an `ImmediateLink` (from `Forwarder.immediate_link()`)
whose `forward(id)` sends the message in the calling thread, on one
connection to the next hop kept for that session: sessions forward side by
side, as E-MailRelay's do, so a next hop that is slow to answer one
submitter does not hold up the others (each waits at most the client
timeouts). A claim is a rename that only one thread or process wins, so a
pass running meanwhile never sends a message twice: whichever loses leaves
it to the other.
"""

from . import smtp_client
from .sending import PassResult, release


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
    waits). `forwarder` is the `Forwarder` (its `running` and `submit()`),
    `sender` its `sending.Sender`.
    """

    def __init__(self, forwarder, sender):
        self._forwarder = forwarder
        self._sender = sender
        # Used by one thread at a time: the session's, then the QUIT's.
        self.client = None

    def forward(self, message_id):
        if not self._forwarder.running:
            # Not forwarding now: the message stays queued for the next start.
            return None
        sender = self._sender
        result = PassResult()
        claim = sender.spool.claim(message_id)
        if claim is None:
            return None
        sender.begin()
        try:
            if not sender.prepare(claim, result):
                claim = None
                # A client filter's rejection is `452 <response>`, as a
                # --filter's is.
                return _refusal(result, "452", "4.7.1")
            if self.client is None:
                self.client = sender.new_client()
            try:
                outcome = self.client.send(claim)
            except smtp_client.ConnectionFailure as e:
                sender.connection_failed(claim, e, result)
                claim = None
                return "554 5.0.0 %s" % e if e.permanent else None
            settling, claim = claim, None
            if outcome.ok or not outcome.code:
                sender.settle(settling, outcome, result, self.client.target)
            else:
                # The next hop refused (4xx too): its reply goes back to the
                # submitter, who owns the retry, so the message is not kept
                # for one of ours (it fails, as in E-MailRelay 2.6).
                sender.failed(settling, outcome.reason, outcome.code, result)
        finally:
            if claim is not None:
                release(claim)
            sender.end()
        if outcome.ok:
            return None
        if outcome.rejected:
            return outcome.rejected[0][1]
        reason = outcome.reason
        return reason if reason[:3].isdigit() else "%d %s" % (outcome.code or 554, reason)

    def close(self):
        self._forwarder.submit(self._quit)

    def _quit(self):
        if self.client is not None:
            self.client.quit()
            self.client = None


def _refusal(result, code, status):
    """The reply for a message that Sender.prepare() settled: None unless it failed."""
    if not result.failed:
        return None
    return "%s %s %s" % (code, status, result.reason)
