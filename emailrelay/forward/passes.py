"""A forwarding pass: every message due, in turn, on one connection to the next hop.

A pass claims each ready message (so processes sharing a spool never send
one twice) and hands it to its `sending.Sender`, on one
`smtp_client.Client` connection kept for the whole pass. An accepted
message leaves the queue as soon as its `250` is in, before anything else
is sent (`deletions.Deletions`), so a crash sends again at most the
message in flight; after --user the spool work between two messages takes
one root window. Messages deferred for a retry whose time has not come are
skipped unless the pass is forced (`flush()`, --as-client).
"""

import time

from ..runtime import log, process
from ..store import spool as spool_mod
from . import smtp_client
from .deletions import Deletions
from .sending import PassResult, release


def run(sender, force=False, between=None):
    """One pass over the spool with one connection; returns a `sending.PassResult`.

    With `force`, messages waiting for their retry time are tried too.
    `between()` (optional) is called after each message sent or settled.
    The pass ends early when `sender.stopping` is set, after the message
    in hand. Between two messages the spool work is done in one root
    window (after --user): removing the names of the message just sent
    (its `250` is in), claiming the next one and, without client filters,
    the one after it (whose commands go out with the next content) and
    opening their content. Closing the files of sent messages is left to
    `deletions.Deletions`.
    """
    result = PassResult()
    sender.publish("forwarding: start")
    sender.begin()
    client = None
    settler = Deletions(sender.sent)
    claims = _claims(sender, force, result)
    # Without client filters the message after the current one is known
    # before the current one is sent, so its commands can be pipelined
    # with the current content.
    ahead = not sender.client_filters
    claim = following = None
    try:
        while not sender.stopping:
            with process.privileged(group=False):
                settler.flush()
                claim, following = following, None
                if claim is None:
                    claim = next(claims, None)
                if ahead and claim is not None:
                    following = next(claims, None)
                    # (Client filters may replace the content: then it
                    # is opened after them, in Sender.prepare().)
                    for c in (claim, following):
                        _open_content_quietly(c)
            settler.hand_over()
            if claim is None:
                break
            result.processed += 1
            if client is None:
                client = sender.new_client()
            try:
                sender.forward(claim, client, result, settler, following)
            except smtp_client.ConnectionFailure as e:
                result.error = str(e)
                sender.connection_failed(claim, e, result)
                claim = None
                break
            claim = None
            if result.stopped:
                break
            if between is not None:
                between()
    finally:
        if client is not None:
            client.quit()
        for unsent in (claim, following):
            if unsent is not None:
                release(unsent)
        settler.close()
        sender.end()
    sender.publish("forwarding: done: %d sent, %d failed" % (result.sent, result.failed))
    if result.processed:
        log.info("forwarding: %s" % result.summary())
    return result


def _claims(sender, force, result):
    """Claims the messages due for an attempt one at a time, oldest first.

    A message whose envelope cannot be read is failed by the spool and
    counted in `result`.
    """
    def unreadable(reason):
        result.failed += 1
        result.reason = reason
        sender.count("messages-failed")
    spool, schedule, policy = sender.spool, sender.schedule, sender.policy
    ids = spool.ids()
    schedule.keep_only(set(ids))
    for message_id in ids:
        now = time.time()
        due = schedule.due(message_id)
        if not force and due is not None and due > now:
            continue
        claim = spool.claim(message_id, failed=unreadable)
        if claim is None:
            schedule.note(message_id, None)
            continue
        state = claim.envelope.retry() if policy.enabled else None
        due = policy.due(claim, state) if state is not None else None
        if not force and due is not None and due > now:
            # Deferred by another process, or by us before a restart.
            schedule.note(message_id, due)
            release(claim)
            continue
        schedule.note(message_id, None)
        yield claim


def _open_content_quietly(claim):
    """Opens a claim's content ahead of its turn; a failure shows in its turn."""
    if claim is None:
        return
    try:
        claim.open_content()
    except spool_mod.ContentError:
        pass
