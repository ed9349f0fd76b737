"""Connections over their kind's budget: a short grace, then the busy reply.

The accept loop never waits for a slot. A connection over --max-connections
or the per-address budget of its kind is handed to one refuser thread,
which gives ending sessions OVER_LIMIT_GRACE to free a slot (a client that
reconnects as soon as it reads our 221 can beat its old session's thread
to the clean-up) and otherwise sends the busy reply and closes. Once one
address holds FLOOD_FACTOR times its per-address budget of a kind
(sessions and connections waiting to be refused), its further connections
of that kind are closed at once without a reply, so a flood from one host
costs nothing more.
"""

import collections
import threading
import time

from ..runtime import log
from . import connection

# Seconds an over-the-limit connection waits (in the refuser thread, never in
# the accept loop) for ending sessions to free a slot.
OVER_LIMIT_GRACE = 0.25
# Over-the-limit connections held for that grace at once; beyond this they
# are refused at once.
OVER_LIMIT_HELD = 64
# Connections from one address beyond this many times the per-address limit
# are closed at once, with no reply (ZMailer's MaxSameIpSource).
FLOOD_FACTOR = 4


class OverLimit:
    """The refuser thread of `listeners.Server`, mixed into it.

    `_hold(lst, sock, addr, peer)` takes a connection that `_admit` turned
    away. It works on the server's admission state, under the server's
    `_lock` (a Condition that an ending session notifies, after counting
    it in `_freed`): `_limits`, `max_per_address`, `_per_address`,
    `_stopping` (once set, held connections are refused and the thread
    ends) and `counters["refused"]`; and retries admission with `_admit`.
    """

    def __init__(self):
        self._held = collections.deque()  # (deadline, lst, sock, addr, peer) in their grace
        self._refusing = {}      # (kind, ip) -> held over-limit connections
        self._refuser = None     # the refuser thread while it runs

    def _hold(self, lst, sock, addr, peer):
        """Passes an over-limit connection to the refuser thread (or refuses it now).

        An address already holding FLOOD_FACTOR times its limit is closed
        at once, without a reply; with OVER_LIMIT_HELD held already, the
        connection is refused at once.
        """
        key = (lst.kind, addr[0])
        with self._lock:
            per_address = self._limits.get(lst.kind, (0, self.max_per_address))[1]
            if self._per_address.get(key, 0) + self._refusing.get(key, 0) \
                    >= FLOOD_FACTOR * per_address:
                self.counters["refused"] += 1
                sock.close()
                return
            if len(self._held) < OVER_LIMIT_HELD and not self._stopping:
                self._held.append((time.monotonic() + OVER_LIMIT_GRACE, lst, sock, addr, peer))
                self._refusing[key] = self._refusing.get(key, 0) + 1
                if self._refuser is None:
                    self._refuser = threading.Thread(target=self._refuse_loop,
                                                     name="refuser", daemon=True)
                    self._refuser.start()
                self._lock.notify_all()
                return
        self._refuse(lst, sock, addr)

    def _refuse_loop(self):
        """The refuser thread: admits held connections as slots free, refuses the rest."""
        seen = None
        while True:
            with self._lock:
                while not self._held and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._held:
                    self._refuser = None
                    return
                deadline = self._held[0][0]
                now = time.monotonic()
                # A session that ended while the last round was being tried
                # notified nobody: look again at once rather than wait.
                if now < deadline and not self._stopping and self._freed == seen:
                    self._lock.wait(deadline - now)
                seen = self._freed
                held = list(self._held)
                self._held.clear()
            keep = []
            now = time.monotonic()
            for item in held:
                deadline, lst, sock, addr, peer = item
                admitted = self._admit(lst, sock, addr, peer)
                if not admitted and now < deadline and not self._stopping:
                    keep.append(item)
                    continue
                self._unhold(lst.kind, addr[0])
                if not admitted:
                    self._refuse(lst, sock, addr)
            if keep:
                with self._lock:
                    self._held.extendleft(reversed(keep))

    def _unhold(self, kind, ip):
        with self._lock:
            key = (kind, ip)
            n = self._refusing.get(key, 0) - 1
            if n > 0:
                self._refusing[key] = n
            else:
                self._refusing.pop(key, None)

    def _refuse(self, lst, sock, addr):
        """Sends the busy reply (the per-address one when that is the limit hit) and closes."""
        ip = addr[0]
        with self._lock:
            per_address = self._limits.get(lst.kind, (0, self.max_per_address))[1]
            one_address = self._per_address.get((lst.kind, ip), 0) >= per_address
            self.counters["refused"] += 1
        log.warning("%s: too many connections%s: refused %s"
                    % (lst.kind, " from one address" if one_address else "", ip))
        connection.answer_and_close(sock, lst.address_busy_reply if one_address else lst.busy_reply)
