"""The POP3 server protocol: one session serving a maildrop to a mail reader.

`PopSession(conn, services).run()` handles one connection to the end (a
`session_core.LineSession`; `services` is a `PopServices`). It speaks
RFC 1939 (USER/PASS, APOP, STAT, LIST, RETR, DELE, NOOP, RSET, TOP, UIDL,
QUIT), RFC 2449 CAPA with RESP-CODES and PIPELINING, RFC 5034 SASL AUTH
(through `sasl.ServerAuth`) and RFC 2595 STLS. The maildrop and its lock
are `pop_maildrop`'s.

What callers and users may rely on:
- The session is in one of RFC 1939's states, AUTHORIZATION, TRANSACTION
  and UPDATE, and the `COMMANDS` table says which commands each state
  takes; any other gets `-ERR <verb> is not valid in this state` (or
  `-ERR unknown command`), counted as a bad command (--max-bad-commands).
- Deletions happen only at QUIT (the UPDATE state); a session that ends any
  other way deletes nothing. With `--pop-no-delete`, DELE answers `+OK` and
  hides the message for the rest of the session, but nothing is deleted.
- Idle timeout: `--idle-timeout` when given explicitly (0: none), otherwise
  600 seconds, the RFC 1939 minimum for the autologout timer (the option's
  default of 60 seconds suits SMTP but is too short for POP). An idle
  session gets `-ERR` and is closed without entering UPDATE.
- RETR and TOP send the text as `dotstuff.write_text` makes it: CRLF line
  endings (bare CR and LF included), NUL octets dropped, dot-stuffed.
- With --debug the dialogue is logged both ways (`pop: rx:` / `pop: tx:`),
  never a password, digest or SASL response, nor message text.
- Failed logins are logged with the client address always, and count
  against the per-address budget shared with SMTP (`auth_budget`); the
  third in a session closes it.
"""

import dataclasses
import errno
import hashlib
import hmac
import itertools
import os
import time

from ..auth import sasl
from ..net import requests
from ..runtime import log, process
from ..util import dotstuff, parts
from . import session_core
from .pop_maildrop import Maildrop, MaildropError, maildrop_directory, open_content

# RFC 2449 allows 255 octets for a command line; a little slack for clients
# that are generous with arguments.
COMMAND_LIMIT = 512
# RFC 1939's session states.
AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"
# SASL responses are base64 and may exceed the command limit (RFC 5034 4).
SASL_LINE_LIMIT = 8192
# RFC 1939 3: an autologout timer, if any, must be at least 10 minutes.
RFC_IDLE_TIMEOUT = 600
# Bad commands a client may send unless --max-bad-commands says otherwise.
BAD_COMMAND_LIMIT = 10
IMPLEMENTATION = "emailrelay-python"

_banner_counter = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class PopSettings(session_core.SessionSettings):
    """What every POP session takes from the configuration, read once per process.

    Besides the core's (idle timeout RFC_IDLE_TIMEOUT unless --idle-timeout
    is given): `spool_dir`, `by_name` (--pop-by-name: each user's
    maildrop is a spool subdirectory) and `no_delete` (--pop-no-delete).
    """

    spool_dir: str
    by_name: bool
    no_delete: bool

    IDLE_TIMEOUT = RFC_IDLE_TIMEOUT

    @classmethod
    def from_config(cls, cfg):
        return super().from_config(cfg, spool_dir=cfg.spool_dir, by_name=bool(cfg.pop_by_name),
                                   no_delete=bool(cfg.pop_no_delete))


class PopServices(parts.Parts):
    """What a POP session uses: `settings` (`PopSettings`), `spool` (a
    spool.Spool), `pop_auth` (a sasl.ServerAuth, or None: nobody can log
    in; APOP needs a plain secret from its `secrets()`), `tls_context`
    (None: no STLS), `auth_budget` (or None) and `stop_event` (or None)."""

    __slots__ = ("settings", "spool", "pop_auth", "tls_context", "auth_budget", "stop_event")


class PopSession(session_core.LineSession):
    """One POP3 connection from greeting to close (see the module docstring).

    Thread-only: the maildrop's lock, reads and deletes block inline.
    """

    PROTOCOL = "pop"
    THREAD_ONLY = True
    COMMAND_LIMIT = COMMAND_LIMIT
    TOO_LONG = "-ERR line too long"

    def __init__(self, conn, services):
        super().__init__(conn, services, AUTHORIZATION, session_core.BadBudget(
            services.settings.max_bad_commands or BAD_COMMAND_LIMIT,
            "-ERR too many bad commands, closing connection",
            "pop: too many bad commands, closing"))
        self.banner = "<%d.%d.%d@%s>" % (os.getpid(), next(_banner_counter),
                                         int(time.time()), self.domain)
        self.user = None          # the name given by USER, waiting for PASS
        self.authenticated = None  # the logged-in user
        self.maildrop = None

    # The core's hooks.

    def opening(self):
        self.reply("+OK %s POP3 server ready %s" % (self.domain, self.banner))
        return iter(())

    def on_timeout(self):
        log.info("pop: idle timeout, closing (nothing deleted)", peer=self.peer)
        self.reply("-ERR idle timeout, closing connection")

    def on_failure(self, e):
        if isinstance(e, OSError):
            log.warning("pop: connection error: %s" % e, peer=self.peer)
        else:
            super().on_failure(e)

    def closing(self):
        if self.maildrop is not None:
            self.maildrop.close()

    def is_error(self, text):
        return text.startswith("-ERR")

    def unknown(self, verb):
        self.bad("-ERR unknown command")

    def out_of_sequence(self, verb):
        self.bad("-ERR %s is not valid in this state" % verb)

    def shown(self, verb, line):
        if verb == "PASS":
            return "PASS <password>"
        if verb in ("APOP", "AUTH"):
            words = line.split()
            return " ".join(words[:2]) + (" <credentials>" if len(words) > 2 else "")
        return line

    def reset_after_tls(self):
        self.user = None

    # AUTHORIZATION state.

    def _refused_before_tls(self, clear_text=False):
        """True (after replying) when the command must wait for STLS."""
        if self.tls_missing():
            self.bad("-ERR TLS is required: use STLS first")
            return True
        auth = self.services.pop_auth
        if clear_text and auth is not None and not auth.clear_text_allowed(self.conn.tls):
            self.bad("-ERR use STLS first: no clear-text passwords before TLS")
            return True
        return False

    def _mechanisms(self):
        if self.services.pop_auth is None:
            return []
        return list(self.services.pop_auth.mechanisms(self.conn.tls))

    def pop_capa(self, arg):
        lines = ["+OK capability list follows", "TOP", "UIDL", "RESP-CODES", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if not self.tls_missing():
                auth = self.services.pop_auth
                if auth is None or auth.clear_text_allowed(self.conn.tls):
                    lines.append("USER")
                mechs = self._mechanisms()
                if mechs:
                    lines.append("SASL " + " ".join(mechs))
            if self.tls_offered():
                lines.append("STLS")
        lines.append("IMPLEMENTATION " + IMPLEMENTATION)
        lines.append(".")
        for item in lines:
            self.reply(item)

    def pop_stls(self, arg):
        if self.services.tls_context is None:
            self.bad("-ERR STLS is not available")
            return None
        if self.conn.tls:
            self.bad("-ERR TLS is already active")
            return None
        self.reply("+OK begin TLS negotiation")
        return self.start_tls(self.services.tls_context)

    def pop_user(self, arg):
        if self._refused_before_tls(clear_text=True):
            return
        if not arg:
            self.bad("-ERR USER needs a name")
            return
        self.user = arg
        # Always +OK: whether the name exists is not given away.
        self.reply("+OK send PASS")

    def pop_pass(self, arg):
        if self._refused_before_tls(clear_text=True):
            return
        if self.user is None:
            self.bad("-ERR give USER first")
            return
        user, self.user = self.user, None
        auth = self.services.pop_auth
        # A check may ask PAM: it is work, not protocol.
        if auth is not None and (yield requests.call(auth.check_password, user, arg)):
            self._login(user)
        else:
            yield from self._auth_failed(user, "USER/PASS")

    def pop_apop(self, arg):
        if self._refused_before_tls():
            return
        parts = arg.split()
        if len(parts) != 2:
            self.bad("-ERR usage: APOP name digest")
            return
        user, digest = parts
        secret = self._plain_secret(user)
        if secret is not None:
            expected = hashlib.md5(_utf8(self.banner) + _utf8(secret)).hexdigest()
            if hmac.compare_digest(expected.encode("ascii"), _utf8(digest.lower())):
                self._login(user)
                return
        yield from self._auth_failed(user, "APOP")

    def _plain_secret(self, user):
        auth = self.services.pop_auth
        secrets = None if auth is None else auth.secrets()
        if secrets is None:
            return None  # PAM: no password to compute a digest from
        secret = secrets.server_secret(user)
        if secret is None or secret.kind != "plain":
            return None
        return secret.password

    def pop_auth(self, arg):
        if self._refused_before_tls():
            return
        parts = arg.split()
        if not parts:
            # Not in RFC 5034, but common: list the mechanisms.
            self.reply("+OK")
            for m in self._mechanisms():
                self.reply(m)
            self.reply(".")
            return
        if len(parts) > 2:
            self.bad("-ERR usage: AUTH mechanism [initial-response]")
            return
        mech = parts[0].upper()
        if mech not in self._mechanisms():
            self.bad("-ERR unsupported authentication mechanism")
            return
        exchange = self.services.pop_auth.start(mech, parts[1] if len(parts) == 2 else None,
                                                tls=self.conn.tls)
        # Challenges go out base64-encoded; responses are passed on as sent.
        outcome = yield from self.sasl_exchange(exchange, "+ ", SASL_LINE_LIMIT,
                                                "-ERR authentication response too long")
        if outcome is None:
            return
        if outcome[0] == "ok":
            if self._login(outcome[1]):
                self.event("login")
        elif outcome[1] == sasl.CANCELLED:
            self.reply("-ERR authentication cancelled")
        else:
            yield from self._auth_failed(exchange.user, "AUTH %s: %s" % (mech, outcome[1]))

    def _auth_failed(self, user, how):
        # Always with the address, whatever --log-address says: fail2ban needs it.
        log.warning("pop: authentication failed (%s)%s from %s" % (
            how, "" if user is None else " for %s" % log.sanitise(user), self.peer_ip),
            peer=self.peer)
        return self.auth_failed("-ERR [AUTH] authentication failed",
                                "-ERR [AUTH] authentication failed, closing connection")

    def _login(self, user):
        """Opens the user's maildrop; False after an -ERR reply."""
        try:
            settings = self.settings
            directory = maildrop_directory(settings.spool_dir, user, settings.by_name)
            self.maildrop = Maildrop(self.services.spool, directory, settings.by_name)
        except MaildropError as e:
            log.warning("pop: cannot open maildrop for %s: %s" % (log.sanitise(user), e.text),
                        peer=self.peer)
            self.reply("-ERR " + e.text)
            return False
        self.authenticated = user
        live = self.maildrop.live()
        log.info("pop: %s logged in (%d messages)" % (log.sanitise(user), len(live)),
                 peer=self.peer)
        self.reply("+OK maildrop has %d messages (%d octets)"
                   % (len(live), sum(m.size for m in live)))
        return True

    def pop_quit(self, arg):
        if self.state == AUTHORIZATION:
            self.event("quit")
            self.reply("+OK %s POP3 server signing off" % self.domain)
            return
        self.event("update")
        marked = [m for m in self.maildrop.messages if m.deleted]
        if self.settings.no_delete:
            if marked:
                log.info("pop: %s: %d messages kept (--pop-no-delete)"
                         % (log.sanitise(self.authenticated), len(marked)), peer=self.peer)
            failures = 0
        else:
            failures = self.maildrop.update(self.services.spool)
            if marked:
                log.info("pop: %s: deleted %d messages" % (
                    log.sanitise(self.authenticated), len(marked) - failures), peer=self.peer)
        self.maildrop.close()
        self.event("quit")
        if failures:
            self.reply("-ERR [SYS/TEMP] %d deleted messages not removed" % failures)
        else:
            self.reply("+OK %s POP3 server signing off (%d messages left)"
                       % (self.domain, len(self.maildrop.live())))

    # TRANSACTION state.

    def _message(self, arg):
        """The message named by `arg`, or None after an -ERR reply."""
        if not arg.isdigit():
            self.bad("-ERR need a message number")
            return None
        m = self.maildrop.get(arg)
        if m is None:
            self.reply("-ERR no such message")
        return m

    def pop_stat(self, arg):
        live = self.maildrop.live()
        self.reply("+OK %d %d" % (len(live), sum(m.size for m in live)))

    def pop_list(self, arg):
        self._listing(arg, lambda m: str(m.size))

    def pop_uidl(self, arg):
        self._listing(arg, lambda m: m.id)

    def _listing(self, arg, value):
        if arg.strip():
            m = self._message(arg.strip())
            if m is not None:
                self.reply("+OK %d %s" % (m.number, value(m)))
            return
        live = self.maildrop.live()
        self.reply("+OK %d messages (%d octets)" % (len(live), sum(m.size for m in live)))
        for m in live:
            self.reply("%d %s" % (m.number, value(m)))
        self.reply(".")

    def pop_retr(self, arg):
        m = self._message(arg.strip())
        if m is not None:
            self._send_message(m, "+OK %d octets" % m.size, None)

    def pop_top(self, arg):
        parts = arg.split()
        if len(parts) != 2 or not parts[1].isdigit():
            self.bad("-ERR usage: TOP message lines")
            return
        m = self._message(parts[0])
        if m is not None:
            self._send_message(m, "+OK top of message follows", int(parts[1]))

    def _send_message(self, m, ok_text, body_lines):
        try:
            with process.privileged(group=False):
                f = open_content(m.content_path)
        except OSError as e:
            reason = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
            log.warning("pop: cannot open %s: %s" % (m.content_path, reason), peer=self.peer)
            self.reply("-ERR [SYS/TEMP] message is no longer available")
            return
        with f:
            self.reply(ok_text)
            self.write_queued()
            dotstuff.write_text(f, self.conn.write, body_lines)

    def pop_dele(self, arg):
        m = self._message(arg.strip())
        if m is not None:
            m.deleted = True
            self.reply("+OK message %d deleted" % m.number)

    def pop_noop(self, arg):
        self.reply("+OK")

    def pop_rset(self, arg):
        for m in self.maildrop.messages:
            m.deleted = False
        live = self.maildrop.messages
        self.reply("+OK maildrop has %d messages (%d octets)"
                   % (len(live), sum(m.size for m in live)))


# The transition table: RFC 1939's states. A login (PASS, APOP, AUTH) moves
# AUTHORIZATION to TRANSACTION; QUIT in TRANSACTION moves to UPDATE, where
# deletions happen, and the session ends (DONE) whatever UPDATE replied.
_BOTH = (AUTHORIZATION, TRANSACTION)
_AUTH = (AUTHORIZATION,)
_TRANS = (TRANSACTION,)
COMMANDS = session_core.table(
    # verb    states  handler                 next state
    ("CAPA", _BOTH, PopSession.pop_capa, None),
    ("STLS", _AUTH, PopSession.pop_stls, None),
    ("USER", _AUTH, PopSession.pop_user, None),
    ("PASS", _AUTH, PopSession.pop_pass, TRANSACTION),
    ("APOP", _AUTH, PopSession.pop_apop, TRANSACTION),
    # AUTH with no mechanism only lists them: the handler moves on a login.
    ("AUTH", _AUTH, PopSession.pop_auth, None),
    ("STAT", _TRANS, PopSession.pop_stat, None),
    ("LIST", _TRANS, PopSession.pop_list, None),
    ("UIDL", _TRANS, PopSession.pop_uidl, None),
    ("RETR", _TRANS, PopSession.pop_retr, None),
    ("TOP", _TRANS, PopSession.pop_top, None),
    ("DELE", _TRANS, PopSession.pop_dele, None),
    ("NOOP", _TRANS, PopSession.pop_noop, None),
    ("RSET", _TRANS, PopSession.pop_rset, None),
    # UPDATE and then DONE, or DONE at once from AUTHORIZATION.
    ("QUIT", _BOTH, PopSession.pop_quit, None),
)
PopSession.COMMANDS = COMMANDS
PopSession.TRANSITIONS = session_core.transitions(
    # event, states, next state
    ("login", _AUTH, TRANSACTION),          # AUTH succeeded (PASS and APOP: the table)
    ("update", _TRANS, UPDATE),             # QUIT in TRANSACTION: deletions are made
    ("quit", (AUTHORIZATION, UPDATE), session_core.DONE),
)


def _utf8(text):
    return text.encode("utf-8", "surrogateescape")
