"""The queue as a sysadmin reads it: one line per message (admin `list`, `mailq`).

`entries(spool)` describes every message in the spool directory, oldest
first, as `Entry` tuples; `line(entry)` is its one-line text, in the
`key=value` shape of the log lines (the second message's line is
folded here):

    emailrelay.123.1700000000.1 ready size=1234 from=<a@x.example> to=<b@y.example>
    emailrelay.123.1700000000.2 deferred size=980 from=<a@x.example> to=<c@y.example>
        attempts=2 next=2026-12-04T10:15:00+0000 reason=(452 4.3.1 mailbox busy)
    emailrelay.123.1700000000.3 bad size=512 from=<a@x.example> to=<d@y.example> reason=(550 5.1.1 no such user)

States: `new` (being received or filtered), `ready` (waiting to be
forwarded), `deferred` (ready, with a retry time still to come), `busy`
(being forwarded), `bad` (failed) and `local` (a copy for local
recipients).
"""

import collections
import os
import time

from ..runtime import process
from . import spool_files
from .envelope import Envelope, EnvelopeError

Entry = collections.namedtuple("Entry", "id state size from_ recipients attempts next_time reason")
Entry.__doc__ = """One message: `size` of its content (None if unreadable), `attempts`
and `next_time` (unix time) for a deferred message, else None; `reason`
the latest failure ('' if none)."""

_SUFFIX = {state: suffix for suffix, state in spool_files.STATES}


@process.spool_privileged
def entries(spool, now=None):
    """Every message of `spool` (a spool.Spool) as an Entry, oldest first."""
    now = time.time() if now is None else now
    out = []
    for message_id, state in spool.list_messages():
        if state == "orphan":
            continue
        try:
            env = Envelope.read(spool.path(message_id, _SUFFIX[state]))
        except (OSError, EnvelopeError) as e:
            # Moved on since the scan, or half-written (.new): say so, go on.
            out.append(Entry(message_id, state, None, "", [], None, None,
                             "envelope not readable: %s" % (getattr(e, "strerror", None) or e)))
            continue
        try:
            size = os.stat(spool.path(message_id, spool_files.CONTENT)).st_size
        except OSError:
            size = None
        retry = env.retry()
        attempts = next_time = None
        if retry is not None and state == "ready":
            attempts, next_time = retry.count, retry.next_time
            if next_time > now:
                state = "deferred"
        reason = _latest_reason(env.trailer) or (retry.reason if retry is not None else "")
        out.append(Entry(message_id, state, size, env.from_, env.to_local + env.to_remote,
                         attempts, next_time, reason))
    return out


def _latest_reason(trailer):
    reason = ""
    for raw in trailer.splitlines():
        if raw.startswith(b"X-MailRelay-Reason:"):
            reason = raw[len(b"X-MailRelay-Reason:"):].strip().decode("utf-8", "replace")
    return reason


def line(entry):
    """The entry's one line of text (see the module docstring)."""
    parts = [entry.id, entry.state]
    if entry.size is not None:
        parts.append("size=%d" % entry.size)
    if entry.from_ or entry.recipients:
        parts.append("from=<%s>" % entry.from_)
        parts.append("to=%s" % ",".join("<%s>" % r for r in entry.recipients))
    if entry.attempts is not None:
        parts.append("attempts=%d" % entry.attempts)
        parts.append("next=%s" % time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(entry.next_time)))
    if entry.reason:
        parts.append("reason=(%s)" % entry.reason)
    return " ".join(parts)
