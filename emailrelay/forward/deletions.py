"""Removing sent messages from the spool during a pass, off the sending path when that is slow."""

import queue
import threading
import time

from ..runtime import log, process


class Deletions:
    """Removes sent messages from the spool, bounding what a crash sends twice.

    `add(claim, delivery)` notes a message the next hop accepted; `flush()`
    (called by a pass in its root window as soon as send() has returned,
    before anything else is sent, and by `close()`) removes the envelope
    names of those noted, so at most the message in flight is sent again
    after a crash, and then their content names. What is left is closing
    their files, which frees them, and needs no root: `hand_over()`
    (outside the window) closes them BATCH at a time. On a journalling file
    system freeing a message's files costs more than the whole SMTP
    transaction (about 115 microseconds on ext4 against 2.5 on tmpfs on the
    development VM), so once a batch has taken more than SLOW seconds a
    message, hand_over() gives the batches to a helper thread instead,
    which closes them while the session goes on; it waits while BACKLOG
    batches are pending, so open files stay bounded. Where freeing is cheap
    the files are closed in this thread: the helper would take the
    interpreter lock back after every close, and passing it between the
    two threads costs more than the closing. `sent(id, delivery)` is
    called for each removed envelope, with the delivery text add() was
    given. `close()` ends it: everything noted is removed and closed.
    """

    BATCH = 16
    BACKLOG = 4
    SLOW = 0.00005

    def __init__(self, sent):
        self._sent = sent
        self._claims = []
        self._removed = []
        self._queue = queue.Queue(self.BACKLOG)
        self._thread = None

    def add(self, claim, delivery):
        self._claims.append((claim, delivery))

    def flush(self):
        claims, self._claims = self._claims, []
        if not claims:
            return
        with process.privileged(group=False):
            for claim, delivery in claims:
                try:
                    claim.remove_envelope()
                except OSError as e:
                    # (The claim keeps its lock: no one else sends it while we run.)
                    log.error("forwarding: %s: cannot remove the envelope: %s" % (claim.id, e))
                    continue
                self._sent(claim.id, delivery)
                self._removed.append(claim)
                try:
                    claim.remove_content(close=False)
                except OSError as e:  # one message's clean-up must not stop the rest
                    log.error("forwarding: %s: cannot remove the content: %s" % (claim.id, e))

    def hand_over(self, everything=False):
        """Closes a full batch of removed claims (with `everything`, what there is), or queues it."""
        if len(self._removed) < self.BATCH and not (everything and self._removed):
            return
        removed, self._removed = self._removed, []
        if self._thread is None:
            start = time.monotonic()
            _close(removed)
            if time.monotonic() - start > self.SLOW * len(removed):
                self._thread = threading.Thread(target=self._run, name="forwarder clean-up",
                                                daemon=True)
                self._thread.start()
            return
        self._queue.put(removed)

    def _run(self):
        while True:
            claims = self._queue.get()
            if claims is None:
                return
            _close(claims)

    def close(self):
        self.flush()
        self.hand_over(everything=True)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


def _close(claims):
    for claim in claims:
        try:
            claim.close()
        except OSError as e:
            log.error("forwarding: %s: cannot close the files: %s" % (claim.id, e))
