"""The administration interface (--admin): a telnet-friendly command line.

`AdminSession(conn, services).run()` serves one connection (a
`session_core.LineSession`; `services` is an `AdminServices`): it reads one
command per line and answers with text lines ending in CRLF, each answer
followed by the prompt `E-MailRelay> ` (none on connect, as E-MailRelay:
a script that sends a command at once reads only its answer). The
commands are the rows of `COMMANDS` (verb, states, handler, next state),
which `help` lists with their help texts: help, flush, forward, list,
failures, unfail-all, status, notify, pid, quit, and terminate (only with
--admin-terminate). Commands are not case-sensitive. Nothing here changes
the configuration.

Idle timeout: `--idle-timeout` when given explicitly (0: none), otherwise
ADMIN_IDLE_TIMEOUT seconds (someone typing at a telnet prompt needs longer
than the SMTP default). An idle session gets `error: idle timeout` and is
closed. A session that has asked for `notify` is watching, not idle: it has
no timeout from then on. Admin connections have their own connection budget
(see net.listeners.Server), so idle ones never lock out SMTP or POP clients.
"""

import dataclasses
import os
import threading

from ..net import connection, requests
from ..runtime import log
from ..store import spool_listing
from ..util import parts
from . import session_core

PROMPT = b"E-MailRelay> "
ADMIN_IDLE_TIMEOUT = 600
READY = "READY"


@dataclasses.dataclass(frozen=True)
class AdminSettings(session_core.SessionSettings):
    """What every admin session takes from the configuration, read once per process.

    Besides the core's (idle timeout ADMIN_IDLE_TIMEOUT unless
    --idle-timeout is given): `forward_to` (--forward-to, '' when not
    given, for `status`) and `terminate` (--admin-terminate).
    """

    forward_to: str
    terminate: bool

    IDLE_TIMEOUT = ADMIN_IDLE_TIMEOUT

    @classmethod
    def from_config(cls, cfg):
        return super().from_config(cfg, forward_to=cfg.forward_to or "",
                                   terminate=bool(cfg.admin_terminate))


class AdminServices(parts.Parts):
    """What an admin session uses: `settings` (`AdminSettings`), `spool`,
    `stats`, `flush` (a pass, waited for: (ok, text)) and `trigger` (a
    pass, not waited for), both None without --forward-to, `events` (or
    None), `listeners` (gives ((kind, address) pairs, live sessions,
    counters); None when not serving) and `stop_event` (set by terminate)."""

    __slots__ = ("settings", "spool", "stats", "flush", "trigger", "events", "listeners",
                 "stop_event")


class AdminSession(session_core.LineSession):
    """One admin connection; see the module docstring.

    Thread-only: spool listings block inline, and `notify` writes from a thread.
    """

    PROTOCOL = "admin"
    THREAD_ONLY = True
    COMMAND_LIMIT = 1000
    TOO_LONG = "error: line too long"

    def __init__(self, conn, services):
        super().__init__(conn, services, READY, session_core.BadBudget(0, None, ""))
        # The notify thread writes between the session's answers.
        self._write_lock = threading.Lock()
        self._events = None
        self._typed = ""

    # The core's hooks: every answer ends with the prompt, and the notify
    # thread may write at any time.

    def on_timeout(self):
        log.info("admin: idle timeout", peer=self.peer)
        try:
            self._write(b"\r\nerror: idle timeout\r\n")
        except (connection.Timeout, connection.Closed):
            pass

    def closing(self):
        if self._events is not None:
            self.services.events.unsubscribe(self._events)
            self._events.put(None)
            self._events = None

    def parse(self, line):
        self._typed, _, arg = line.strip().partition(" ")
        return self._typed.upper(), arg

    def unknown(self, verb):
        # An empty line gets the prompt alone (an empty answer).
        self.reply(verb and "error: unrecognised command %r: try help" % log.sanitise(self._typed))

    def encode(self, texts):
        # An empty answer (to an empty line) is the prompt alone.
        return b"".join((t + "\r\n" if t else "").encode("utf-8", "replace") + PROMPT
                        for t in texts)

    def send(self):
        self.flush_now()
        yield from ()

    def flush_now(self):
        with self._write_lock:
            super().flush_now()

    def _write(self, data):
        with self._write_lock:
            self.conn.write(data)
            self.conn.flush()

    def _answer(self, lines):
        self.reply(lines if isinstance(lines, str) else "\r\n".join(lines))

    # -- commands ------------------------------------------------------

    def admin_help(self, arg):
        self._answer(["%-11s %s" % (row.verb.lower(), row.help) for row in COMMANDS.values()])

    def admin_flush(self, arg):
        if self.services.flush is None:
            self._answer("error: no --forward-to address")
            return
        ok, text = yield requests.call(self.services.flush)
        self._answer(text)

    def admin_forward(self, arg):
        if self.services.trigger is None:
            self._answer("error: no --forward-to address")
            return
        self.services.trigger()
        self._answer("OK")

    def admin_list(self, arg):
        self._answer([spool_listing.line(e) for e in spool_listing.entries(self.services.spool)]
                     or ["<none>"])

    def admin_failures(self, arg):
        failures = self.services.spool.failures()
        self._answer(["%s: %s" % (mid, reason) for mid, reason in failures] or ["<none>"])

    def admin_unfail_all(self, arg):
        n = self.services.spool.unfail_all()
        self._answer("OK: %d message(s) returned to the queue" % n)

    def admin_status(self, arg):
        lines = []
        if self.services.listeners is not None:
            addresses, sessions, counters = self.services.listeners()
            lines += ["listening: %s %s" % pair for pair in addresses]
            lines.append("sessions: %d" % sessions)
            lines += ["%s: %s" % item for item in sorted(counters.items())]
        stats = self.services.stats
        lines += ["%s: %s" % item for item in sorted(stats.snapshot().items()
                                                     if stats is not None else ())]
        if self.settings.forward_to:
            lines.append("forward-to: %s" % self.settings.forward_to)
        self._answer(lines or ["<none>"])

    def admin_notify(self, arg):
        events = self.services.events
        if events is None:
            self._answer("error: no events in this configuration")
            return
        if self._events is None:
            self._events = events.subscribe()
            # A watcher waits for events, not for its own input.
            self.conn.settimeout(None)
            threading.Thread(target=self._notify_loop, name="admin notify", daemon=True).start()
        self._answer("OK")

    def admin_pid(self, arg):
        self._answer(str(os.getpid()))

    def admin_quit(self, arg):
        """Ends the session (the table's next state), answering nothing."""

    def admin_terminate(self, arg):
        if not self.settings.terminate:
            self._answer("error: terminate is disabled (see --admin-terminate)")
            return
        log.info("admin: terminate command")
        self._write(b"OK\r\n")
        self.event("terminate")
        self.services.stop_event.set()

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


# The command table, in the order `help` lists it. Admin has one state: a
# session is READY until quit or terminate.
_S = AdminSession
COMMANDS = session_core.table(
    # verb, states, handler, next state, help
    ("HELP", None, _S.admin_help, None, "show this list"),
    ("FLUSH", None, _S.admin_flush, None, "forward spooled messages now and wait for the result"),
    ("FORWARD", None, _S.admin_forward, None, "start forwarding spooled messages, answering at once"),
    ("LIST", None, _S.admin_list, None,
     "list the spooled messages with their state, size, addresses, next attempt and reason"),
    ("FAILURES", None, _S.admin_failures, None, "list the failed (.bad) messages and their reasons"),
    ("UNFAIL-ALL", None, _S.admin_unfail_all, None, "return every failed message to the queue"),
    ("STATUS", None, _S.admin_status, None, "show listening addresses and counters"),
    ("NOTIFY", None, _S.admin_notify, None, "show events (forwarding, failures) as they happen"),
    ("PID", None, _S.admin_pid, None, "show the process id"),
    ("QUIT", None, _S.admin_quit, session_core.DONE, "close this connection"),
    ("TERMINATE", None, _S.admin_terminate, None, "stop the server (needs --admin-terminate)"),
)
AdminSession.COMMANDS = COMMANDS
AdminSession.TRANSITIONS = session_core.transitions(
    ("terminate", None, session_core.DONE),    # the program stops: so does this session
)
