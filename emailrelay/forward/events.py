"""The admin `notify` channel: one-line events fanned out to subscribers.

The forwarder publishes to it (a pass starts or ends, a message is sent,
deferred or failed, the next hop cannot be reached); each admin session
that asked for `notify` subscribes and prints what arrives.
"""

import queue
import threading


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
