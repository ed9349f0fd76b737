"""The administration interface (--admin): a telnet-friendly command line.

`AdminSession(conn, services).run()` serves one connection: it reads one
command per line and answers with text lines ending in CRLF, each answer
followed by the prompt `E-MailRelay> ` (none on connect, as E-MailRelay:
a script that sends a command at once reads only its answer). The
commands are the rows of `COMMANDS` (name, help text, handler), which
`help` lists: help, flush, forward, list, failures, unfail-all, status,
notify, pid, quit, and terminate (only with --admin-terminate). Nothing
here changes the configuration.

Idle timeout: `--idle-timeout` when given explicitly (0: none), otherwise
ADMIN_IDLE_TIMEOUT seconds (someone typing at a telnet prompt needs longer
than the SMTP default). An idle session gets `error: idle timeout` and is
closed. A session that has asked for `notify` is watching, not idle: it has
no timeout from then on. Admin connections have their own connection budget
(see net.Server), so idle ones never lock out SMTP or POP clients.
"""

import os
import threading

from . import log

PROMPT = b"E-MailRelay> "
# Seconds an admin session may sit idle unless --idle-timeout is given.
ADMIN_IDLE_TIMEOUT = 600

class AdminSession:
    """One admin connection; `services` is main's Services object.

    Uses `services.cfg`, `.spool`, `.forwarder` (may be None), `.events`
    (may be None), `.stats`, `.server` (for listening addresses and
    connection counters, may be None) and `.stop_event`.
    """

    def __init__(self, conn, services):
        self.conn = conn
        self.services = services
        self._write_lock = threading.Lock()
        self._events = None
        self._notifier = None

    def _write(self, data):
        with self._write_lock:
            self.conn.write(data)
            self.conn.flush()

    def _answer(self, lines):
        if isinstance(lines, str):
            lines = [lines]
        self._write(("".join(line + "\r\n" for line in lines)).encode("utf-8", "replace") + PROMPT)

    def run(self):
        """Serves commands until `quit`, `terminate` or end of input."""
        from . import net
        try:
            self.conn.settimeout(self._idle_timeout())
            while True:
                try:
                    line = self.conn.readline(1000)
                except net.LineTooLong:
                    self._answer("error: line too long")
                    continue
                if not line:
                    return
                words = line.decode("utf-8", "replace").strip().split()
                if not words:
                    self._write(PROMPT)
                    continue
                row = _BY_NAME.get(words[0].lower())
                if row is None:
                    self._answer("error: unrecognised command %r: try help" % log.sanitise(words[0]))
                    continue
                if row[2](self) is False:
                    return
        except net.Timeout:
            log.info("admin: idle timeout", peer=self._peer())
            try:
                self._write(b"\r\nerror: idle timeout\r\n")
            except (net.Timeout, net.Closed):
                pass
        except net.Closed:
            return
        finally:
            self._stop_notify()

    def _idle_timeout(self):
        cfg = self.services.cfg
        if cfg.given("idle-timeout"):
            return cfg.idle_timeout or None  # 0: no timeout
        return ADMIN_IDLE_TIMEOUT

    def _peer(self):
        return "%s:%s" % tuple(self.conn.peer[:2])

    # -- commands ------------------------------------------------------

    def do_help(self):
        self._answer(["%-11s %s" % (name, text) for name, text, _ in COMMANDS])

    def do_flush(self):
        forwarder = self.services.forwarder
        if forwarder is None:
            self._answer("error: no --forward-to address")
            return
        ok, text = forwarder.flush()
        self._answer(text)

    def do_forward(self):
        forwarder = self.services.forwarder
        if forwarder is None:
            self._answer("error: no --forward-to address")
            return
        forwarder.trigger()
        self._answer("OK")

    def do_list(self):
        ids = self.services.spool.ids()
        self._answer(ids or ["<none>"])

    def do_failures(self):
        failures = self.services.spool.failures()
        self._answer(["%s: %s" % (mid, reason) for mid, reason in failures] or ["<none>"])

    def do_unfail_all(self):
        n = self.services.spool.unfail_all()
        self._answer("OK: %d message(s) returned to the queue" % n)

    def do_status(self):
        lines = []
        server = self.services.server
        if server is not None:
            for kind, address in server.addresses():
                lines.append("listening: %s %s" % (kind, address))
            lines.append("sessions: %d" % server.live_count())
            for key, value in sorted(server.counters.items()):
                lines.append("%s: %s" % (key, value))
        stats = self.services.stats
        for key, value in sorted(stats.snapshot().items() if stats is not None else ()):
            lines.append("%s: %s" % (key, value))
        if self.services.cfg.forward_to:
            lines.append("forward-to: %s" % self.services.cfg.forward_to)
        self._answer(lines or ["<none>"])

    def do_notify(self):
        events = self.services.events
        if events is None:
            self._answer("error: no events in this configuration")
            return
        if self._events is None:
            self._events = events.subscribe()
            # A watcher waits for events, not for its own input.
            self.conn.settimeout(None)
            self._notifier = threading.Thread(target=self._notify_loop, name="admin notify",
                                              daemon=True)
            self._notifier.start()
        self._answer("OK")

    def do_pid(self):
        self._answer(str(os.getpid()))

    def do_quit(self):
        return False

    def do_terminate(self):
        if not self.services.cfg.admin_terminate:
            self._answer("error: terminate is disabled (see --admin-terminate)")
            return
        log.info("admin: terminate command")
        self._write(b"OK\r\n")
        self.services.stop_event.set()
        return False

    # -- notify --------------------------------------------------------

    def _notify_loop(self):
        q = self._events
        while True:
            text = q.get()
            if text is None:
                return
            try:
                self._write(("\r\nevent: %s\r\n" % text).encode("utf-8", "replace") + PROMPT)
            except Exception:  # the connection is gone; the session ends on its own
                return

    def _stop_notify(self):
        if self._events is not None:
            self.services.events.unsubscribe(self._events)
            self._events.put(None)
            self._events = None


# The command table, in the order `help` lists it: (name, help text, handler).
COMMANDS = [
    ("help", "show this list", AdminSession.do_help),
    ("flush", "forward spooled messages now and wait for the result", AdminSession.do_flush),
    ("forward", "start forwarding spooled messages, answering at once", AdminSession.do_forward),
    ("list", "list the messages waiting to be forwarded", AdminSession.do_list),
    ("failures", "list the failed (.bad) messages and their reasons", AdminSession.do_failures),
    ("unfail-all", "return every failed message to the queue", AdminSession.do_unfail_all),
    ("status", "show listening addresses and counters", AdminSession.do_status),
    ("notify", "show events (forwarding, failures) as they happen", AdminSession.do_notify),
    ("pid", "show the process id", AdminSession.do_pid),
    ("quit", "close this connection", AdminSession.do_quit),
    ("terminate", "stop the server (needs --admin-terminate)", AdminSession.do_terminate),
]
_BY_NAME = {row[0]: row for row in COMMANDS}
