"""A per-address budget of authentication failures, shared by SMTP and POP.

Each session closes after a few failed logins, but a client can simply
reconnect; this budget counts failures per client address across
connections and services. Within the budget (ALLOWED failures in WINDOW
seconds) nothing changes. Beyond it, every further failure from that
address is answered only after a delay, doubling from one second up to
MAX_DELAY, and logged as a warning that fail2ban can match:

    emailrelay: warning: too many authentication failures from 192.0.2.1 (smtp): 6 in 600s: reply delayed 1s

`record()` gives the delay owed; the session waits it out (a "sleep"
request of its conversation, which holds up only that session and, in the
session loop, no thread); with the
per-address connection limit it caps the guessing rate of one address.
Successful logins do not reset the count (an attacker with one account
could otherwise reset it at will). The count for an address is forgotten
WINDOW seconds after its first failure.
"""

import threading
import time

from ..runtime import log

ALLOWED = 5
WINDOW = 600.0
MAX_DELAY = 30.0
# Addresses remembered at once; the oldest are forgotten beyond this.
MAX_ADDRESSES = 10000


class FailureBudget:
    """Counts authentication failures per address; see the module docstring."""

    def __init__(self, allowed=ALLOWED, window=WINDOW, max_delay=MAX_DELAY,
                 clock=time.monotonic):
        self.allowed = allowed
        self.window = window
        self.max_delay = max_delay
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = {}  # ip -> [first failure time, count]

    def record(self, ip, service):
        """Records a failure by `ip` on `service` ('smtp', 'pop'); returns the
        seconds the reply should be delayed (0 within the budget)."""
        now = self._clock()
        with self._lock:
            entry = self._failures.get(ip)
            if entry is None or now - entry[0] > self.window:
                if entry is None and len(self._failures) >= MAX_ADDRESSES:
                    self._forget(now)
                entry = self._failures[ip] = [now, 0]
            entry[1] += 1
            count = entry[1]
        excess = count - self.allowed
        if excess <= 0:
            return 0
        delay = min(2.0 ** (excess - 1), self.max_delay)
        log.warning("too many authentication failures from %s (%s): %d in %ds: reply delayed %ds"
                    % (ip, service, count, self.window, delay))
        return delay

    def _forget(self, now):
        """Drops expired entries, and the oldest half if none had expired."""
        expired = [ip for ip, (first, _) in self._failures.items() if now - first > self.window]
        if not expired:
            by_age = sorted(self._failures, key=lambda ip: self._failures[ip][0])
            expired = by_age[:len(by_age) // 2 or 1]
        for ip in expired:
            del self._failures[ip]
