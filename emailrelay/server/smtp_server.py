"""The SMTP server protocol: one `SmtpSession` per accepted connection.

`SmtpSession(conn, services).run()` speaks SMTP over a `net.Connection` (or
a `MemoryConnection` in tests) until the client quits or goes away, and
stores each accepted message in the spool durably before replying `250`;
`conversation()` is the same session for the session loop. `services` is
an `SmtpServices`, whose `settings` (`smtp_settings.SmtpSettings`) are
all the session takes from the configuration. Storing a message (spool
files, Received line, envelope, filters, --immediate) is
`smtp_message.MessageIntake`'s: the session gathers the transaction and
hands it over at the end of the text.

The session is a `session_core.LineSession`: reading, the reply queue,
dispatch, the budgets, SASL and STARTTLS are the core's. `COMMANDS` is the
transition table, rows of (verb, allowed states, handler, next state, HELP
syntax); a command outside its states gets `503`. States:

    START    connected, no EHLO/HELO yet (also after STARTTLS)
    GREETED  EHLO/HELO done, no transaction
    MAIL     MAIL FROM accepted
    RCPT     at least one recipient accepted
    BDAT     BDAT chunks (not LAST yet) being received
    DONE     QUIT received, or the session must end

Replies are queued and sent only when the client has no more input
pipelined, or before we would block reading (RFC 2920), or once
`session_core.OWED_HIGH_WATER` octets are owed; this is what makes
pipelined clients fast. Message text must keep up --min-data-rate
(`smtp_text.Pace`): a client that falls behind gets 421 and is dropped.
Replies are written with RFC 3463 enhanced status codes; unless
`--server-smtp-config +enhancedstatuscodes` is given they are taken out as
they are queued, so that the default replies are E-MailRelay 2.6's, word
for word (`smtp_settings.plain_reply`). Message text is read by `smtp_text`
in large blocks, and MAIL and RCPT arguments by `smtp_params`.
"""

from .. import __version__
from ..auth import sasl
from ..net import requests
from ..runtime import log
from ..util import parts, smtp_controls
from ..util.smtp_syntax import parse_path, rfc5322_date
from . import session_core, smtp_message, smtp_params, smtp_text
from .smtp_message import NO_STORAGE
from .smtp_params import TOO_BIG
from .smtp_settings import plain_reply

START, GREETED, MAIL, RCPT, BDAT = "START", "GREETED", "MAIL", "RCPT", "BDAT"
DONE = session_core.DONE

COMMAND_LIMIT = 512     # RFC 5321 4.5.3.1.4, including CRLF
AUTH_LINE_LIMIT = 12288  # RFC 4954 4: AUTH responses may be long
# E-MailRelay drops a client at its 8th protocol error, without a reply.
PROTOCOL_ERROR_LIMIT = 8
OUT_OF_SEQUENCE = "503 5.5.1 command out of sequence -- use RSET to resynchronise"


class SmtpServices(parts.Parts):
    """What an SMTP session uses.

    `settings` (`smtp_settings.SmtpSettings`); `spool` (spool.Spool);
    `filters` (list) and `verifier` (or None); `server_auth`
    (sasl.ServerAuth or None) and `auth_budget` (or None); `tls_context`
    (server side, or None: no STARTTLS); `trigger` (starts a forwarding
    pass, for ETRN; None without --forward-to); `rescan` (the same after a
    --filter exited 103); `immediate` (returns a handle whose
    `forward(msg_id)` forwards one message now and `close()`; None unless
    --immediate); `stats` (stats.Stats or None); `dnsbl`, `load_guard` (or
    None); `help_text` (lines for HELP); `stop_event`.
    """

    __slots__ = ("settings", "spool", "filters", "verifier", "server_auth", "auth_budget",
                 "tls_context", "trigger", "rescan", "immediate", "stats", "dnsbl",
                 "load_guard", "help_text", "stop_event")
    LISTS = ("filters", "help_text")


class SmtpSession(session_core.LineSession):
    """One SMTP server conversation; `run()` handles it to the end.

    Never raises for anything the peer does; storage failures are replied
    to with 4xx codes and the message is abandoned, never half-stored.
    After `run()`, `error_replies` is the number of 4xx/5xx replies sent
    and `mail_from` is not None when input ended inside a transaction
    (what --bsmtp's exit status is made of).
    """

    PROTOCOL = "smtp"
    COMMAND_LIMIT = COMMAND_LIMIT
    TOO_LONG = "500 5.5.2 line too long"
    NOT_UTF8 = "500 5.5.2 invalid character in command"

    def __init__(self, conn, services):
        settings = services.settings
        if settings.max_bad_commands is None:
            # E-MailRelay drops the client at its 8th error, after the reply.
            budget = session_core.BadBudget(
                PROTOCOL_ERROR_LIMIT, None,
                "smtp: too many protocol errors from the client: dropping the connection")
        else:
            budget = session_core.BadBudget(
                settings.max_bad_commands, "421 4.7.0 %s too many errors, closing connection"
                % settings.domain, "smtp: too many bad commands from %s" % conn.peer[0])
        super().__init__(conn, services, START, budget)
        self.anonymous = settings.anonymous
        self.features = settings.features
        self.enhanced = settings.enhanced
        self.size_limit = settings.size
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.auth_mech = None
        # Takes each message into the spool, from DATA or BDAT to its reply.
        self.intake = smtp_message.MessageIntake(services, self.peer, self.peer_ip)
        self.tarpit = smtp_controls.Tarpit(*settings.tarpit) if settings.tarpit else None
        # The block-list refusal that every RCPT gets (rcpt-dns-rbl), or None.
        self._rcpt_refusal = None
        self._reset_transaction()

    # ----- the core's hooks ----------------------------------------------

    def opening(self):
        refusal = self._connect_refusal()
        dnsbl = self.services.dnsbl
        if refusal is None and dnsbl is not None:
            refusal = yield requests.call(dnsbl.check, self.peer_ip)
            if refusal and self.features["rcpt-dns-rbl"]:
                # ZMailer's delayed rejection: the client is told at each
                # RCPT, which many clients log where they ignore a refused
                # greeting.
                self._rcpt_refusal = _rcpt_reply(refusal)
                refusal = None
        if refusal:
            self.reply(refusal)
            raise session_core.Drop()
        self.reply(self._greeting())

    def on_timeout(self):
        log.info("smtp: idle timeout", peer=self.peer)
        self.reply("421 4.4.2 %s idle timeout" % self.domain)

    def on_failure(self, e):
        super().on_failure(e)
        self.reply("421 4.3.0 %s internal error, closing connection" % self.domain)

    def closing(self):
        self.intake.close()

    def is_error(self, text):
        return text[:1] in "45"

    def available(self, verb):
        if verb == "STARTTLS":
            return self.tls_offered()
        if verb == "AUTH":
            return self.services.server_auth is not None
        if verb == "ETRN":
            return self.services.trigger is not None and self.features["etrn"]
        if verb == "EHLO":
            return self.features["ehlo"]
        if verb == "BDAT":
            return self.features["chunking"]
        return True

    def unknown(self, verb):
        if verb == "AUTH":
            self.reply("502 5.5.1 command not implemented")
        else:
            self.bad("500 5.5.1 command unrecognized")

    def out_of_sequence(self, verb):
        """Replies to a command given in the wrong state, as E-MailRelay does."""
        if verb in ("DATA", "BDAT") and self.state == MAIL:
            self.reply("554 5.5.1 no valid recipients")
        else:
            self.bad(OUT_OF_SEQUENCE)

    def shown(self, verb, line):
        # An AUTH initial response is a credential: only the mechanism is logged.
        return "AUTH " + line[5:].strip(" ").split(" ")[0] if verb == "AUTH" else line

    def trace_enabled(self):
        return log.verbose_enabled()

    def trace(self, text):
        log.verbose(text, peer=self.peer)

    def reset_after_tls(self):
        # RFC 3207 4.2: forget everything learnt before the handshake.
        self.event("tls")
        self.helo = None
        self.auth_user = None
        self.auth_mech = None
        self._reset_transaction()

    def reply(self, text):
        """Queues a reply; with --tarpit an error reply is queued behind its delay."""
        if not self.enhanced:
            text = plain_reply(text)
        if self.tarpit is not None and text[:1] in "45":
            seconds = self.tarpit.next_delay()
            if seconds > 0:
                log.verbose("smtp: tarpit: waiting %gs before an error reply" % seconds,
                            peer=self.peer)
                self.delay(seconds)
        super().reply(text)

    def _connect_refusal(self):
        """The reply that ends the session before the greeting (--max-load), or None."""
        guard = self.services.load_guard
        if guard is not None and guard.over():
            return "421 4.3.2 %s system overloaded, try again later" % self.domain
        return None

    def _helo_refusal(self, arg):
        """The 501 reply for an EHLO/HELO argument that --helo-check refuses, or None."""
        if self.settings.helo_check and not smtp_controls.valid_helo(arg):
            return "501 5.5.2 invalid domain name or address literal: %s" % log.sanitise(arg[:64])
        return None

    def _greeting(self):
        if self.settings.greeting:
            lines = [smtp_controls.expand_greeting(text, self.domain, __version__, rfc5322_date())
                     for text in self.settings.greeting]
            return "".join("220-%s\r\n" % x for x in lines[:-1]) + "220 " + lines[-1]
        if "server" in self.anonymous:
            return "220 %s -- Service ready" % self.domain
        return "220 %s -- E-MailRelay V%s -- Service ready" % (self.domain, __version__)

    # ----- transaction state --------------------------------------------

    def _reset_transaction(self):
        self.intake.discard()
        self.mail_from = None
        self.body = "7bit"
        self.smtputf8 = False
        self.mail_auth = ""
        self.to_local = []
        self.to_remote = []
        # RFC 3461: RET and ENVID from MAIL, NOTIFY and ORCPT per recipient.
        self.dsn_ret = ""
        self.dsn_envid = ""
        self.dsn_recipients = {}
        self.text = None
        self._write = None
        self.event("reset")

    def _trusted(self):
        """The trusted-address keyword from the server secrets, or None."""
        auth = self.services.server_auth
        return None if auth is None else auth.trusted(self.peer_ip)

    # ----- commands ------------------------------------------------------

    def _greet(self, arg, esmtp):
        """EHLO and HELO: checks the argument, resets the session; False after a refusal."""
        if not arg:
            self.reply("501 5.5.4 parameter required")
            return False
        refusal = self._helo_refusal(arg)
        if refusal is not None:
            self.bad(refusal)
            return False
        self.helo = arg
        self.esmtp = esmtp
        self._reset_transaction()
        return True

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
        if self.available("STARTTLS"):
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
        if self.available("ETRN"):
            lines.append("ETRN")
        if features["dsn"]:
            lines.append("DSN")
        if features["8bitmime"]:
            # ZMailer's No8BITMIME: only the keyword goes; 8-bit text is still taken.
            lines.append("8BITMIME")
        self.reply("\r\n".join("250-" + x for x in lines[:-1]) + "\r\n250 " + lines[-1])

    def _auth_mechanisms(self):
        """The AUTH mechanisms to offer now: none before TLS with --server-tls-required."""
        auth = self.services.server_auth
        if auth is None or self.tls_missing():
            return []
        return auth.mechanisms(self.conn.tls)

    def smtp_HELO(self, arg):
        if self._greet(arg, esmtp=False):
            self.reply("250 hello")

    def smtp_NOOP(self, arg):
        self.reply("250 2.0.0 noop")

    def smtp_RSET(self, arg):
        self._reset_transaction()
        self.reply("250 2.0.0 state reset")

    def smtp_QUIT(self, arg):
        self._reset_transaction()
        self.reply("221 2.0.0 OK")

    def smtp_HELP(self, arg):
        verbs = sorted(v for v in COMMANDS if self.available(v))
        if arg:
            verb = arg.upper()
            if verb in verbs:
                self.reply("214 2.0.0 Syntax: %s" % COMMANDS[verb].help)
            else:
                self.reply("504 5.5.1 no help for %s" % log.sanitise(arg[:40]))
            return
        # --help-text lines follow the command list in one multi-line reply.
        lines = ["commands: %s" % " ".join(verbs)] + list(self.services.help_text)
        self.reply("".join(("214-2.0.0 " + x).rstrip() + "\r\n" for x in lines[:-1])
                   + ("214 2.0.0 " + lines[-1]).rstrip())

    def smtp_MAIL(self, arg):
        starttls = self.available("STARTTLS")
        tls_missing = self.tls_missing()
        if (self.services.server_auth is not None and self.auth_user is None
                and self._trusted() is None):
            self.reply("530 5.7.0 authentication required"
                       + (": use starttls" if tls_missing and starttls else ""))
            return
        if tls_missing:
            self.reply("530 5.7.0 encryption required" + (": use starttls" if starttls else ""))
            return
        try:
            mail = smtp_params.mail(arg, self.features, self.size_limit)
        except smtp_params.Refused as e:
            self._refused(e)
            return
        if not self.intake.enough_space():
            self.reply(NO_STORAGE)
            return
        self.mail_from = mail.address
        self.body = mail.body
        self.dsn_ret = mail.ret
        self.dsn_envid = mail.envid
        self.smtputf8 = mail.smtputf8
        # MAIL FROM AUTH= is kept as given (xtext), and only for an
        # authenticated client (RFC 4954 5).
        self.mail_auth = mail.auth if self.auth_user is not None else ""
        self.reply("250 2.1.0 sender <%s> OK" % mail.address)

    def _refused(self, e):
        """Replies to a command `smtp_params` refused (a bad command, or not)."""
        if e.bad:
            self.bad(e.reply)
        else:
            self.reply(e.reply)

    def smtp_RCPT(self, arg):
        try:
            address, rest = smtp_params.rcpt_path(arg, self.features)
            if self._rcpt_refusal is not None:
                raise smtp_params.Refused(self._rcpt_refusal, bad=False)
            dsn, stored = smtp_params.rcpt_params(address, rest, self.features, self.smtputf8)
        except smtp_params.Refused as e:
            self._refused(e)
            return
        count = len(self.to_local) + len(self.to_remote)
        limit = self.settings.max_recipients
        if limit and count >= limit:
            self.reply("452 4.5.3 too many recipients")
            return
        limit = self.settings.max_bounce_recipients
        if self.mail_from == "" and limit and count >= limit:
            self.reply("452 4.5.3 too many recipients for a bounce message")
            return
        result = yield from self._verify(stored, self.mail_from)
        if result is None:
            self.to_remote.append(stored)
            self._keep_dsn(stored, dsn)
        elif result.status == "remote":
            # The verifier may rewrite the address (its second line, or
            # `1|address` from a net: verifier): that is what is forwarded.
            self.to_remote.append(result.address)
            self._keep_dsn(result.address, dsn)
        elif result.status == "local":
            self.to_local.append(result.address)
            self._keep_dsn(result.address, dsn)
        else:
            self._verify_refusal(result, address)
            return
        if not stored.isascii():
            self.smtputf8 = True
        local = result is not None and result.status == "local"
        # E-MailRelay marks a local recipient with a second space.
        self.reply("250 2.1.5 recipient <%s> %sOK" % (address, " " if local else ""))

    def _keep_dsn(self, address, dsn):
        if dsn[0] or dsn[1]:
            self.dsn_recipients[address] = dsn

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
        yield from self.send()
        return (yield requests.call(verifier.verify, address, from_, self.peer_ip,
                                    self.domain, mech, name))

    def _verify_refusal(self, result, address):
        reason = log.sanitise(result.reason or "")
        if result.status == "reject":
            self.reply("550 5.1.1 %s" % (reason or "invalid recipient <%s>" % address))
        elif result.status == "tempfail":
            self.reply("450 4.1.1 %s" % (reason or "recipient <%s> unavailable" % address))
        else:
            log.warning("smtp: address verifier aborted the connection from %s" % self.peer_ip,
                        peer=self.peer)
            raise session_core.Drop()

    def smtp_VRFY(self, arg):
        if "vrfy" in self.anonymous:
            self.reply("252 2.1.5 cannot vrfy")
            return
        try:
            address, _ = parse_path(arg, allow_empty=False)
        except ValueError:
            self.reply("550 5.1.3 invalid mailbox")
            return
        result = yield from self._verify(address, "")
        if result is not None and result.status == "local":
            name = log.sanitise(result.full_name or "")
            self.reply("250 2.1.5 %s" % (name or "<%s>" % result.address))
        elif result is None or result.status == "remote":
            self.reply("252 2.1.5 cannot verify but will accept: %s" % address)
        else:
            self._verify_refusal(result, address)

    def smtp_EXPN(self, arg):
        # ZMailer answers a disabled EXPN with its site text (PARAM help),
        # so the client learns whom to ask instead.
        lines = ["command not implemented"] + list(self.services.help_text)
        self.reply("".join(("502-5.5.1 " + x).rstrip() + "\r\n" for x in lines[:-1])
                   + ("502 5.5.1 " + lines[-1]).rstrip())

    def smtp_ETRN(self, arg):
        self.services.trigger()
        self.reply("250 2.0.0 OK, queue run started")

    def smtp_STARTTLS(self, arg):
        if arg:
            self.reply("501 5.5.4 invalid argument")
            return None
        self.reply("220 2.0.0 ready to start tls")
        return self.start_tls(self.services.tls_context)

    def smtp_AUTH(self, arg):
        if self.auth_user is not None:
            self.bad(OUT_OF_SEQUENCE)
            return
        if self.tls_missing():
            # Refused before anything after the mechanism name is looked at.
            self.reply("530 5.7.0 encryption required: use starttls")
            return
        mech, _, initial = arg.partition(" ")
        auth = self.services.server_auth
        try:
            exchange = auth.start(mech, initial.strip() or None, tls=self.conn.tls)
        except sasl.MechanismError:
            later = (self.available("STARTTLS") and mech.upper() in auth.mechanisms(True))
            self.reply("504 5.5.4 unsupported authentication mechanism"
                       + (": use starttls" if later else ""))
            return
        outcome = yield from self.sasl_exchange(exchange, "334 ", AUTH_LINE_LIMIT, self.TOO_LONG)
        if outcome is None:
            return
        if outcome[0] == "ok":
            self.auth_user = outcome[1]
            self.auth_mech = exchange.mechanism
            log.info("smtp: authenticated as %s using %s"
                     % (log.sanitise(self.auth_user), exchange.mechanism), peer=self.peer)
            self.reply("235 2.7.0 authentication successful")
            return
        if outcome[1] == sasl.CANCELLED:
            self.reply("501 5.7.0 authentication cancelled")
            return
        # Always with the address, whatever --log-address says: fail2ban needs it.
        log.warning('smtp authentication failed for user "%s" from %s'
                    % (log.sanitise(exchange.user or ""), self.peer_ip))
        yield from self.auth_failed("535 5.7.8 authentication failed",
                                    "421 4.7.0 %s too many authentication failures" % self.domain)

    def smtp_DATA(self, arg):
        if self.body == "binarymime":
            self.bad("503 5.5.1 invalid data command with binarymime -- use RSET to resynchronise")
            return
        write = self._start_message()
        self.reply("354 start mail input -- end with <CRLF>.<CRLF>")
        yield from self.send()
        yield from self._text(smtp_text.read_data(self.conn, write, self.text))
        if self.text.fault is None:
            yield from self._commit()
        else:
            self._refuse_content()

    def smtp_BDAT(self, arg):
        parts = arg.split()
        if not parts or len(parts) > 2 or not parts[0].isdigit() or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            self.bad("501 5.5.4 invalid argument")
            return
        size = int(parts[0])
        last = len(parts) == 2
        if self.state not in (RCPT, BDAT):
            # The chunk is read and dropped so it is not taken for commands.
            yield from self._text(smtp_text.read_chunk(size, None, smtp_text.Text(
                0, self._pace())))
            self.out_of_sequence("BDAT")
            return
        if self.state == RCPT:
            self._write = self._start_message()
            self.event("chunk")
        yield from self._text(smtp_text.read_chunk(size, self._write, self.text))
        if self.text.fault is not None:
            self._refuse_content()
        elif not last:
            self.reply("250 2.0.0 %d bytes received" % size)
        else:
            yield from self._commit()

    def _pace(self):
        """The --min-data-rate a message's text must keep up (None: only the idle timeout)."""
        rate = self.settings.min_data_rate
        idle = self.idle_timeout()
        return smtp_text.Pace(self.conn, idle, rate) if rate and idle else None

    def _text(self, reader):
        """Runs a text reader (a generator); a client too slow for --min-data-rate is dropped."""
        try:
            yield from reader
        except smtp_text.TooSlow:
            log.info("smtp: message text too slow (under --min-data-rate %s octets/s)"
                     % self.settings.min_data_rate, peer=self.peer)
            self.reply("421 4.4.2 %s data timeout: message text too slow" % self.domain)
            raise session_core.Drop() from None

    # ----- handing the message to the intake ---------------------------

    def _start_message(self):
        """Starts the message with the intake; returns the writer for its text.

        When the spool cannot take the message the text is still read (and
        dropped, `self.text.fault` says why), so that the reply comes at its
        end and the session goes on.
        """
        self.text = smtp_text.Text(self.size_limit, self._pace())
        try:
            return self.intake.start(self.conn, self.helo, self.esmtp, self.auth_user)
        except OSError as e:
            self.text.fault, self.text.error = "storage", e
            return None

    def _refuse_content(self):
        """Replies to text that could not be kept; the session goes on."""
        text = self.text
        if text.fault == "storage":
            log.error("smtp: cannot store message: %s" % text.error, peer=self.peer)
            self.reply(smtp_message.storage_reply(text.error))
        else:
            log.info("smtp: message refused: too big", peer=self.peer)
            self.reply(TOO_BIG)
        self._reset_transaction()

    def _commit(self):
        """Has the intake store the message, then replies (a generator).

        The replies owed go out first, since storing waits for the disk and
        perhaps for filter programs; the transaction ends either way.
        """
        if not self.intake.enough_space():
            log.warning("smtp: message refused: less than --min-free-space left in the spool",
                        peer=self.peer)
            self._reset_transaction()
            self.reply(NO_STORAGE)
            return
        yield from self.send()
        reply = yield from self.intake.commit(smtp_message.Transaction(
            self.mail_from, self.to_local, self.to_remote, self.body, self.text.eightbit,
            self.auth_user or "", self.mail_auth, self.smtputf8,
            self.conn.peer_certificate_pem or "",
            (self.dsn_ret, self.dsn_envid, self.dsn_recipients)))
        self._reset_transaction()
        self.reply(reply)


def _rcpt_reply(refusal):
    """A connection refusal (554/421 from --dnsbl) as a reply to RCPT (550/450)."""
    return ("550" if refusal[:1] == "5" else "450") + refusal[3:]


# The command table, E-MailRelay's states; HELP gives each row's syntax. A
# command whose reply is not an error moves the session to the row's next
# state (None: the handler decides, or the state stays). After a message
# is stored or refused the transaction is reset to GREETED; STARTTLS and
# its handshake go back to START (RFC 3207 4.2).
_S = SmtpSession
_ANY = None
COMMANDS = session_core.table(
    # verb, states, handler, next state, HELP syntax
    ("EHLO", _ANY, _S.smtp_EHLO, GREETED, "EHLO <domain>"),
    ("HELO", _ANY, _S.smtp_HELO, GREETED, "HELO <domain>"),
    ("STARTTLS", (START, GREETED), _S.smtp_STARTTLS, START, "STARTTLS"),
    ("AUTH", (GREETED,), _S.smtp_AUTH, None, "AUTH <mechanism> [<initial-response>]"),
    ("MAIL", (GREETED,), _S.smtp_MAIL, MAIL,
     "MAIL FROM:<address> [SIZE=<n>] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [AUTH=<xtext>]"),
    ("RCPT", (MAIL, RCPT), _S.smtp_RCPT, RCPT, "RCPT TO:<address>"),
    ("DATA", (RCPT,), _S.smtp_DATA, GREETED, "DATA"),
    # BDAT: BDAT until a LAST chunk, then GREETED; out of sequence, the
    # chunk is still read (the handler checks the state).
    ("BDAT", _ANY, _S.smtp_BDAT, None, "BDAT <size> [LAST]"),
    ("RSET", _ANY, _S.smtp_RSET, None, "RSET"),
    ("NOOP", _ANY, _S.smtp_NOOP, None, "NOOP"),
    ("VRFY", _ANY, _S.smtp_VRFY, None, "VRFY <address>"),
    ("EXPN", _ANY, _S.smtp_EXPN, None, "EXPN <list>"),
    ("ETRN", (GREETED,), _S.smtp_ETRN, None, "ETRN <domain>"),
    ("HELP", _ANY, _S.smtp_HELP, None, "HELP [<command>]"),
    ("QUIT", _ANY, _S.smtp_QUIT, DONE, "QUIT"),
)
SmtpSession.COMMANDS = COMMANDS
SmtpSession.TRANSITIONS = session_core.transitions(
    # event, states, next state
    ("tls", None, START),                           # RFC 3207: as if just connected
    ("reset", (GREETED, MAIL, RCPT, BDAT), GREETED),  # a transaction ends (RSET, stored, refused)
    ("chunk", (RCPT,), BDAT),                       # a first BDAT chunk that is not LAST
)
