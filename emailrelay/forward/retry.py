"""The retry policy: when a message that failed for now is tried again.

Temporary failures (a 4xx, or a next hop that cannot be reached) are
retried automatically (ours: E-MailRelay leaves that to a cron job running
emailrelay-resubmit): the message stays queued with its retry state in the
envelope trailer (`envelope.Retry`), tried again after --retry-interval,
twice that, four times that ... up to --retry-max-interval, until it has
been failing for --retry-lifetime, when it becomes `.bad`. `Policy` says
when; `Schedule` remembers, per message id, when each deferred message is
due, so that passes skip the ones whose time has not come and the
forwarding thread wakes for the earliest by itself, without --poll.
`--retry-interval 0` keeps E-MailRelay's behaviour: a 4xx fails the
message at once, and an unreachable next hop leaves it queued for the next
trigger.
"""

import math
import os

from ..store import envelope


class Policy:
    """--retry-interval, --retry-max-interval and --retry-lifetime, applied.

    `enabled` is False with `--retry-interval 0` (no message is deferred).
    """

    def __init__(self, cfg):
        self.interval = cfg.retry_interval or 0
        self.max_interval = max(cfg.retry_max_interval or 0, self.interval)
        self.lifetime = cfg.retry_lifetime or 0

    @property
    def enabled(self):
        return bool(self.interval)

    def due(self, claim, state):
        """When a deferred message is due: its stored time, capped by today's settings.

        `state` is the claimed message's `envelope.Retry`. The time was
        chosen by whoever deferred it (an earlier run, maybe with a longer
        --retry-max-interval), so it is brought forward to at most
        --retry-max-interval after the deferral, which is when the
        envelope was last written.
        """
        try:
            deferred = os.stat(claim.envelope_path).st_mtime
        except OSError:
            return state.next_time
        return min(state.next_time, int(math.ceil(deferred + self.max_interval)))

    def gave_up(self, state, reason, now):
        """The `.bad` reason when a message failing again at `now` has failed for too long, else None.

        `state` is the message's `envelope.Retry` before this failure
        (None for its first one); `reason` what went wrong this time.
        """
        count, first = _attempt(state, now)
        if now - first >= self.lifetime:
            return "%s (gave up after %d attempts in %ds)" % (reason, count, now - first)
        return None

    def next_retry(self, state, reason, now):
        """(the message's new `envelope.Retry`, seconds until it is due) after a failure at `now`.

        The due time is in whole seconds, as the envelope keeps them.
        """
        count, first = _attempt(state, now)
        delay = min(self.interval * 2 ** (count - 1), self.max_interval)
        return envelope.Retry(count, int(math.ceil(now + delay)), first, reason), delay


def _attempt(state, now):
    """(this attempt's number, the time of the first failure) for a failure at `now`."""
    if state is None:
        return 1, int(now)
    return state.count + 1, state.first_time


class Schedule:
    """Message id -> time (seconds since the epoch) of its next attempt, for messages deferred.

    `cond` is the forwarding thread's `threading.Condition`, whose lock
    guards the schedule (passes and --immediate sessions change it from
    their threads): a new time wakes the thread to work out its next
    wake-up (`earliest()`).
    """

    def __init__(self, cond):
        self._cond = cond
        self._due = {}

    def note(self, message_id, when):
        """Notes when message `message_id` is due again (None: it is not waiting)."""
        with self._cond:
            if when is None:
                self._due.pop(message_id, None)
            else:
                self._due[message_id] = when
                self._cond.notify_all()

    def due(self, message_id):
        """The time message `message_id` is due again, or None when it is not waiting."""
        with self._cond:
            return self._due.get(message_id)

    def keep_only(self, present):
        """Forgets the messages not in the set `present` (sent or removed meanwhile)."""
        with self._cond:
            for gone in [i for i in self._due if i not in present]:
                del self._due[gone]

    def earliest(self):
        """The earliest time a message is due, or None when none waits."""
        with self._cond:
            return min(self._due.values()) if self._due else None


def seconds(value):
    """A number of seconds as the log lines give it: `5`, or `2.5` when not whole."""
    return ("%d" % value) if value == int(value) else ("%.1f" % value)
