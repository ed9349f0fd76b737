"""The POP3 server: one session serving the spool to a mail reader.

`PopSession(conn, services).run()` handles one connection to the end. It
speaks RFC 1939 (USER/PASS, APOP, STAT, LIST, RETR, DELE, NOOP, RSET, TOP,
UIDL, QUIT), RFC 2449 CAPA with RESP-CODES, RFC 5034 SASL AUTH (through
`sasl.ServerAuth`) and RFC 2595 STLS.

`services` supplies `cfg` (`pop_by_name`, `pop_no_delete`, `idle_timeout`,
`server_tls_required`, `max_bad_commands`, `domain`, `spool_dir`), `spool`
(a `spool.Spool`), `pop_auth` (a `sasl.ServerAuth`, or None: nobody can log
in; APOP needs a plain secret from its `secrets()`) and `tls_context`
(None: no STLS).

What callers and users may rely on:
- The maildrop is the committed `.envelope` files of the spool directory,
  or with `--pop-by-name` of the spool sub-directory named after the
  authenticated user. Sizes are content file sizes, UIDs are message ids,
  so both are stable across sessions.
- A maildrop is locked for one session at a time, across threads and
  processes (`flock` on `.emailrelay-pop.lock` in the maildrop directory).
- The session is in one of RFC 1939's states, AUTHORIZATION, TRANSACTION
  and UPDATE, and the `COMMANDS` table says which commands each state
  takes; any other gets `-ERR <verb> is not valid in this state` (or
  `-ERR unknown command`), counted as a bad command.
- Deletions happen only at QUIT (the UPDATE state); a session that ends any
  other way deletes nothing. With `--pop-no-delete`, DELE answers `+OK` and
  hides the message for the rest of the session, but nothing is deleted.
- Idle timeout: `--idle-timeout` when given explicitly (0: none), otherwise
  600 seconds, the RFC 1939 minimum for the autologout timer (the option's
  default of 60 seconds suits SMTP but is too short for POP). An idle
  session gets `-ERR` and is closed without entering UPDATE.
- RETR and TOP send the text as `dotstuff.normalise_lines` makes it: CRLF
  line endings (bare CR and LF included), NUL octets dropped, dot-stuffed.
  Content files are opened only as regular files and never through a
  symbolic link (`--pop-by-name` maildrops cannot lead out of the spool).
- With --debug the dialogue is logged both ways (`pop: rx:` / `pop: tx:`),
  never a password, digest or SASL response, nor message text.
- Failed logins are logged with the client address always, and count
  against the per-address budget shared with SMTP (`auth_budget`).
"""

import errno
import fcntl
import hashlib
import hmac
import itertools
import os
import stat
import threading
import time

from . import dotstuff
from . import log
from . import net
from . import process
from . import sasl

# RFC 2449 allows 255 octets for a command line; a little slack for clients
# that are generous with arguments.
COMMAND_LIMIT = 512
# RFC 1939's session states.
AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"
# SASL responses are base64 and may exceed the command limit (RFC 5034 4).
SASL_LINE_LIMIT = 8192
# Failed logins before the session is closed.
MAX_AUTH_FAILURES = 3
# RFC 1939 3: an autologout timer, if any, must be at least 10 minutes.
RFC_IDLE_TIMEOUT = 600
LOCK_FILE = ".emailrelay-pop.lock"
IMPLEMENTATION = "emailrelay-python"
# Content is streamed in blocks of at most this many octets per line piece.
READ_CHUNK = 65536

_banner_counter = itertools.count(1)


class MaildropError(Exception):
    """A maildrop cannot be opened; `text` is the -ERR reply text."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text


def valid_user_name(name):
    """True when `name` may name a --pop-by-name sub-directory.

    It must be a single, plain, printable path component: not empty, no
    '/', '\\', NUL, control or white-space characters, not starting with a
    dot (which rules out '.', '..' and hidden files such as the lock file),
    at most 255 characters.
    """
    if not name or len(name) > 255 or name.startswith("."):
        return False
    for c in name:
        if c in "/\\" or c.isspace() or not c.isprintable():
            return False
    return True


def maildrop_directory(spool_dir, user, by_name):
    """The directory to serve to `user`; raises MaildropError.

    Without --pop-by-name this is the spool directory. With it, the user's
    sub-directory, which must exist and whose real path must be a direct
    child of the spool directory's real path (a symbolic link out of the
    spool is refused).
    """
    if not by_name:
        return spool_dir
    if not valid_user_name(user):
        raise MaildropError("[AUTH] invalid user name for a maildrop")
    base = os.path.realpath(spool_dir)
    real = os.path.realpath(os.path.join(spool_dir, user))
    if os.path.dirname(real) != base:
        raise MaildropError("[SYS/PERM] maildrop is outside the spool directory")
    if not os.path.isdir(real):
        raise MaildropError("[SYS/PERM] no maildrop for this user")
    return real


class _MaildropLock:
    """Exclusive use of one maildrop directory, across threads and processes.

    `flock` locks belong to the open file, so two sessions in one process
    exclude each other as two processes do; the in-process set also keeps a
    second session from even opening the lock file.
    """

    _held = set()
    _guard = threading.Lock()

    def __init__(self, directory):
        self.key = os.path.realpath(directory)
        with self._guard:
            if self.key in self._held:
                raise MaildropError("[IN-USE] maildrop locked")
            self._held.add(self.key)
        try:
            with process.privileged(group=False):
                self.fd = os.open(os.path.join(self.key, LOCK_FILE),
                                  os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            self._forget()
            log.warning("pop: cannot open lock file in %s: %s" % (self.key, e.strerror))
            raise MaildropError("[SYS/TEMP] cannot lock maildrop") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self._forget()
            raise MaildropError("[IN-USE] maildrop locked") from None

    def _forget(self):
        with self._guard:
            self._held.discard(self.key)

    def release(self):
        """Unlocks; safe to call twice."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self._forget()


class Message:
    """One message of a session's maildrop, numbered from 1."""

    def __init__(self, number, message_id, envelope_path, content_path, size):
        self.number = number
        self.id = message_id
        self.envelope_path = envelope_path
        self.content_path = content_path
        self.size = size
        self.deleted = False


class Maildrop:
    """The locked, numbered view of a maildrop for one session.

    `directory` is the spool directory, or with `sub_directory` a user's
    sub-directory of it.

    The message list is fixed at login (RFC 1939: numbers and sizes do not
    change during a session); messages arriving later appear next session.
    """

    def __init__(self, spool, directory, sub_directory):
        self.directory = directory
        self.lock = _MaildropLock(directory)
        try:
            self.messages = self._scan(spool, directory if sub_directory else None)
        except OSError as e:
            self.lock.release()
            log.warning("pop: cannot read maildrop %s: %s" % (directory, e))
            raise MaildropError("[SYS/TEMP] cannot read maildrop") from None

    @staticmethod
    def _scan(spool, directory):
        messages = []
        # spool.committed() finds a sub-directory's shared content in the spool.
        for item in spool.committed(directory):
            try:
                with process.privileged(group=False):
                    st = os.lstat(item.content_path)
            except OSError:
                # Forwarded or deleted since the scan, or a stray envelope.
                continue
            if not stat.S_ISREG(st.st_mode):
                log.warning("pop: %s is not a regular file: not served" % item.content_path)
                continue
            messages.append(Message(len(messages) + 1, item.id, item.envelope_path,
                                    item.content_path, st.st_size))
        return messages

    def get(self, number_text):
        """The live message with this number (text from the client), or None."""
        if not number_text.isdigit():
            return None
        n = int(number_text)
        if 1 <= n <= len(self.messages) and not self.messages[n - 1].deleted:
            return self.messages[n - 1]
        return None

    def live(self):
        """Messages not marked deleted."""
        return [m for m in self.messages if not m.deleted]

    def update(self, spool):
        """Removes the messages marked deleted; returns how many could not be."""
        failures = 0
        for m in self.messages:
            if m.deleted:
                try:
                    spool.remove_envelope(m.envelope_path, m.content_path)
                except OSError as e:
                    log.warning("pop: cannot delete %s: %s" % (m.envelope_path, e))
                    failures += 1
        return failures

    def close(self):
        """Releases the lock; safe to call twice."""
        self.lock.release()


class PopSession:
    """One POP3 connection from greeting to close (see the module docstring)."""

    def __init__(self, conn, services):
        self.conn = conn
        self.services = services
        self.cfg = services.cfg
        self.peer = "%s:%s" % tuple(conn.peer[:2])
        self.domain = self.cfg.domain or "localhost"
        self.banner = "<%d.%d.%d@%s>" % (os.getpid(), next(_banner_counter),
                                         int(time.time()), self.domain)
        self.user = None          # the name given by USER, waiting for PASS
        self.authenticated = None  # the logged-in user
        self.maildrop = None
        self.state = AUTHORIZATION
        self.done = False
        self.bad_commands = 0
        self.auth_failures = 0
        self.debug = log.debug_enabled()

    # The session loop.

    def run(self):
        """Handles the whole session; never raises for peer or protocol trouble."""
        try:
            self.conn.settimeout(self._idle_timeout())
            self._reply("+OK %s POP3 server ready %s" % (self.domain, self.banner))
            self.conn.flush()
            while not self.done:
                try:
                    line = self.conn.readline(limit=COMMAND_LIMIT)
                except net.LineTooLong:
                    self._bad("-ERR line too long")
                    self._flush()
                    continue
                if not line:
                    break
                self._command(line)
                self._flush()
        except net.Timeout:
            log.info("pop: idle timeout, closing (nothing deleted)", peer=self.peer)
            self._try_send("-ERR idle timeout, closing connection\r\n")
        except net.Closed:
            pass
        except OSError as e:
            log.warning("pop: connection error: %s" % e, peer=self.peer)
        finally:
            if self.maildrop is not None:
                self.maildrop.close()
            self.conn.close()

    def _idle_timeout(self):
        if self.cfg.given("idle-timeout"):
            return self.cfg.idle_timeout or None  # 0: no timeout
        return RFC_IDLE_TIMEOUT

    def _flush(self):
        # Replies to pipelined commands go out together (RFC 2449 PIPELINING).
        if not self.conn.pending():
            self.conn.flush()

    def _try_send(self, text):
        try:
            self.conn.write(text.encode("utf-8"))
            self.conn.flush()
        except (net.Closed, net.Timeout, OSError):
            pass

    def _reply(self, text):
        if self.debug:
            log.debug("pop: tx: %s" % text, peer=self.peer)
        self.conn.write(text.encode("utf-8", "surrogateescape") + b"\r\n")

    def _bad(self, text):
        """Replies to a command that was wrong; closes after too many."""
        self.bad_commands += 1
        limit = self.cfg.max_bad_commands
        if limit and self.bad_commands > limit:
            log.warning("pop: too many bad commands, closing", peer=self.peer)
            self._reply("-ERR too many bad commands, closing connection")
            self.done = True
        else:
            self._reply(text)

    def _command(self, line):
        text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if self.debug:
            log.debug("pop: rx: %s" % _shown(verb, text), peer=self.peer)
        row = COMMANDS.get(verb)
        if row is None:
            self._bad("-ERR unknown command")
        elif self.state not in row[0]:
            self._bad("-ERR %s is not valid in this state" % verb)
        else:
            row[1](self, arg)

    # AUTHORIZATION state.

    def _tls_missing(self):
        """True (after replying) when --server-tls-required and TLS is not active."""
        if self.cfg.server_tls_required and not self.conn.tls:
            self._bad("-ERR TLS is required: use STLS first")
            return True
        return False

    def _clear_text_refused(self):
        """True (after replying) when USER/PASS must wait for STLS (see sasl.py)."""
        auth = self.services.pop_auth
        if auth is not None and not auth.clear_text_allowed(self.conn.tls):
            self._bad("-ERR use STLS first: no clear-text passwords before TLS")
            return True
        return False

    def _mechanisms(self):
        if self.services.pop_auth is None:
            return []
        return list(self.services.pop_auth.mechanisms(self.conn.tls))

    def do_capa(self, arg):
        lines = ["+OK capability list follows", "TOP", "UIDL", "RESP-CODES", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if not (self.cfg.server_tls_required and not self.conn.tls):
                auth = self.services.pop_auth
                if auth is None or auth.clear_text_allowed(self.conn.tls):
                    lines.append("USER")
                mechs = self._mechanisms()
                if mechs:
                    lines.append("SASL " + " ".join(mechs))
            if self.services.tls_context is not None and not self.conn.tls:
                lines.append("STLS")
        lines.append("IMPLEMENTATION " + IMPLEMENTATION)
        lines.append(".")
        for item in lines:
            self._reply(item)

    def do_stls(self, arg):
        if self.services.tls_context is None:
            self._bad("-ERR STLS is not available")
            return
        if self.conn.tls:
            self._bad("-ERR TLS is already active")
            return
        self._reply("+OK begin TLS negotiation")
        self.user = None
        try:
            self.conn.starttls(self.services.tls_context)
        except (OSError, ValueError) as e:
            log.warning("tls error: %s" % e, peer=self.peer)
            self.done = True
            return
        log.verbose("pop: tls established", peer=self.peer)

    def do_user(self, arg):
        if self._tls_missing() or self._clear_text_refused():
            return
        if not arg:
            self._bad("-ERR USER needs a name")
            return
        self.user = arg
        # Always +OK: whether the name exists is not given away.
        self._reply("+OK send PASS")

    def do_pass(self, arg):
        if self._tls_missing() or self._clear_text_refused():
            return
        if self.user is None:
            self._bad("-ERR give USER first")
            return
        user, self.user = self.user, None
        if self._password_ok(user, arg):
            self._login(user)
        else:
            self._auth_failed(user, "USER/PASS")

    def _password_ok(self, user, password):
        auth = self.services.pop_auth
        return auth is not None and auth.check_password(user, password)

    def do_apop(self, arg):
        if self._tls_missing():
            return
        parts = arg.split()
        if len(parts) != 2:
            self._bad("-ERR usage: APOP name digest")
            return
        user, digest = parts
        secret = self._plain_secret(user)
        if secret is not None:
            expected = hashlib.md5(_utf8(self.banner) + _utf8(secret)).hexdigest()
            if hmac.compare_digest(expected.encode("ascii"), _utf8(digest.lower())):
                self._login(user)
                return
        self._auth_failed(user, "APOP")

    def _plain_secret(self, user):
        auth = self.services.pop_auth
        secrets = None if auth is None else auth.secrets()
        if secrets is None:
            return None  # PAM: no password to compute a digest from
        secret = secrets.server_secret(user)
        if secret is None or secret.kind != "plain":
            return None
        return secret.password

    def do_auth(self, arg):
        if self._tls_missing():
            return
        parts = arg.split()
        if not parts:
            # Not in RFC 5034, but common: list the mechanisms.
            self._reply("+OK")
            for m in self._mechanisms():
                self._reply(m)
            self._reply(".")
            return
        if len(parts) > 2:
            self._bad("-ERR usage: AUTH mechanism [initial-response]")
            return
        mech = parts[0].upper()
        if mech not in self._mechanisms():
            self._bad("-ERR unsupported authentication mechanism")
            return
        exchange = self.services.pop_auth.start(mech, parts[1] if len(parts) == 2 else None,
                                                tls=self.conn.tls)
        response = None
        while True:
            kind, value = exchange.step(response)
            if kind == "ok":
                self._login(value)
                return
            if kind == "fail":
                if value == sasl.CANCELLED:
                    self._reply("-ERR authentication cancelled")
                else:
                    self._auth_failed(exchange.user, "AUTH %s: %s" % (mech, value))
                return
            # Challenges come base64-encoded; responses go back as sent.
            self._reply("+ " + value.decode("ascii"))
            self.conn.flush()
            try:
                response = self.conn.readline(limit=SASL_LINE_LIMIT)
            except net.LineTooLong:
                self._bad("-ERR authentication response too long")
                return
            if not response:
                self.done = True
                return
            response = response.rstrip(b"\r\n")

    def _auth_failed(self, user, how):
        self.auth_failures += 1
        # Always with the address, whatever --log-address says: fail2ban needs it.
        log.warning("pop: authentication failed (%s)%s from %s" % (
            how, "" if user is None else " for %s" % log.sanitise(user), self.conn.peer[0]),
            peer=self.peer)
        if getattr(self.services, "auth_budget", None) is not None:
            self.services.auth_budget.failed(self.conn.peer[0], "pop")
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self._reply("-ERR [AUTH] authentication failed, closing connection")
            self.done = True
        else:
            self._reply("-ERR [AUTH] authentication failed")

    def _login(self, user):
        try:
            directory = maildrop_directory(self.cfg.spool_dir, user, self.cfg.pop_by_name)
            self.maildrop = Maildrop(self.services.spool, directory, self.cfg.pop_by_name)
        except MaildropError as e:
            log.warning("pop: cannot open maildrop for %s: %s" % (log.sanitise(user), e.text),
                        peer=self.peer)
            self._reply("-ERR " + e.text)
            return
        self.authenticated = user
        self.state = TRANSACTION
        live = self.maildrop.live()
        log.info("pop: %s logged in (%d messages)" % (log.sanitise(user), len(live)),
                 peer=self.peer)
        self._reply("+OK maildrop has %d messages (%d octets)"
                    % (len(live), sum(m.size for m in live)))

    def do_quit(self, arg):
        self.done = True
        if self.state == AUTHORIZATION:
            self._reply("+OK %s POP3 server signing off" % self.domain)
            return
        self.state = UPDATE
        marked = [m for m in self.maildrop.messages if m.deleted]
        if self.cfg.pop_no_delete:
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
        if failures:
            self._reply("-ERR [SYS/TEMP] %d deleted messages not removed" % failures)
        else:
            self._reply("+OK %s POP3 server signing off (%d messages left)"
                        % (self.domain, len(self.maildrop.live())))

    # TRANSACTION state.

    def _message(self, arg):
        """The message named by `arg`, or None after an -ERR reply."""
        if not arg.isdigit():
            self._bad("-ERR need a message number")
            return None
        m = self.maildrop.get(arg)
        if m is None:
            self._reply("-ERR no such message")
        return m

    def do_stat(self, arg):
        live = self.maildrop.live()
        self._reply("+OK %d %d" % (len(live), sum(m.size for m in live)))

    def do_list(self, arg):
        self._listing(arg, lambda m: str(m.size))

    def do_uidl(self, arg):
        self._listing(arg, lambda m: m.id)

    def _listing(self, arg, value):
        if arg.strip():
            m = self._message(arg.strip())
            if m is not None:
                self._reply("+OK %d %s" % (m.number, value(m)))
            return
        live = self.maildrop.live()
        self._reply("+OK %d messages (%d octets)" % (len(live), sum(m.size for m in live)))
        for m in live:
            self._reply("%d %s" % (m.number, value(m)))
        self._reply(".")

    def do_retr(self, arg):
        m = self._message(arg.strip())
        if m is not None:
            self._send_message(m, "+OK %d octets" % m.size, None)

    def do_top(self, arg):
        parts = arg.split()
        if len(parts) != 2 or not parts[1].isdigit():
            self._bad("-ERR usage: TOP message lines")
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
            self._reply("-ERR [SYS/TEMP] message is no longer available")
            return
        with f:
            self._reply(ok_text)
            _stream(f, self.conn.write, body_lines)
        self.conn.write(b".\r\n")

    def do_dele(self, arg):
        m = self._message(arg.strip())
        if m is not None:
            m.deleted = True
            self._reply("+OK message %d deleted" % m.number)

    def do_noop(self, arg):
        self._reply("+OK")

    def do_rset(self, arg):
        for m in self.maildrop.messages:
            m.deleted = False
        live = self.maildrop.messages
        self._reply("+OK maildrop has %d messages (%d octets)"
                    % (len(live), sum(m.size for m in live)))


# The transition table: verb -> (states that take it, handler). Logging in
# (PASS, APOP, AUTH) moves AUTHORIZATION to TRANSACTION; QUIT in TRANSACTION
# moves to UPDATE, where deletions happen, and ends the session.
_BOTH = (AUTHORIZATION, TRANSACTION)
COMMANDS = {
    "CAPA": (_BOTH, PopSession.do_capa),
    "STLS": ((AUTHORIZATION,), PopSession.do_stls),
    "USER": ((AUTHORIZATION,), PopSession.do_user),
    "PASS": ((AUTHORIZATION,), PopSession.do_pass),
    "APOP": ((AUTHORIZATION,), PopSession.do_apop),
    "AUTH": ((AUTHORIZATION,), PopSession.do_auth),
    "STAT": ((TRANSACTION,), PopSession.do_stat),
    "LIST": ((TRANSACTION,), PopSession.do_list),
    "UIDL": ((TRANSACTION,), PopSession.do_uidl),
    "RETR": ((TRANSACTION,), PopSession.do_retr),
    "TOP": ((TRANSACTION,), PopSession.do_top),
    "DELE": ((TRANSACTION,), PopSession.do_dele),
    "NOOP": ((TRANSACTION,), PopSession.do_noop),
    "RSET": ((TRANSACTION,), PopSession.do_rset),
    "QUIT": (_BOTH, PopSession.do_quit),
}


def _stream(f, write, body_lines=None):
    """Writes the message in `f` as `dotstuff.normalise_lines` makes it.

    With `body_lines` (TOP), only the header, the blank line and that many
    body lines. The terminating '.' line is the caller's.
    """
    in_body = False
    count = 0
    line_start = True
    for piece in dotstuff.normalise_lines(dotstuff.file_blocks(f, READ_CHUNK)):
        if body_lines is not None and in_body and count >= body_lines:
            break
        write(piece)
        ends = piece.endswith(b"\r\n")
        if ends:
            if in_body:
                count += 1
            elif line_start and piece == b"\r\n":
                in_body = True
        line_start = ends


def open_content(path):
    """Opens a message's content file for reading; raises OSError.

    Only a regular file is opened, never through a symbolic link (a
    maildrop's content must not lead out of the spool), and a FIFO in its
    place cannot block the session.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _shown(verb, line):
    """A command line as the debug log shows it: credentials left out."""
    if verb == "PASS":
        return "PASS <password>"
    if verb in ("APOP", "AUTH"):
        words = line.split()
        return " ".join(words[:2]) + (" <credentials>" if len(words) > 2 else "")
    return line


def _utf8(text):
    return text.encode("utf-8", "surrogateescape")
