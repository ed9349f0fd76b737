"""What the accept loop does when accept() finds no file descriptor left.

Running out of file descriptors (EMFILE, ENFILE) is the connection budget
seen from the kernel: the connection cannot be taken, and the listening
socket stays readable, so retrying at once would spin. `listeners.Server`
pauses the listener instead (its connections wait in the kernel's queue
while ending sessions free descriptors, OUT_OF_DESCRIPTORS_PAUSE); this
module does the rest. If accepting still fails after the pause, the
waiting connections are answered with the busy reply through a reserve
descriptor kept for that, and the listener is paused again. One warning
(at most one a minute, OUT_OF_DESCRIPTORS_WARNING) says so; one line says
when connections are accepted again.
"""

import errno
import os
import threading
import time

from ..runtime import descriptors, log
from . import connection

# accept() errors that mean the process or the system is out of descriptors
# (or of the memory behind them): the connection stays queued.
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# Seconds a listener that ran out of descriptors rests before it tries again.
OUT_OF_DESCRIPTORS_PAUSE = 0.25
# Connections answered with the busy reply per try while out of descriptors.
OUT_OF_DESCRIPTORS_REFUSALS = 256
# Seconds between two warnings about running out of descriptors.
OUT_OF_DESCRIPTORS_WARNING = 60.0


class DescriptorShortage:
    """The reserve descriptor, the warning, and refusing while descriptors are short.

    `open_reserve()` before accepting starts and `close_reserve()` after it
    ends. For a listener whose accept() failed with an error in
    OUT_OF_DESCRIPTORS, `failed(lst, error)` warns (the first time) or
    answers the connections waiting on `lst.sock` with `lst.busy_reply`,
    and returns how many it answered; the caller then pauses the listener.
    `accepted(lst)` is called when accepting on `lst` works, and says so
    once after a warning. Safe from any thread; each listener is accepted
    from one thread only.
    """

    def __init__(self):
        self._reserve = None           # the descriptor held back
        self._reserve_lock = threading.Lock()
        self._warned_at = None         # monotonic time of the last warning
        # listener -> [connections refused since accepting last worked,
        # whether that was warned of]; no entry: accepting works.
        self._starved = {}

    def open_reserve(self):
        """Opens the reserve descriptor if it is not open; False when it cannot be."""
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return False
        return True

    def close_reserve(self):
        """Closes the reserve descriptor (accepting is over)."""
        with self._reserve_lock:
            if self._reserve is not None:
                os.close(self._reserve)
                self._reserve = None

    def failed(self, lst, e):
        """accept() on `lst` found no descriptor: warn or refuse; returns the connections refused.

        The first time, the connections wait in the kernel's queue for the
        pause; when accepting fails again after it, those waiting are
        answered with the busy reply.
        """
        state = self._starved.get(lst)
        if state is not None:
            refused = self._refuse_waiting(lst)
            state[0] += refused
            return refused
        state = self._starved[lst] = [0, False]
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= OUT_OF_DESCRIPTORS_WARNING:
            self._warned_at = now
            state[1] = True
            log.warning("%s: cannot accept connections: %s (open-files limit %s): new "
                        "connections wait, then get the busy reply, until sessions end "
                        "(see --max-connections, LimitNOFILE)"
                        % (lst.kind, e.strerror or e, descriptors.limit_text()))
        return 0

    def accepted(self, lst):
        """Accepting on `lst` works (again): logs so if it had been warned of."""
        state = self._starved.pop(lst, None) if self._starved else None
        if state is not None and state[1]:
            log.info("%s: accepting connections again (%d refused while out of file "
                     "descriptors)" % (lst.kind, state[0]))

    def _refuse_waiting(self, lst):
        """Answers waiting connections with the busy reply, through the reserve descriptor.

        Returns how many. Another thread may take the descriptor freed for
        a connection first; then the rest wait for the next try.
        """
        refused = 0
        with self._reserve_lock:
            while refused < OUT_OF_DESCRIPTORS_REFUSALS and self.open_reserve():
                os.close(self._reserve)
                self._reserve = None
                try:
                    sock, _ = lst.sock.accept()
                except OSError:
                    break
                connection.answer_and_close(sock, lst.busy_reply)
                refused += 1
            self.open_reserve()
        return refused
