"""What every line-based server session needs: the core of SMTP, POP and admin.

A protocol is a subclass of `LineSession` and a command table made by
`table()`: rows of (verb, states it is allowed in, handler, next state).
The core owns everything else the three share:

- the conversation (`conversation()`, a `session_loop` generator: the
  session never owns its socket), with the idle timeout and the end of the
  session, whatever ends it;
- reading command lines with a length limit (`readline`), and the reply
  queue with the flush-before-block rule: the replies owed are sent before
  the session waits for input, unless the client has pipelined more
  (RFC 2920, RFC 2449), so pipelined commands get their replies together;
  they also go once OWED_HIGH_WATER octets are owed, so that a client
  that pipelines without end and reads nothing is stopped by its own
  unread output (the connection's write bound) instead of growing the
  queue;
- dispatch through the table: an unknown verb and a verb outside its
  states get the protocol's refusal, counted as a bad command; a handler
  whose command got no error reply moves the session to the row's next
  state (None: the handler decides);
- the bad-command budget (`bad`) and the authentication-failure budget
  (`auth_failed`, which also counts against the per-address
  `auth_budget.FailureBudget` shared by SMTP and POP);
- the SASL exchange (`sasl_exchange`);
- the --server-tls-required gate (`tls_missing`) and STARTTLS / STLS
  (`start_tls`), after which the protocol's `reset_after_tls` forgets what
  the session learnt before the handshake (RFC 3207 4.2, RFC 2595 4).

A session is given `services.settings`, never the configuration: a frozen
`SessionSettings` (or a protocol's subclass of it) made once per process by
`from_config`, with every value already interpreted.

Handlers are plain methods taking the command's argument; one that must
wait (for input, a program, the disk) is a generator making `session_loop`
requests. `Drop` ends a session from anywhere, after the queued replies.
"""

import collections
import dataclasses
from typing import Optional

from ..net import connection, requests, thread_driver
from ..runtime import log

DONE = "DONE"
# Octets of replies queued for a pipelining client before they are sent
# anyway (RFC 2920 lets a server send replies whenever it likes).
OWED_HIGH_WATER = 16384
# Failed logins a session may have before it is closed (either protocol).
MAX_AUTH_FAILURES = 3

Row = collections.namedtuple("Row", "verb states handler next help", defaults=("",))


def table(*rows):
    """The command table of a protocol: verb -> Row, in the order given.

    Each row is (verb, states or None for any, handler, next state or
    None when the handler decides[, help text]).
    """
    return {row[0]: Row(*row) for row in rows}


Transition = collections.namedtuple("Transition", "event states next")


def transitions(*rows):
    """The state changes a protocol's handlers ask for: event -> Transition.

    Each row is (event, states it may happen in or None for any, next
    state). Together with the command table's next states this is the
    protocol's whole state machine: a handler never sets the state itself,
    it calls `LineSession.event(name)`.
    """
    return {row[0]: Transition(*row) for row in rows}


class Drop(Exception):
    """The session must end now (after any queued reply is sent)."""


class BadBudget(collections.namedtuple("BadBudget", "limit last_reply warning")):
    """How many bad commands a session may give (`limit`, 0: no limit).

    With `last_reply` None, the reply to the `limit`-th is the last thing
    sent (E-MailRelay's rule); otherwise the one after the limit gets
    `last_reply` instead of its own. `warning` is logged either way.
    """


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """What the session core takes from the configuration, read once per process.

    `domain` (--domain; "localhost" when it is empty), `idle_timeout`
    (seconds a client may be idle, None for no limit: --idle-timeout when
    given, else the class's `IDLE_TIMEOUT`, else the option's default),
    `tls_required` (--server-tls-required) and `max_bad_commands`
    (--max-bad-commands, None when not given: each protocol has its own
    rule then). A protocol's settings subclass this and add their fields.
    """

    domain: str
    idle_timeout: Optional[float]
    tls_required: bool
    max_bad_commands: Optional[int]

    # Seconds a client may be idle unless --idle-timeout is given (None:
    # the option's value, given or not).
    IDLE_TIMEOUT = None

    @classmethod
    def from_config(cls, cfg, **fields):
        """The settings read from `cfg`; `fields` are a subclass's own, already worked out.

        `cfg` is the read-only Config, or anything with its attributes and
        `given` (the server layer does not import `config.options`).
        """
        idle = cfg.idle_timeout
        if cls.IDLE_TIMEOUT is not None and not cfg.given("idle-timeout"):
            idle = cls.IDLE_TIMEOUT
        return cls(domain=cfg.domain or "localhost",
                   idle_timeout=idle or None,   # 0: no timeout
                   tls_required=bool(cfg.server_tls_required),
                   max_bad_commands=cfg.max_bad_commands if cfg.given("max-bad-commands")
                   else None, **fields)


class LineSession:
    """One line-based server conversation over `conn`; see the module docstring.

    A subclass sets `COMMANDS` (a `table()`), `TRANSITIONS` (a
    `transitions()`: the state changes its handlers ask for with `event`),
    `PROTOCOL` (the log prefix),
    `COMMAND_LIMIT` and `TOO_LONG` (the reply to an over-long line), and
    `NOT_UTF8` if it needs it, and may override the hooks below. A
    protocol whose handlers block inline (file I/O, waits) instead of
    yielding requests sets `THREAD_ONLY`: it is served by `run()` in a
    thread of its own, and `SessionLoop.add` refuses it.
    `services.settings` is a `SessionSettings`; the session keeps it as
    `settings`, and its `domain`. After the conversation, `error_replies`
    is the number of error replies sent.
    """

    COMMANDS = {}
    TRANSITIONS = {}
    PROTOCOL = "session"
    COMMAND_LIMIT = 512
    TOO_LONG = "line too long"
    # None: command lines are decoded with surrogateescape; else the reply
    # (a bad command) to a line that is not UTF-8.
    NOT_UTF8 = None
    # True: the handlers block the thread they run in, so the session runs
    # in a thread of its own (`run()`), never in the session loop.
    THREAD_ONLY = False

    def __init__(self, conn, services, state, bad_budget):
        self.conn = conn
        self.services = services
        self.settings = services.settings
        self.domain = self.settings.domain
        self.peer = "%s:%s" % tuple(conn.peer[:2])
        self.peer_ip = conn.peer[0]
        self.state = state
        self.bad_budget = bad_budget
        self.bad_commands = 0
        self.auth_failures = 0
        self.error_replies = 0
        # Replies waiting to be sent; a float is a delay before the next one.
        self.replies = []
        self.owed = 0           # octets of text in `replies`, roughly
        self.tracing = self.trace_enabled()

    # ----- hooks a protocol may override ------------------------------

    def idle_timeout(self):
        """Seconds the client may be idle (None: no limit); see SessionSettings."""
        return self.settings.idle_timeout

    def opening(self):
        """Queues the greeting (a generator, so it may wait; may raise Drop)."""
        return iter(())

    def on_timeout(self):
        """Logs and replies to an idle timeout; the session then ends."""
        log.info("%s: idle timeout" % self.PROTOCOL, peer=self.peer)

    def on_failure(self, e):
        """Logs (and may reply to) an unexpected exception; the session then ends."""
        log.error("%s: session failed: %s: %s" % (self.PROTOCOL, type(e).__name__, e),
                  peer=self.peer)

    def closing(self):
        """Releases what the session holds; runs however it ended."""

    def is_error(self, text):
        """True for a reply that refuses the command."""
        return False

    def event(self, name):
        """Moves the session as `TRANSITIONS[name]` says (from a state it may not happen in, not at all)."""
        move = self.TRANSITIONS[name]
        if move.states is None or self.state in move.states:
            self.state = move.next

    def available(self, verb):
        """False for a command of the table this session does not offer now."""
        return True

    def unknown(self, verb):
        """Replies to a verb not in the table (or not available)."""
        self.bad("unknown command")

    def out_of_sequence(self, verb):
        """Replies to a verb given outside its states."""
        self.bad("command out of sequence")

    def parse(self, line):
        """(VERB in capitals, argument) of a command line."""
        verb, _, arg = line.partition(" ")
        return verb.upper(), arg

    def shown(self, verb, line):
        """A command line as the dialogue log shows it (credentials left out)."""
        return line

    def trace_enabled(self):
        """True when the dialogue is to be logged (`trace`)."""
        return log.debug_enabled()

    def trace(self, text):
        """Logs one line of the dialogue (debug level)."""
        log.debug(text, peer=self.peer)

    def reset_after_tls(self):
        """Forgets what the session learnt before the TLS handshake."""

    def encode(self, texts):
        """The queued replies `texts` as sent on the wire."""
        return ("\r\n".join(texts) + "\r\n").encode("utf-8", "surrogateescape")

    # ----- the conversation --------------------------------------------

    def run(self):
        """Runs the whole conversation in this thread over a blocking connection."""
        thread_driver.drive(self, getattr(self.services, "stop_event", None))

    def conversation(self):
        """The session as a `session_loop` conversation (a generator); never raises."""
        try:
            self.conn.settimeout(self.idle_timeout())
            yield from self.opening()
            commands = self.COMMANDS
            while self.state != DONE:
                line = yield from self.readline(self.COMMAND_LIMIT, self.TOO_LONG)
                if line is None:
                    continue
                verb, arg = self.parse(line)
                if self.tracing:
                    self.trace("%s: rx: %s" % (self.PROTOCOL, self.shown(verb, line)))
                row = commands.get(verb)
                if row is None or not self.available(verb):
                    self.unknown(verb)
                elif row.states is not None and self.state not in row.states:
                    self.out_of_sequence(verb)
                else:
                    errors = self.error_replies
                    work = row.handler(self, arg)
                    if work is not None:
                        yield from work
                    if row.next is not None and self.error_replies == errors:
                        self.state = row.next
        except connection.Timeout:
            self.on_timeout()
        except EOFError:
            log.verbose("%s: client disconnected" % self.PROTOCOL, peer=self.peer)
        except connection.Closed:
            log.verbose("%s: connection lost" % self.PROTOCOL, peer=self.peer)
        except Drop:
            pass
        except Exception as e:  # the peer never sees a traceback
            self.on_failure(e)
        finally:
            try:
                self.closing()
            finally:
                try:
                    self.flush_now()
                except (connection.Closed, connection.Timeout, OSError):
                    pass

    def readline(self, limit, too_long):
        """One input line as text, or None when it was refused (a generator).

        The replies owed go out first unless the client has pipelined more
        input and they are still few (OWED_HIGH_WATER). An over-long line
        gets `too_long` (a bad command); end of input raises EOFError.
        """
        if self.owed >= OWED_HIGH_WATER or not self.conn.pending():
            yield from self.send()
        try:
            raw = yield requests.line(limit)
        except connection.LineTooLong:
            self.bad(too_long)
            return None
        if not raw:
            raise EOFError()
        raw = raw.rstrip(b"\r\n")
        if self.NOT_UTF8 is None:
            return raw.decode("utf-8", "surrogateescape")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.bad(self.NOT_UTF8)
            return None

    # ----- replies -----------------------------------------------------

    def reply(self, text):
        """Queues one reply (perhaps multi-line, without the final CRLF)."""
        if self.is_error(text):
            self.error_replies += 1
        if self.tracing:
            self.trace("%s: tx: %s" % (self.PROTOCOL, text.split("\r\n", 1)[0]))
        self.replies.append(text)
        self.owed += len(text) + 2

    def delay(self, seconds):
        """Holds back the replies queued after this by `seconds` (see `send`)."""
        self.replies.append(float(seconds))

    def send(self):
        """Sends the queued replies, waiting out each delay (a generator).

        A delay is a "sleep" request: it holds no lock and, in the session
        loop, no thread.
        """
        replies = self.replies
        self.owed = 0
        while replies:
            texts = []
            while replies and not isinstance(replies[0], float):
                texts.append(replies.pop(0))
            if texts:
                self.conn.write(self.encode(texts))
            if replies:
                seconds = replies.pop(0)
                self.conn.flush()
                yield requests.sleep(seconds)
        self.conn.flush()

    def write_queued(self):
        """Writes the queued replies to the connection now, without their delays."""
        texts = [r for r in self.replies if not isinstance(r, float)]
        self.replies = []
        self.owed = 0
        if texts:
            self.conn.write(self.encode(texts))

    def flush_now(self):
        """Sends the queued replies now, without their delays (the session is ending)."""
        self.write_queued()
        self.conn.flush()

    # ----- budgets -----------------------------------------------------

    def bad(self, text):
        """Replies `text` to a bad command and counts it; too many raise Drop."""
        self.bad_commands += 1
        limit, last_reply, warning = self.bad_budget
        if limit and last_reply is None and self.bad_commands >= limit:
            self.reply(text)
            log.warning(warning, peer=self.peer)
            raise Drop()
        if limit and last_reply is not None and self.bad_commands > limit:
            log.warning(warning, peer=self.peer)
            self.reply(last_reply)
            raise Drop()
        self.reply(text)

    def auth_failed(self, failed_reply, last_reply):
        """Counts a failed login and replies (a generator); the last one raises Drop.

        The caller logs the failure. The per-address budget may owe a
        delay, waited out after the replies owed before it.
        """
        self.auth_failures += 1
        budget = getattr(self.services, "auth_budget", None)
        if budget is not None:
            seconds = budget.record(self.peer_ip, self.PROTOCOL)
            if seconds:
                yield from self.send()
                yield requests.sleep(seconds)
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.reply(last_reply)
            raise Drop()
        self.reply(failed_reply)

    # ----- authentication and TLS ----------------------------------------

    def tls_offered(self):
        """True when the client may start TLS now (STARTTLS, STLS): it is set up and not on."""
        return self.services.tls_context is not None and not self.conn.tls

    def tls_missing(self):
        """True while --server-tls-required and the connection is not encrypted."""
        return self.settings.tls_required and not self.conn.tls

    def sasl_exchange(self, exchange, prompt, limit, too_long):
        """Runs a `sasl.SaslExchange` to its outcome (a generator).

        Returns ("ok", user) or ("fail", reason), or None when a response
        line was refused (over `limit`: `too_long` was replied). Each step
        is a "call": it may ask PAM or --server-auth-program.
        """
        outcome = yield requests.call(exchange.step, None)
        while outcome[0] == "challenge":
            self.reply(prompt + outcome[1].decode("ascii"))
            line = yield from self.readline(limit, too_long)
            if line is None:
                return None
            outcome = yield requests.call(exchange.step, line)
        return outcome

    def start_tls(self, context):
        """Sends the replies owed, then runs the TLS handshake (a generator).

        A failed handshake is logged and ends the session; after a good
        one, `reset_after_tls` runs.
        """
        yield from self.send()
        try:
            yield requests.starttls(context)
        except (OSError, ValueError) as e:
            log.warning("tls error: %s" % e, peer=self.peer)
            raise Drop() from None
        self.reset_after_tls()
        log.verbose("%s: tls established" % self.PROTOCOL, peer=self.peer)
