"""The SMTP server protocol: one `SmtpSession` per accepted connection.

`SmtpSession(conn, services).run()` speaks SMTP over a `net.Connection` (or
a `net.MemoryConnection` in tests) until the client quits or goes away, and
stores each accepted message in the spool durably before replying `250`.
`services` is the bundle `main.Services` builds: `cfg`, `spool`, `filters`,
`verifier`, `server_auth`, `server_secrets`, `tls_context`, `forwarder`,
`stats`.

The session is an explicit state machine. Commands are the `smtp_<VERB>`
methods; each is decorated with `@command(syntax, states)`, which gives the
HELP text and the states the command is allowed in (a command outside its
states gets `503`). States:

    START    connected, no EHLO/HELO yet (also after STARTTLS)
    GREETED  EHLO/HELO done, no transaction
    MAIL     MAIL FROM accepted
    RCPT     at least one recipient accepted
    BDAT     BDAT chunks (not LAST yet) being received
    DONE     QUIT received, or the session must end

Replies are queued and sent only when the client has no more input
pipelined, or before we would block reading (RFC 2920); this is what makes
pipelined clients fast. Replies are written with RFC 3463 enhanced status
codes; unless `--server-smtp-config +enhancedstatuscodes` is given they are
taken out as they are queued, so that the default replies are E-MailRelay
2.6's, word for word. Message text is read by `smtp_text` in large blocks
and command syntax is parsed by `smtp_syntax`.
"""

import errno
import os
import re

from . import envelope
from . import log
from . import net
from . import options
from . import session_loop
from . import smtp_controls
from . import smtp_text
from .smtp_syntax import parse_params, parse_path, rfc5322_date, to_alabels
from . import spool

START, GREETED, MAIL, RCPT, BDAT, DONE = "START", "GREETED", "MAIL", "RCPT", "BDAT", "DONE"

COMMAND_LIMIT = 512     # RFC 5321 4.5.3.1.4, including CRLF
AUTH_LINE_LIMIT = 12288  # RFC 4954 4: AUTH responses may be long
MAX_AUTH_FAILURES = 3
# E-MailRelay drops a client at its 8th protocol error, without a reply.
PROTOCOL_ERROR_LIMIT = 8
# An enhanced code after the reply code, followed by text or by the end of
# the line (an empty line of a multi-line reply).
_ENHANCED_CODE = re.compile(r"^(\d{3}[ -])\d\.\d{1,3}\.\d{1,3}(?: |(?=\r|$))", re.M)
OUT_OF_SEQUENCE = "503 5.5.1 command out of sequence -- use RSET to resynchronise"
NO_STORAGE = "452 4.3.1 insufficient system storage"

def plain_reply(text):
    """`text` (one reply, perhaps multi-line) without its RFC 3463 enhanced codes.

    The default replies are E-MailRelay's, which has none; replies sent
    outside a session (the busy and refusal texts) use this too.
    """
    if text[5:6] != ".":
        return text
    if "\n" not in text and text[4:5].isdigit():
        # The common case, one line: "250 2.1.5 text" -> "250 text".
        i = text.find(" ", 5)
        return text[:4] + (text[i + 1:] if i > 0 else "")
    return _ENHANCED_CODE.sub(r"\1", text)


def reply_bytes(cfg, text):
    """A one-off reply line as sent on the wire, enhanced codes only if configured."""
    if not options.smtp_config(getattr(cfg, "server_smtp_config", None),
                               options.SERVER_SMTP_KEYWORDS)["enhancedstatuscodes"]:
        text = plain_reply(text)
    return (text + "\r\n").encode("ascii")


def command(syntax, states=None):
    """Marks an `smtp_<VERB>` method: its HELP syntax and allowed states (None: any)."""
    def mark(fn):
        fn.syntax = syntax
        fn.states = states
        return fn
    return mark


class _Drop(Exception):
    """The session must end now (after any queued reply is sent)."""


class SmtpSession:
    """One SMTP server conversation; `run()` handles it to the end.

    Never raises for anything the peer does; storage failures are replied
    to with 4xx codes and the message is abandoned, never half-stored.
    After `run()`, `error_replies` is the number of 4xx/5xx replies sent
    and `mail_from` is not None when input ended inside a transaction
    (what --bsmtp's exit status is made of).
    """

    def __init__(self, conn, services):
        self.conn = conn
        self.services = services
        cfg = services.cfg
        self.cfg = cfg
        self.domain = cfg.domain or "localhost"
        self.anonymous = options.anonymous_scopes(cfg.anonymous)
        self.size_limit = cfg.size or 0
        self.peer = "%s:%s" % (conn.peer[0], conn.peer[1])
        self.peer_ip = conn.peer[0]
        self.state = START
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.auth_mech = None
        self.auth_failures = 0
        self.bad_commands = 0
        self.error_replies = 0
        self.features = options.smtp_config(getattr(cfg, "server_smtp_config", None),
                                            options.SERVER_SMTP_KEYWORDS)
        self.enhanced = self.features["enhancedstatuscodes"]
        given = getattr(cfg, "given", None)
        # None: E-MailRelay's rule (PROTOCOL_ERROR_LIMIT); else --max-bad-commands.
        self.bad_limit = cfg.max_bad_commands if given is None or given("max-bad-commands") else None
        self.replies = []
        self.verbose = log.verbose_enabled()
        # --immediate: this session's handle on the forwarding thread.
        self._immediate = None
        # A --filter exited 103: rescan once the message is committed.
        self._rescan = False
        self.tarpit = smtp_controls.Tarpit(*smtp_controls.parse_tarpit(cfg.tarpit)) \
            if cfg.tarpit else None
        self._reset_transaction()

    # ----- the main loop -------------------------------------------------

    def run(self):
        """Runs the session in this thread until QUIT, end of input, timeout or a fatal error."""
        session_loop.drive(self, getattr(self.services, "stop_event", None))

    def conversation(self):
        """The session as a `session_loop` conversation (a generator); see `run`."""
        try:
            self.conn.settimeout(self.cfg.idle_timeout or None)
            refusal = self._connect_refusal()
            dnsbl = getattr(self.services, "dnsbl", None)
            if refusal is None and dnsbl is not None:
                refusal = yield ("call", dnsbl.check, (self.peer_ip,))
            if refusal:
                self._reply(refusal)
                raise _Drop()
            self._reply(self._greeting())
            while self.state != DONE:
                line = yield from self._readline(COMMAND_LIMIT)
                if line is None:
                    continue
                handled = self._dispatch(line)
                if handled is not None:
                    yield from handled
        except net.Timeout:
            log.info("smtp: idle timeout", peer=self.peer)
            self._reply("421 4.4.2 %s idle timeout" % self.domain)
        except EOFError:
            log.verbose("smtp: client disconnected", peer=self.peer)
        except _Drop:
            pass
        except net.Closed:
            log.verbose("smtp: connection lost", peer=self.peer)
        except Exception as e:  # the peer never sees a traceback
            log.error("smtp: session failed: %s: %s" % (type(e).__name__, e), peer=self.peer)
            self._reply("421 4.3.0 %s internal error, closing connection" % self.domain)
        finally:
            self._discard_message()
            try:
                self._flush()
            except (net.Closed, net.Timeout, OSError):
                pass
            if self._immediate is not None:
                self._immediate.close()

    def _readline(self, limit):
        """Reads one command line as text; None when it was refused (already replied).

        A generator (see `conversation`): the replies owed are sent first
        unless the client has pipelined more input.
        """
        if not self.conn.pending():
            yield from self._send()
        try:
            raw = yield ("line", limit)
        except net.LineTooLong:
            self._bad("500 5.5.2 line too long")
            return None
        if not raw:
            raise EOFError()
        raw = raw.rstrip(b"\r\n")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._bad("500 5.5.2 invalid character in command")
            return None

    def _dispatch(self, line):
        """Runs a command; returns the handler's generator when it has more to do."""
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if self.verbose:
            # An AUTH initial response is a credential: only the mechanism is logged.
            shown = "AUTH " + arg.split(" ")[0] if verb == "AUTH" else line
            log.verbose("smtp: rx: %s" % log.sanitise(shown), peer=self.peer)
        method = _COMMANDS.get(verb)
        if verb == "AUTH" and self.services.server_auth is None:
            self._reply("502 5.5.1 command not implemented")
            return
        if method is None or not self._available(verb):
            self._bad("500 5.5.1 command unrecognized")
            return
        if method.states is not None and self.state not in method.states:
            self._sequence_error(verb)
            return
        return method(self, arg.strip(" "))

    def _available(self, verb):
        if verb == "STARTTLS":
            return self.services.tls_context is not None and not self.conn.tls
        if verb == "AUTH":
            return self.services.server_auth is not None
        if verb == "ETRN":
            return self.services.forwarder is not None
        if verb == "BDAT":
            return self.features["chunking"]
        return True

    def _sequence_error(self, verb):
        """Replies to a command given in the wrong state, as E-MailRelay does."""
        if verb in ("DATA", "BDAT") and self.state == MAIL:
            self._reply("554 5.5.1 no valid recipients")
        else:
            self._bad(OUT_OF_SEQUENCE)

    def _reply(self, text):
        """Queues a reply; with --tarpit an error reply is queued behind its delay."""
        if not self.enhanced:
            text = plain_reply(text)
        if text[:1] in "45":
            self.error_replies += 1
            if self.tarpit is not None:
                delay = self.tarpit.next_delay()
                if delay > 0:
                    self.replies.append(float(delay))
        if self.verbose:
            log.verbose("smtp: tx: %s" % log.sanitise(text.split("\r\n")[0]), peer=self.peer)
        self.replies.append(text)

    def _send(self):
        """Sends the queued replies, waiting before each tarpit-delayed one (a generator).

        The delay is a "sleep" request: it holds no lock and, in the
        session loop, no thread.
        """
        while self.replies:
            texts = []
            while self.replies and not isinstance(self.replies[0], float):
                texts.append(self.replies.pop(0))
            if texts:
                self.conn.write(("\r\n".join(texts) + "\r\n").encode("utf-8", "replace"))
            if self.replies:
                delay = self.replies.pop(0)
                self.conn.flush()
                log.verbose("smtp: tarpit: waiting %gs before an error reply" % delay,
                            peer=self.peer)
                yield ("sleep", delay)
        self.conn.flush()

    def _flush(self):
        """Sends the queued replies now, without the tarpit's delays (the session is ending)."""
        texts = [r for r in self.replies if not isinstance(r, float)]
        self.replies = []
        if texts:
            self.conn.write(("\r\n".join(texts) + "\r\n").encode("utf-8", "replace"))
        self.conn.flush()

    def _bad(self, text):
        """Replies with an error and counts it; too many end the session.

        By default the reply to the 8th error is the last thing sent, as
        E-MailRelay does; with --max-bad-commands the next error gets 421.
        """
        self.bad_commands += 1
        limit = self.bad_limit
        if limit is None:
            self._reply(text)
            if self.bad_commands >= PROTOCOL_ERROR_LIMIT:
                log.warning("smtp: too many protocol errors from the client: dropping the connection",
                            peer=self.peer)
                raise _Drop()
            return
        if limit and self.bad_commands > limit:
            log.warning("smtp: too many bad commands from %s" % self.peer_ip, peer=self.peer)
            self._reply("421 4.7.0 %s too many errors, closing connection" % self.domain)
            raise _Drop()
        self._reply(text)

    def _connect_refusal(self):
        """The reply that ends the session before the greeting (--max-load), or None."""
        guard = self.services.load_guard
        if guard is not None and guard.over():
            return "421 4.3.2 %s system overloaded, try again later" % self.domain
        return None

    def _helo_refusal(self, arg):
        """The 501 reply for an EHLO/HELO argument that --helo-check refuses, or None."""
        if self.cfg.helo_check and not smtp_controls.valid_helo(arg):
            return "501 5.5.2 invalid domain name or address literal: %s" % log.sanitise(arg[:64])
        return None

    def _greeting(self):
        if self.cfg.greeting:
            from . import __version__
            lines = [smtp_controls.expand_greeting(text, self.domain, __version__, rfc5322_date())
                     for text in self.cfg.greeting]
            return "".join("220-%s\r\n" % x for x in lines[:-1]) + "220 " + lines[-1]
        if "server" in self.anonymous:
            return "220 %s -- Service ready" % self.domain
        from . import __version__
        return "220 %s -- E-MailRelay V%s -- Service ready" % (self.domain, __version__)

    # ----- transaction state --------------------------------------------

    def _reset_transaction(self):
        self._discard_message()
        self.mail_from = None
        self.body = "7bit"
        self.smtputf8 = False
        self.mail_auth = ""
        self.to_local = []
        self.to_remote = []
        self.message = None
        self.text = None
        self._write = None
        if self.state not in (START, DONE):
            self.state = GREETED

    def _discard_message(self):
        msg = getattr(self, "message", None)
        if msg is not None:
            self.message = None
            try:
                msg.abandon()
            except OSError as e:
                log.error("smtp: cannot remove message files: %s" % e, peer=self.peer)

    def _trusted(self):
        """The trusted-address keyword from the server secrets, or None."""
        auth = self.services.server_auth
        return None if auth is None else auth.trusted(self.peer_ip)

    # ----- commands ------------------------------------------------------

    def _greet(self, arg, esmtp):
        """EHLO and HELO: checks the argument, resets the session; False after a refusal."""
        if not arg:
            self._reply("501 5.5.4 parameter required")
            return False
        refusal = self._helo_refusal(arg)
        if refusal is not None:
            self._bad(refusal)
            return False
        self.helo = arg
        self.esmtp = esmtp
        self.state = GREETED
        self._reset_transaction()
        return True

    @command("EHLO <domain>")
    def smtp_EHLO(self, arg):
        if not self._greet(arg, esmtp=True):
            return
        # E-MailRelay 2.6's keywords and order, then ours, 8BITMIME last.
        features = self.features
        lines = ["%s says hello" % self.domain if "server" not in self.anonymous else self.domain]
        if self.size_limit:
            lines.append("SIZE %d" % self.size_limit)
        mechs = self._auth_mechanisms()
        if mechs:
            lines.append("AUTH " + " ".join(mechs))
        if self._available("STARTTLS"):
            lines.append("STARTTLS")
        if "vrfy" not in self.anonymous:
            lines.append("VRFY")
        if features["chunking"]:
            lines += ["CHUNKING", "BINARYMIME"]
        if features["pipelining"]:
            lines.append("PIPELINING")
        if features["smtputf8"]:
            lines.append("SMTPUTF8")
        if self.enhanced:
            lines.append("ENHANCEDSTATUSCODES")
        if self.services.forwarder is not None:
            lines.append("ETRN")
        lines.append("8BITMIME")
        self._reply("\r\n".join("250-" + x for x in lines[:-1]) + "\r\n250 " + lines[-1])

    def _auth_mechanisms(self):
        """The AUTH mechanisms to offer now: none before TLS with --server-tls-required."""
        auth = self.services.server_auth
        if auth is None or (self.cfg.server_tls_required and not self.conn.tls):
            return []
        return auth.mechanisms(self.conn.tls)

    @command("HELO <domain>")
    def smtp_HELO(self, arg):
        if self._greet(arg, esmtp=False):
            self._reply("250 hello")

    @command("NOOP")
    def smtp_NOOP(self, arg):
        self._reply("250 2.0.0 noop")

    @command("RSET")
    def smtp_RSET(self, arg):
        self._reset_transaction()
        self._reply("250 2.0.0 state reset")

    @command("QUIT")
    def smtp_QUIT(self, arg):
        self._reset_transaction()
        self._reply("221 2.0.0 OK")
        self.state = DONE

    @command("HELP [<command>]")
    def smtp_HELP(self, arg):
        verbs = sorted(v for v in _COMMANDS if self._available(v))
        if arg:
            verb = arg.upper()
            if verb in verbs:
                self._reply("214 2.0.0 Syntax: %s" % _COMMANDS[verb].syntax)
            else:
                self._reply("504 5.5.1 no help for %s" % log.sanitise(arg[:40]))
            return
        # --help-text lines follow the command list in one multi-line reply.
        lines = ["commands: %s" % " ".join(verbs)] + list(self.services.help_text)
        self._reply("".join(("214-2.0.0 " + x).rstrip() + "\r\n" for x in lines[:-1])
                    + ("214 2.0.0 " + lines[-1]).rstrip())

    @command("MAIL FROM:<address> [SIZE=<n>] [BODY=7BIT|8BITMIME|BINARYMIME] "
             "[SMTPUTF8] [AUTH=<xtext>]", states=(GREETED,))
    def smtp_MAIL(self, arg):
        starttls = self._available("STARTTLS")
        tls_missing = self.cfg.server_tls_required and not self.conn.tls
        if (self.services.server_auth is not None and self.auth_user is None
                and self._trusted() is None):
            self._reply("530 5.7.0 authentication required"
                        + (": use starttls" if tls_missing and starttls else ""))
            return
        if tls_missing:
            self._reply("530 5.7.0 encryption required" + (": use starttls" if starttls else ""))
            return
        if arg[:5].upper() != "FROM:":
            self._bad("553 5.5.2 mailbox name not allowed: invalid mail-from command")
            return
        try:
            address, rest = parse_path(arg[5:], allow_empty=True,
                                       strict=self.features["strictparsing"])
        except ValueError as e:
            self._bad("553 5.1.7 mailbox name not allowed: %s" % e)
            return
        params = parse_params(rest)
        body = "7bit"
        # Parameters nobody here understands (DSN's RET= and ENVID=, say)
        # are ignored, as E-MailRelay ignores them.
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self._bad("501 5.5.4 invalid argument")
                    return
                if self.size_limit and int(value) > self.size_limit:
                    self._reply("552 5.3.4 message size exceeds fixed maximum message size")
                    return
            elif key == "BODY":
                body = {"7BIT": "7bit", "8BITMIME": "8bit",
                        "BINARYMIME": "binarymime"}.get((value or "").upper())
                if body is None:
                    self._bad("501 5.5.4 invalid argument")
                    return
        smtputf8 = "SMTPUTF8" in params
        address = self._mailbox(address, smtputf8)
        if address is None:
            return
        if not self._enough_space():
            self._reply(NO_STORAGE)
            return
        self.mail_from = address
        self.body = body
        self.smtputf8 = smtputf8 or not address.isascii()
        # MAIL FROM AUTH= is kept as given (xtext), and only for an
        # authenticated client (RFC 4954 5).
        self.mail_auth = (params.get("AUTH") or "") if self.auth_user is not None else ""
        self.state = MAIL
        self._reply("250 2.1.0 sender <%s> OK" % address)

    def _mailbox(self, address, smtputf8, rcpt=False):
        """The address as stored (A-labels with alabels), or None after a refusal."""
        if address.isascii():
            return address
        refusal = "550 5.6.7 " if rcpt else "553 5.6.7 mailbox name not allowed: "
        if self.features["smtputf8strict"] and not smtputf8:
            self._reply(refusal + "invalid character in mailbox name")
            return None
        if self.features["alabels"]:
            try:
                return to_alabels(address)
            except ValueError as e:
                self._reply(refusal + str(e))
                return None
        return address

    def _enough_space(self):
        need = self.cfg.min_free_space
        if not need:
            return True
        free = self.services.spool.free_kbytes()
        return free is None or free >= need

    @command("RCPT TO:<address>", states=(MAIL, RCPT))
    def smtp_RCPT(self, arg):
        if arg[:3].upper() != "TO:":
            self._bad("550 5.5.2 invalid rcpt-to command")
            return
        try:
            address, _ = parse_path(arg[3:], allow_empty=False,
                                    strict=self.features["strictparsing"])
        except ValueError as e:
            self._bad("550 5.1.3 %s" % e)
            return
        stored = self._mailbox(address, self.smtputf8, rcpt=True)
        if stored is None:
            return
        count = len(self.to_local) + len(self.to_remote)
        limit = self.cfg.max_recipients
        if limit and count >= limit:
            self._reply("452 4.5.3 too many recipients")
            return
        limit = self.cfg.max_bounce_recipients
        if self.mail_from == "" and limit and count >= limit:
            self._reply("452 4.5.3 too many recipients for a bounce message")
            return
        result = yield from self._verify(stored, self.mail_from)
        if result is None or result.status == "remote":
            self.to_remote.append(stored)
        elif result.status == "local":
            self.to_local.append(result.address)
        else:
            self._verify_refusal(result, address)
            return
        if not stored.isascii():
            self.smtputf8 = True
        self.state = RCPT
        local = result is not None and result.status == "local"
        # E-MailRelay marks a local recipient with a second space.
        self._reply("250 2.1.5 recipient <%s> %sOK" % (address, " " if local else ""))

    def _verify(self, address, from_):
        """Runs the address verifier (a generator); its result, or None when there is none."""
        verifier = self.services.verifier
        if verifier is None:
            return None
        if self.auth_user is not None:
            mech, name = (self.auth_mech or "").lower(), self.auth_user
        else:
            keyword = self._trusted()
            mech, name = ("none", keyword) if keyword is not None else ("", "")
        # Send what we owe first so a pipelining client is not kept waiting
        # on earlier replies while the verifier runs.
        yield from self._send()
        return (yield ("call", verifier.verify,
                       (address, from_, self.peer_ip, self.domain, mech, name)))

    def _verify_refusal(self, result, address):
        reason = log.sanitise(result.reason or "")
        if result.status == "reject":
            self._reply("550 5.1.1 %s" % (reason or "invalid recipient <%s>" % address))
        elif result.status == "tempfail":
            self._reply("450 4.1.1 %s" % (reason or "recipient <%s> unavailable" % address))
        else:
            log.warning("smtp: address verifier aborted the connection from %s" % self.peer_ip,
                        peer=self.peer)
            raise _Drop()

    @command("VRFY <address>")
    def smtp_VRFY(self, arg):
        if "vrfy" in self.anonymous:
            self._reply("252 2.1.5 cannot vrfy")
            return
        try:
            address, _ = parse_path(arg, allow_empty=False)
        except ValueError:
            self._reply("550 5.1.3 invalid mailbox")
            return
        result = yield from self._verify(address, "")
        if result is not None and result.status == "local":
            name = log.sanitise(result.full_name or "")
            self._reply("250 2.1.5 %s" % (name or "<%s>" % result.address))
        elif result is None or result.status == "remote":
            self._reply("252 2.1.5 cannot verify but will accept: %s" % address)
        else:
            self._verify_refusal(result, address)

    @command("EXPN <list>")
    def smtp_EXPN(self, arg):
        self._reply("502 5.5.1 command not implemented")

    @command("ETRN <domain>", states=(GREETED,))
    def smtp_ETRN(self, arg):
        self.services.forwarder.trigger()
        self._reply("250 2.0.0 OK, queue run started")

    @command("STARTTLS", states=(START, GREETED))
    def smtp_STARTTLS(self, arg):
        if arg:
            self._reply("501 5.5.4 invalid argument")
            return
        self._reply("220 2.0.0 ready to start tls")
        yield from self._send()
        try:
            yield ("starttls", self.services.tls_context)
        except (OSError, ValueError) as e:
            log.warning("tls error: %s" % e, peer=self.peer)
            raise _Drop() from None
        # RFC 3207 4.2: forget everything learnt before the handshake.
        self.state = START
        self.helo = None
        self.auth_user = None
        self.auth_mech = None
        self._reset_transaction()
        log.verbose("smtp: tls established", peer=self.peer)

    @command("AUTH <mechanism> [<initial-response>]", states=(GREETED,))
    def smtp_AUTH(self, arg):
        from . import sasl
        if self.auth_user is not None:
            self._bad(OUT_OF_SEQUENCE)
            return
        if self.cfg.server_tls_required and not self.conn.tls:
            # Refused before anything after the mechanism name is looked at.
            self._reply("530 5.7.0 encryption required: use starttls")
            return
        mech, _, initial = arg.partition(" ")
        auth = self.services.server_auth
        try:
            exchange = auth.start(mech, initial.strip() or None, tls=self.conn.tls)
        except sasl.MechanismError:
            later = (self._available("STARTTLS") and mech.upper() in auth.mechanisms(True))
            self._reply("504 5.5.4 unsupported authentication mechanism"
                        + (": use starttls" if later else ""))
            return
        # A step may ask PAM or --server-auth-program: it is work, not protocol.
        outcome = yield ("call", exchange.step, (None,))
        while outcome[0] == "challenge":
            self._reply("334 " + outcome[1].decode("ascii"))
            line = yield from self._readline(AUTH_LINE_LIMIT)
            if line is None:
                return
            outcome = yield ("call", exchange.step, (line,))
        if outcome[0] == "ok":
            self.auth_user = outcome[1]
            self.auth_mech = exchange.mechanism
            log.info("smtp: authenticated as %s using %s"
                     % (log.sanitise(self.auth_user), exchange.mechanism), peer=self.peer)
            self._reply("235 2.7.0 authentication successful")
            return
        if outcome[1] == sasl.CANCELLED:
            self._reply("501 5.7.0 authentication cancelled")
            return
        self.auth_failures += 1
        # Always with the address, whatever --log-address says: fail2ban needs it.
        log.warning('smtp authentication failed for user "%s" from %s'
                    % (log.sanitise(exchange.user or ""), self.peer_ip))
        if getattr(self.services, "auth_budget", None) is not None:
            delay = self.services.auth_budget.record(self.peer_ip, "smtp")
            if delay:
                yield from self._send()
                yield ("sleep", delay)
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self._reply("421 4.7.0 %s too many authentication failures" % self.domain)
            raise _Drop()
        self._reply("535 5.7.8 authentication failed")

    @command("DATA", states=(RCPT,))
    def smtp_DATA(self, arg):
        if self.body == "binarymime":
            self._bad("503 5.5.1 invalid data command with binarymime -- use RSET to resynchronise")
            return
        write = self._start_message()
        self._reply("354 start mail input -- end with <CRLF>.<CRLF>")
        yield from self._send()
        yield from smtp_text.read_data(self.conn, write, self.text)
        if self.text.fault is None:
            yield from self._commit()
        else:
            self._refuse_content()

    @command("BDAT <size> [LAST]")
    def smtp_BDAT(self, arg):
        parts = arg.split()
        if not parts or len(parts) > 2 or not parts[0].isdigit() or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            self._bad("501 5.5.4 invalid argument")
            return
        size = int(parts[0])
        last = len(parts) == 2
        if self.state not in (RCPT, BDAT):
            # The chunk is read and dropped so it is not taken for commands.
            yield from smtp_text.read_chunk(size, None, None)
            self._sequence_error("BDAT")
            return
        if self.state == RCPT:
            self._write = self._start_message()
            self.state = BDAT
        yield from smtp_text.read_chunk(size, self._write, self.text)
        if self.text.fault is not None:
            self._refuse_content()
        elif not last:
            self._reply("250 2.0.0 %d bytes received" % size)
        else:
            yield from self._commit()

    # ----- storing a message --------------------------------------------

    def _start_message(self):
        """Creates the spool files and writes the Received line; returns the writer.

        When the spool cannot take the message the text is still read (and
        dropped, `self.text.fault` says why), so that the reply comes at its
        end and the session goes on.
        """
        self.text = smtp_text.Text(self.size_limit)
        try:
            self.message = self.services.spool.new_message()
            if "content" not in self.anonymous:
                self.message.write(self._received(self.message.id))
        except OSError as e:
            self._discard_message()
            self.text.fault, self.text.error = "storage", e
            return None
        return self.message.write

    def _received(self, msg_id):
        """The RFC 5321 4.4 trace header for the message being received."""
        helo = "".join(c for c in (self.helo or "") if 32 < ord(c) < 127 and c not in "()")
        ip = self.peer_ip
        literal = "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip
        if ip == "unknown":
            literal = "unknown"     # --inetd on a pipe: there is no address
        tls = self.conn.tls_cipher if self.conn.tls else None
        # The protocol and cipher as Postfix writes them.
        tls_note = " (using %s with cipher %s (%d/%d bits))" % (tls[1], tls[0], tls[2], tls[2]) \
            if tls else ""
        protocol = "SMTP"
        if self.esmtp:
            protocol = "ESMTP" + ("S" if self.conn.tls else "") + (
                "A" if self.auth_user is not None else "")
        line = "Received: from %s (%s)%s by %s with %s id %s; %s\r\n" % (
            helo or "unknown", literal, tls_note, self.domain, protocol, msg_id, rfc5322_date())
        return line.encode("utf-8")

    def _refuse_content(self):
        """Replies to text that could not be kept; the session goes on."""
        text = self.text
        if text.fault == "storage":
            log.error("smtp: cannot store message: %s" % text.error, peer=self.peer)
            self._reply(_storage_reply(text.error))
        else:
            log.info("smtp: message refused: too big", peer=self.peer)
            self._reply("552 5.3.4 message size exceeds fixed maximum message size")
        self._reset_transaction()

    def _envelope(self):
        # 8-bit text sent without BODY=8BITMIME is recorded as 8bit, so
        # that the forwarder asks the next hop for 8BITMIME.
        body = "8bit" if self.body == "7bit" and self.text.eightbit else self.body
        return envelope.Envelope(
            content=body, from_=self.mail_from, to_local=self.to_local,
            to_remote=self.to_remote, authentication=self.auth_user or "",
            client=self.peer, client_certificate=self.conn.peer_certificate_pem or "",
            mail_from_auth_in=self.mail_auth, utf8_mailbox_names=self.smtputf8)

    def _commit(self):
        """Makes the message durable, runs the filters, and replies (a generator).

        The replies owed go out first; the storing is a request of its own,
        since it waits for the disk and for filter programs.
        """
        if not self._enough_space():
            log.warning("smtp: message refused: less than --min-free-space left in the spool",
                        peer=self.peer)
            self._reset_transaction()
            self._reply(NO_STORAGE)
            return
        yield from self._send()
        # Storing alone is "work", often quick enough for the session loop's
        # own thread; filter programs and --immediate wait on others.
        quick = not self.services.filters and not self.cfg.immediate
        self._reply((yield ("work" if quick else "call", self._store, ())))

    def _store(self):
        """The blocking part of `_commit`: returns the reply to the message."""
        msg = self.message
        try:
            env = self._envelope()
            refusal = None
            self._rescan = False
            if self.services.filters:
                msg.commit_content()
                msg.write_envelope(env)
                log.verbose("new envelope file [%s]" % os.path.basename(msg.new_envelope_path),
                            peer=self.peer)
                refusal = self._run_filters(msg)
            if refusal == "cancelled":
                # Exit 100: the filter owns the files now; say nothing more.
                msg.disown()
                self.message = None
                self._reset_transaction()
                return "250 2.0.0 message processed"
            if refusal is not None:
                self._count("messages-rejected")
                self._reset_transaction()
                return refusal
            if not self.services.filters:
                log.verbose("new envelope file [%s]" % os.path.basename(msg.new_envelope_path),
                            peer=self.peer)
            msg_id = msg.finish(env)
        except spool.SpoolError as e:
            # A filter removed the files without exiting 100.
            log.info("rejected by filter: [%s]" % e, peer=self.peer)
            self._reset_transaction()
            return "452 4.3.0 rejected"
        except (OSError, envelope.EnvelopeError) as e:
            log.error("smtp: cannot store message: %s" % e, peer=self.peer)
            self._reset_transaction()
            return _storage_reply(e)
        self.message = None
        count = len(self.to_local) + len(self.to_remote)
        log.info("smtp: stored %s from <%s> to %d recipient%s" % (
            msg_id, log.sanitise(self.mail_from), count, "" if count == 1 else "s"),
            peer=self.peer)
        self._count("messages-stored")
        self._reset_transaction()
        if self._rescan and self.services.forwarder is not None:
            # Exit 103: now that the message is committed, the pass sees it.
            self.services.forwarder.rescan()
        refusal = self._forward_now(msg_id)
        return refusal or "250 2.0.0 message processed"

    def _run_filters(self, msg):
        """Runs --filter programs in order; returns None, 'cancelled' or a refusal reply.

        As E-MailRelay: a rejection (exit 1-99) is `452 <reason>`; a filter
        that times out, crashes or cannot run is `452 error`.
        """
        for f in self.services.filters:
            result = f.run(msg.content_path, msg.new_envelope_path)
            if result.special == "cancel":
                return "cancelled"
            if result.special == "rescan":
                self._rescan = True
            if not result.ok:
                reason = log.sanitise(result.reason or "")
                msg.abandon()
                self.message = None
                if result.temporary:
                    why = "timeout" if reason == "filter timed out" else reason
                    log.warning("filter [%s]: [%s]: failed response=[error] reason=[%s]"
                                % (log.sanitise(f.spec), msg.id, why), peer=self.peer)
                    return "452 4.3.0 error"
                log.info("rejected by filter: [%s]" % reason, peer=self.peer)
                return "452 4.7.1 %s" % (reason or "rejected")
            if result.special == "stop":
                break
        return None

    def _forward_now(self, msg_id):
        """--immediate: forwards the message now; a refusal reply or None."""
        forwarder = self.services.forwarder
        if not self.cfg.immediate or forwarder is None:
            return None
        if self._immediate is None:
            self._immediate = forwarder.immediate_session()
        refusal = self._immediate.forward(msg_id)
        if refusal is None:
            return None
        # The message is .bad: the next hop's own refusal goes back to the
        # submitter.
        text = log.sanitise(refusal)
        return text if text[:3].isdigit() and text[0] == "5" else "554 5.0.0 %s" % text

    def _count(self, name):
        stats = self.services.stats
        if stats is not None:
            stats.increment(name)


def _storage_reply(e):
    """The reply when the spool cannot take a message (`e` an OSError or similar)."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return NO_STORAGE
    return "452 4.3.0 cannot store the message"


# The command table: verb -> unbound smtp_<VERB> method.
_COMMANDS = {name[5:]: getattr(SmtpSession, name) for name in dir(SmtpSession)
             if name.startswith("smtp_")}
