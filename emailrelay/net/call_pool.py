"""The worker threads of a session loop: where the calls it does not run itself run.

`CallPool.submit` runs a call in a pool thread and hands its result to a
reply function; the session loop calls `grow` by the time `submit` gave,
so that a call that waits for a thread gets one even when no other call
comes meanwhile.
"""

import collections
import threading
import time

from ..runtime import log

# Seconds a call may wait for a busy worker before another worker starts.
GROW_AFTER = 0.001
# Seconds a worker stays idle before it ends (a burst of slow calls leaves
# no lasting crowd of threads).
IDLE_EXIT = 60.0


class CallPool:
    """Threads for "call" requests, as few as the work needs and as many as it waits for.

    One thread serves calls in order while they are quick (a commit on
    tmpfs or a fast disk, a cached verifier answer): fewer threads than
    sessions is what keeps the GIL from changing hands on every system
    call. A call that finds no idle thread starts one when the newest call
    began GROW_AFTER ago or more; otherwise it waits, and `submit` says by
    when the loop must call `grow`, which starts a thread for every call
    that has waited GROW_AFTER, up to `size`. So slow calls (a filter, a
    DNS block list that does not answer) each get a thread within about
    GROW_AFTER, however many arrive at once. A thread idle for IDLE_EXIT
    ends.
    """

    def __init__(self, size, name):
        self._size = size
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._queue = collections.deque()   # (entry, fn, args, reply, when queued)
        self._newest = 0.0                  # when the latest call (or thread) started
        self._threads = 0
        self._idle = 0          # threads waiting for a call (some perhaps already woken)
        self._starting = 0      # threads started that have not yet looked at the queue

    def submit(self, entry, fn, args, reply):
        """Runs fn(*args) in a pool thread, then reply(entry, result, exception).

        Returns None, or the monotonic time by which `grow` should be
        called because the call waits for a thread.
        """
        now = time.monotonic()
        with self._cond:
            self._queue.append((entry, fn, args, reply, now))
            # Each idle or starting thread takes one queued call.
            if self._idle + self._starting >= len(self._queue):
                self._cond.notify()
                return None
            if self._threads >= self._size:
                return None
            if self._threads and now - self._newest < GROW_AFTER:
                return now + GROW_AFTER
            self._add(1)
        self._start(1)
        return None

    def grow(self, now):
        """Starts a thread for each call that has waited GROW_AFTER for one.

        Returns when to call again (a call is still waiting), or None.
        """
        with self._cond:
            queue = self._queue
            covered = self._idle + self._starting
            limit = now - GROW_AFTER
            overdue = 0
            for item in queue:
                if item[4] > limit:
                    break
                overdue += 1
            more = max(0, min(overdue - covered, self._size - self._threads))
            self._add(more)
            covered += more
            due = None
            if len(queue) > covered and self._threads < self._size:
                due = queue[covered][4] + GROW_AFTER
        self._start(more)
        return due

    def _add(self, count):
        """Counts `count` threads about to start (with the lock held)."""
        if count:
            self._threads += count
            self._starting += count
            self._newest = time.monotonic()

    def _start(self, count):
        for _ in range(count):
            try:
                threading.Thread(target=self._work, name=self._name, daemon=True).start()
            except RuntimeError as e:
                # Out of threads: the call waits for a running one.
                log.error("%s: cannot start a thread: %s" % (self._name, e))
                with self._cond:
                    self._threads -= 1
                    self._starting -= 1

    def _work(self):
        starting = True
        while True:
            with self._cond:
                if starting:
                    # In the same hold as going idle or taking a call, so
                    # that `submit` never sees this thread as neither.
                    self._starting -= 1
                    starting = False
                while not self._queue:
                    self._idle += 1
                    woken = self._cond.wait(IDLE_EXIT)
                    self._idle -= 1
                    if not woken and not self._queue:
                        self._threads -= 1
                        return
                entry, fn, args, reply, _ = self._queue.popleft()
                self._newest = time.monotonic()
            try:
                result, exc = fn(*args), None
            except Exception as e:
                result, exc = None, e
            reply(entry, result, exc)
