"""--workers N: worker processes that serve SMTP and POP on shared sockets.

The main process binds every listening socket, switches to --user and
then `Supervisor.start()` forks the workers, so each inherits the SMTP and
POP sockets and accepts on them with an accept loop of its own (the kernel
hands each connection to one of them). The main process keeps what there
must be one of: the forwarder, the admin server, the pid file.

Each worker has a stream socket to the main process (a socketpair made
before the fork). A worker's `ForwarderLink` stands in for the forwarder:
`trigger()` (--forward-on-disconnect, ETRN) and `rescan()` (a filter's exit
103) send one byte, which the supervisor thread turns into the forwarder's
own call. End of file on the socket tells each side the other has gone: the
supervisor reaps the worker and restarts it after a back-off (a worker that
keeps dying soon after its start waits longer each time, up to
RESTART_MAX); a worker whose main process has gone stops, as it does when
the main process shuts the socket down at shutdown.
"""

import os
import selectors
import signal
import socket
import threading
import time

from . import descriptors, log

TRIGGER = b"t"
RESCAN = b"r"

# Restart back-off: the first delay, the longest, and how long a worker
# must have run for its next restart to start again from the first delay.
RESTART_MIN = 0.5
RESTART_MAX = 60.0
STABLE = 30.0

# How long stop() waits for workers to end their sessions before SIGKILL.
STOP_TIMEOUT = 30.0


class ForwarderLink:
    """A worker's stand-in for the forwarder: asks the main process for passes.

    Has the forwarder's trigger methods that SMTP sessions call; the main
    process runs them. Never blocks a session.
    """

    def __init__(self, channel):
        self._channel = channel

    def trigger(self):
        """Asks the main process's forwarder for a pass; returns at once."""
        return self._send(TRIGGER)

    def rescan(self):
        """A filter exited 103: the main process logs the rescan and runs a pass."""
        return self._send(RESCAN)

    def _send(self, byte):
        try:
            self._channel.send(byte)
        except BlockingIOError:
            # The socket is full of triggers the main process has not read
            # yet; the pass they ask for covers this one too.
            pass
        except OSError as e:
            log.warning("cannot reach the forwarder in the main process: %s" % (e.strerror or e))
        return True


def watch_main(channel, on_gone):
    """In a worker: calls `on_gone()` (in a thread) once the main process has gone or shut down."""
    def watch():
        while True:
            descriptors.readable(channel)
            try:
                if not channel.recv(64):
                    break
            except BlockingIOError:
                continue
            except OSError:
                break
        on_gone()
    threading.Thread(target=watch, name="main watcher", daemon=True).start()


class _Slot:
    """One worker place: its process, channel and restart back-off."""

    def __init__(self, number):
        self.number = number
        self.pid = None
        self.channel = None
        self.started = 0.0
        self.delay = 0.0
        self.due = None      # monotonic time of a pending restart


class Supervisor:
    """Forks `count` workers, feeds their triggers to the forwarder, restarts them.

    `run_worker(channel)` is the whole of a new worker (given the worker's
    end of its channel, non-blocking); the worker exits when it returns,
    with status 0, or 1 on an exception. `forwarder` (or None)
    gets the workers' trigger() and rescan() calls. `recover(pid)` (or
    None) is called, in the supervisor thread, for a worker that did not
    exit cleanly: it repairs what the worker left in the spool. Start it
    in the main thread before any other thread; `signal_all(sig)` passes a
    signal on (SIGHUP); `stop()` ends every worker.
    """

    def __init__(self, count, run_worker, forwarder=None, recover=None):
        self._slots = [_Slot(n) for n in range(1, count + 1)]
        self._run_worker = run_worker
        self._forwarder = forwarder
        self._recover = recover
        self._lock = threading.Lock()
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._thread = None

    def start(self):
        """Forks every worker and starts the supervisor thread."""
        for slot in self._slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def pids(self):
        """The pids of the workers running now."""
        with self._lock:
            return [s.pid for s in self._slots if s.pid is not None]

    def signal_all(self, sig):
        """Sends `sig` to every running worker."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def stop(self, timeout=STOP_TIMEOUT):
        """Stops every worker as SIGTERM stops the program, and waits for them.

        The shut-down channel also stops a worker that had not yet put its
        signal handlers in place. A worker still there after `timeout` is
        killed.
        """
        with self._lock:
            self._stopping = True
            channels = [s.channel for s in self._slots if s.channel is not None]
        self.signal_all(signal.SIGTERM)
        for channel in channels:
            try:
                channel.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        # The thread ends once it has reaped the last worker.
        self._thread.join(timeout)
        if self._thread.is_alive():
            for pid in self.pids():
                log.error("worker pid %d did not stop: killing it" % pid)
            self.signal_all(signal.SIGKILL)
            self._thread.join()

    def _spawn(self, slot):
        """Forks the worker of `slot`; the child never returns from here."""
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ours.close()
                for other in self._slots:
                    if other.channel is not None:
                        other.channel.close()
                self._selector.close()
                theirs.setblocking(False)
                self._run_worker(theirs)
                status = 0
            except BaseException as e:
                log.error("worker %d: %s: %s" % (slot.number, type(e).__name__, e))
            finally:
                os._exit(status)
        theirs.close()
        ours.setblocking(False)
        with self._lock:
            slot.pid, slot.channel, slot.started, slot.due = pid, ours, time.monotonic(), None
        self._selector.register(ours, selectors.EVENT_READ, slot)
        log.info("worker %d started: pid %d" % (slot.number, pid))

    def _loop(self):
        """The supervisor thread: triggers, exits and restarts, until stopped and none is left."""
        while True:
            with self._lock:
                if self._stopping and all(s.pid is None for s in self._slots):
                    break
                due = [s.due for s in self._slots if s.due is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            for key, _ in self._selector.select(timeout):
                self._read(key.data)
            now = time.monotonic()
            for slot in self._slots:
                if slot.due is not None and slot.due <= now and not self._stopping:
                    self._spawn(slot)
        self._selector.close()

    def _read(self, slot):
        """Handles what came from a worker: trigger bytes, or end of file at its exit."""
        try:
            data = slot.channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            forwarder = self._forwarder
            if forwarder is not None:
                for _ in range(data.count(RESCAN)):
                    forwarder.rescan()
                if TRIGGER in data:
                    forwarder.trigger()
            return
        self._selector.unregister(slot.channel)
        slot.channel.close()
        _, status = os.waitpid(slot.pid, 0)
        self._exited(slot, status)

    def _exited(self, slot, status):
        """Logs a worker's end and, unless stopping, schedules its restart."""
        with self._lock:
            pid, slot.pid, slot.channel = slot.pid, None, None
            stopping = self._stopping
        how = ("killed by signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
               else "exited with status %d" % os.WEXITSTATUS(status))
        if stopping:
            log.verbose("worker %d (pid %d) %s" % (slot.number, pid, how))
        else:
            ran = time.monotonic() - slot.started
            slot.delay = RESTART_MIN if ran >= STABLE or not slot.delay else \
                min(slot.delay * 2, RESTART_MAX)
            slot.due = time.monotonic() + slot.delay
            log.error("worker %d (pid %d) %s: restarting it in %.1fs"
                      % (slot.number, pid, how, slot.delay))
        if self._recover is not None and status != 0:
            try:
                self._recover(pid)
            except Exception as e:  # the supervisor thread must go on restarting workers
                log.error("worker %d (pid %d): cannot repair what it left in the spool: %s"
                          % (slot.number, pid, e))
