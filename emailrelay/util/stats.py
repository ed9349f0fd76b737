"""Counters shared by the sessions, the forwarder and the admin `status` command.

`Stats(names)` starts each named counter at 0; `increment(name)` adds one
(a name not given at the start begins at 0); `snapshot()` returns a copy
of every counter taken under the lock, so a reader never sees a counter
half-way through an update.
"""

import threading


class Stats:
    """A set of named counters with one lock of their own."""

    def __init__(self, names=()):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def increment(self, name):
        """Adds one to counter `name`."""
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1

    def snapshot(self):
        """A dict copy of every counter."""
        with self._lock:
            return dict(self._counts)
