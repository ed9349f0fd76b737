"""The SMTP client that forwards spooled messages to the next hop.

`Client(cfg, client_auth, tls_context)` keeps one connection for a batch:
`connect()` opens it (through SOCKS 4a when --forward-to names a proxy,
implicit TLS with --client-tls-connection, STARTTLS with --client-tls, AUTH
with --client-auth); `send(claim)` sends one claimed message and returns an
`Outcome`; `quit()` ends the session. Connection-level problems (unreachable,
refused, timeouts, TLS or AUTH failure, a 421) raise `ConnectionFailure`: the
caller keeps the message queued and stops the batch. A refusal of the
message itself is an `Outcome` with `ok` False and the server's reply.

Built on `smtplib.SMTP` for the greeting, EHLO/HELO, STARTTLS and AUTH. The
mail transaction is written directly: MAIL, RCPT and DATA go out together
when the server offers PIPELINING (smtplib does not pipeline), and the
content is streamed from the content file in blocks, dot-stuffed, with every
line ending sent as CRLF (no bare CR or LF reaches the next hop).
"""

import os
import re
import select
import smtplib
import socket

from . import addresses
from . import log
from . import options
from . import xtext

BLOCK_SIZE = 65536
_EOL = re.compile(b"\r\n|\r|\n")


class ConnectionFailure(Exception):
    """The session with the next hop failed; queued messages stay queued."""


class Outcome:
    """What happened to one message.

    `ok`: the next hop accepted it (for at least one recipient with
    --forward-to-some). `code`: the deciding reply code (0 when the failure
    is ours, such as a missing extension). `reason`: reply text or failure
    reason. `rejected`: [(recipient, reply text)] refused recipients.
    """

    def __init__(self, ok, code, reason, rejected=()):
        self.ok = ok
        self.code = code
        self.reason = reason
        self.rejected = list(rejected)

    def __repr__(self):
        return "Outcome(ok=%r, code=%r, reason=%r, rejected=%r)" % (
            self.ok, self.code, self.reason, self.rejected)


def _reply_text(code, msg):
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return ("%d %s" % (code, " ".join(text.split("\n")))).strip()


def data_blocks(f, block_size=BLOCK_SIZE):
    """Yields the DATA payload for the content in binary file `f`.

    Every line ending (CRLF, bare CR, bare LF) becomes CRLF, lines starting
    with a dot get another dot, and the `.` terminator line follows; a final
    line without an ending is completed. Memory use is one block.
    """
    at_line_start = True
    pending_cr = False
    while True:
        block = f.read(block_size)
        if not block:
            break
        if pending_cr:
            block = b"\r" + block
            pending_cr = False
        if block.endswith(b"\r"):
            # It may be the first half of a CRLF split across reads.
            block = block[:-1]
            pending_cr = True
            if not block:
                continue
        crlf = block.count(b"\r\n")
        if block.count(b"\r") == crlf and block.count(b"\n") == crlf:
            out = block  # the common case: only CRLF line endings already
        else:
            out = _EOL.sub(b"\r\n", block)
        if at_line_start and out.startswith(b"."):
            out = b"." + out
        out = out.replace(b"\r\n.", b"\r\n..")
        at_line_start = out.endswith(b"\r\n")
        yield out
    if pending_cr:
        yield b"\r\n"
        at_line_start = True
    yield b".\r\n" if at_line_start else b"\r\n.\r\n"


class _Smtp(smtplib.SMTP):
    """smtplib.SMTP on a socket we connected; can skip a late greeting."""

    skip_late_greeting = False
    ehlo_msg = "EHLO"

    def getreply(self):
        code, msg = super().getreply()
        if code == 220 and self.skip_late_greeting:
            # The greeting came after --prompt-timeout and we went ahead:
            # this is it, the reply to our command follows.
            self.skip_late_greeting = False
            code, msg = super().getreply()
        return code, msg


class Client:
    """An SMTP client session with the --forward-to server for a batch.

    `client_auth` is a `sasl.ClientAuth` or None; `tls_context` a client
    `ssl.SSLContext` (from `tls.client_context`) or None. `send()` connects
    first if needed, so a batch may start with it. Not thread-safe: one
    thread uses one Client.
    """

    def __init__(self, cfg, client_auth=None, tls_context=None):
        self.cfg = cfg
        self.client_auth = client_auth
        self.tls_context = tls_context
        self.host, self.port, self.socks_host, self.socks_port = \
            addresses.parse_forward_to(cfg.forward_to)
        self.target = addresses.format_address(self.host, self.port)
        self.domain = cfg.domain or socket.getfqdn()
        self.smtp = None
        self.tls = False
        self.authenticated_as = None
        # (claim, commands) sent ahead with the previous message's content.
        self._present = None
        self.features = options.smtp_config(getattr(cfg, "client_smtp_config", None),
                                            options.CLIENT_SMTP_KEYWORDS)

    # -- connection ----------------------------------------------------

    def _family_and_source(self):
        """The address family and local bind address from --client-interface."""
        iface = self.cfg.client_interface
        if not iface:
            return socket.AF_UNSPEC, None
        family = socket.AF_INET6 if ":" in iface else socket.AF_INET
        if iface in ("0.0.0.0", "::"):
            # The wildcards only choose the family, as the reference says.
            return family, None
        return family, (iface, 0)

    def _tcp_connect(self, host, port, timeout):
        family, source = self._family_and_source()
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        if not infos:
            raise OSError("no address for %s" % host)
        error = None
        for af, st, proto, _, sa in infos:
            sock = socket.socket(af, st, proto)
            try:
                sock.settimeout(timeout)
                if source is not None:
                    sock.bind(source)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(sa)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error

    def _server_name(self):
        if self.cfg.client_tls_server_name:
            return self.cfg.client_tls_server_name
        try:
            addresses._ip(self.host)
            return None
        except ValueError:
            return self.host

    def _wrap(self, sock):
        sslsock = self.tls_context.wrap_socket(sock, server_hostname=self._server_name())
        if self.cfg.client_tls_verify_name:
            from . import tls
            tls.check_name(sslsock, self.cfg.client_tls_verify_name)
        self.tls = True
        return sslsock

    def connect(self):
        """Connects, reads the greeting, does EHLO, STARTTLS and AUTH.

        Raises ConnectionFailure with a one-line reason.
        """
        self.close()
        try:
            self._connect()
        except ConnectionFailure:
            self.close()
            raise
        except (OSError, smtplib.SMTPException, ValueError) as e:
            self.close()
            raise ConnectionFailure("cannot connect to %s: %s" % (self.target, _describe(e))) from None

    def _connect(self):
        cfg = self.cfg
        timeout = cfg.connection_timeout if cfg.connection_timeout is not None else 40
        if self.socks_host:
            from . import socks
            family, source = self._family_and_source()
            sock = socks.connect(self.socks_host, self.socks_port, self.host, self.port,
                                 timeout, source=source)
        else:
            sock = self._tcp_connect(self.host, self.port, timeout)
        if cfg.client_tls_connection:
            if self.tls_context is None:
                raise ConnectionFailure("--client-tls-connection without a TLS context")
            sock = self._wrap(sock)
        smtp = _Smtp(local_hostname=self.domain)
        smtp.sock = sock
        smtp._host = self.host
        self.smtp = smtp
        response_timeout = cfg.response_timeout if cfg.response_timeout is not None else 60
        self._await_greeting(sock, response_timeout)
        sock.settimeout(response_timeout)
        if not smtp.skip_late_greeting:
            code, msg = smtp.getreply()
            if code != 220:
                raise ConnectionFailure("%s refused the session: %s" % (self.target, _reply_text(code, msg)))
        self._hello()
        if self.tls_context is not None and not self.tls and (cfg.client_tls or cfg.client_tls_required):
            if smtp.has_extn("starttls"):
                self._starttls()
            elif cfg.client_tls_required:
                raise ConnectionFailure("%s does not offer STARTTLS (--client-tls-required)" % self.target)
        if self.client_auth is not None:
            self._authenticate()
        log.verbose("smtp client: connected to %s%s%s" % (
            self.target, " (tls)" if self.tls else "",
            " as %s" % self.authenticated_as if self.authenticated_as else ""))

    def _await_greeting(self, sock, response_timeout):
        """Waits --prompt-timeout for the greeting; without one, goes ahead."""
        wait = self.cfg.prompt_timeout
        if not wait or wait >= response_timeout:
            return
        if getattr(sock, "pending", None) and sock.pending():
            return
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            log.warning("smtp client: no greeting from %s within %ss: going ahead without it"
                        % (self.target, wait))
            self.smtp.skip_late_greeting = True

    def _hello(self):
        smtp = self.smtp
        code, msg = smtp.ehlo(self.domain)
        if code == 421:
            raise ConnectionFailure("%s: %s" % (self.target, _reply_text(code, msg)))
        if code != 250:
            code, msg = smtp.helo(self.domain)
            if code != 250:
                raise ConnectionFailure("%s refused HELO: %s" % (self.target, _reply_text(code, msg)))

    def _starttls(self):
        smtp = self.smtp
        code, msg = smtp.docmd("STARTTLS")
        if code != 220:
            raise ConnectionFailure("%s refused STARTTLS: %s" % (self.target, _reply_text(code, msg)))
        smtp.sock = self._wrap(smtp.sock)
        smtp.file = None
        smtp.helo_resp = smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        smtp.does_esmtp = False
        self._hello()

    def _authenticate(self):
        from . import sasl
        try:
            mech = self.client_auth.authenticate(self.smtp, self.tls)
        except sasl.ClientAuthError as e:
            raise ConnectionFailure("%s: %s" % (self.target, e)) from None
        self.authenticated_as = self.client_auth.user
        log.verbose("smtp client: authenticated with %s as %s using %s"
                    % (self.target, self.client_auth.user, mech))

    def close(self):
        """Drops the connection without QUIT."""
        if self.smtp is not None:
            try:
                self.smtp.close()
            except OSError:
                pass
        self.smtp = None
        self.tls = False
        self.authenticated_as = None
        self._present = None

    def quit(self):
        """Ends the session politely; never raises.

        If commands were sent ahead for a message that will not be sent
        now, the connection is dropped instead: the server may be waiting
        for its content, and dropping makes it discard the transaction.
        """
        if self._present is not None:
            self.close()
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
        self.close()

    # -- one message ---------------------------------------------------

    def send(self, claim, following=None):
        """Sends the claimed message; returns an Outcome.

        `following` (optional) is the claim the caller will send next: when
        the server pipelines, its MAIL, RCPT and DATA commands go out with
        the end of this message's content, saving a round trip per message.
        The caller must then pass that claim to the next send() call (or end
        with quit(), which drops the connection so the server discards it).
        Raises ConnectionFailure when the session breaks (the message is
        then still queued, the caller releases the claim).
        """
        if self._present is not None and self._present[0] is not claim:
            # Commands went ahead for another message: start afresh.
            self.close()
        if self.smtp is None:
            self.connect()
        try:
            return self._send(claim, following)
        except ConnectionFailure:
            self.close()
            raise
        except (OSError, smtplib.SMTPException) as e:
            self.close()
            raise ConnectionFailure("connection to %s failed: %s" % (self.target, _describe(e))) from None

    def _mail_params(self, env, size):
        """The MAIL FROM parameters, or raises _NeedsExtension."""
        smtp = self.smtp
        params = []
        if smtp.has_extn("size"):
            params.append("SIZE=%d" % size)
        # Without the extension the message fails only in a --client-smtp-config
        # "strict" mode; otherwise it is sent as it is, as E-MailRelay does.
        strict = self.features
        if env.content == "8bit":
            if smtp.has_extn("8bitmime"):
                params.append("BODY=8BITMIME")
            elif strict["eightbitstrict"]:
                raise _NeedsExtension("the message has 8-bit content and %s does not offer "
                                      "8BITMIME" % self.target)
        elif env.content == "binarymime":
            if self._bdat(env):
                params.append("BODY=BINARYMIME")
            elif strict["binarymimestrict"]:
                raise _NeedsExtension("the message is binary and %s does not offer BINARYMIME "
                                      "with CHUNKING" % self.target)
        if env.utf8_mailbox_names:
            if smtp.has_extn("smtputf8"):
                params.append("SMTPUTF8")
            elif strict["smtputf8strict"]:
                raise _NeedsExtension("the message has UTF-8 mailbox names and %s does not offer "
                                      "SMTPUTF8" % self.target)
        auth = self._auth_param(env)
        if auth is not None:
            params.append("AUTH=" + auth)
        return params

    def _auth_param(self, env):
        """The MAIL FROM AUTH= value per the MailFromAuthOut rules, or None.

        Only when the next hop offers AUTH and not with --anonymous(=client).
        Empty MailFromAuthOut: our session's name if we authenticated, else
        `<>`; `+`: `<>` (no name); anything else is sent as it is (xtext).
        """
        if "client" in options.anonymous_scopes(self.cfg.anonymous) or not self.smtp.has_extn("auth"):
            return None
        value = (env.mail_from_auth_out or "").strip()
        if not value:
            return xtext.encode(self.authenticated_as) if self.authenticated_as else "<>"
        if value == "+":
            return "<>"
        return value

    def _commands(self, claim):
        """MAIL, RCPT... (and DATA unless BDAT) for a message; raises _NeedsExtension."""
        env = claim.envelope
        params = self._mail_params(env, os.path.getsize(claim.content_path))
        commands = ["MAIL FROM:<%s>%s" % (env.from_, "".join(" " + p for p in params))]
        commands += ["RCPT TO:<%s>" % r for r in env.to_remote]
        if not self._bdat(env):
            commands.append("DATA")
        return commands

    def _bdat(self, env):
        """True when the message goes with BDAT: binary content, and the server can take it."""
        return (env.content == "binarymime" and self.smtp.has_extn("binarymime")
                and self.smtp.has_extn("chunking"))

    def _pipelining(self):
        return self.features["pipelining"] and self.smtp.has_extn("pipelining")

    def _presend_commands(self, following):
        """The commands to send ahead for `following`, or None when it cannot go ahead."""
        if following is None or not following.envelope.to_remote \
                or self._bdat(following.envelope) or not self._pipelining():
            return None
        try:
            return self._commands(following)
        except _NeedsExtension:
            return None

    def _send(self, claim, following):
        smtp = self.smtp
        env = claim.envelope
        bdat = self._bdat(env)
        if self._present is not None and self._present[0] is claim:
            commands = self._present[1]
            self._present = None
            replies = [smtp.getreply() for _ in commands]
        else:
            try:
                commands = self._commands(claim)
            except _NeedsExtension as e:
                return Outcome(False, 0, str(e))
            if self._pipelining():
                smtp.send("".join(c + "\r\n" for c in commands).encode("utf-8"))
                replies = [smtp.getreply() for _ in commands]
            else:
                replies = []
                for c in commands:
                    smtp.send((c + "\r\n").encode("utf-8"))
                    replies.append(smtp.getreply())
                    if replies[-1][0] >= 400 and c.startswith("MAIL"):
                        break
        for code, msg in replies:
            if code == 421:
                raise ConnectionFailure("%s: %s" % (self.target, _reply_text(code, msg)))
        outcome = self._judge(env, replies, bdat)
        data_started = not bdat and len(replies) == len(commands) and replies[-1][0] == 354
        if outcome is not None:
            if data_started:
                # DATA was accepted but the message must not go: there is no
                # way to cancel it but to drop the connection.
                self.close()
            else:
                self._rset()
            return outcome
        rejected = [(r, _reply_text(c, m)) for r, (c, m) in zip(env.to_remote, replies[1:])
                    if c >= 300]
        if bdat:
            code, msg = self._send_bdat(claim.content_path)
        else:
            ahead = self._presend_commands(following)
            tail = "".join(c + "\r\n" for c in ahead).encode("utf-8") if ahead else b""
            code, msg = self._send_data(claim.content_path, tail)
            if ahead:
                self._present = (following, ahead)
        if code == 421:
            raise ConnectionFailure("%s: %s" % (self.target, _reply_text(code, msg)))
        if code != 250:
            return Outcome(False, code, _reply_text(code, msg))
        return Outcome(True, code, _reply_text(code, msg), rejected)

    def _judge(self, env, replies, bdat):
        """An Outcome when MAIL/RCPT/DATA replies mean the message fails, else None."""
        code, msg = replies[0]
        if code >= 300:
            return Outcome(False, code, _reply_text(code, msg))
        rcpt_replies = replies[1:1 + len(env.to_remote)]
        refused = [(r, c, m) for r, (c, m) in zip(env.to_remote, rcpt_replies) if c >= 300]
        if len(refused) == len(env.to_remote):
            r, c, m = refused[0]
            return Outcome(False, c, "recipient <%s> rejected: %s" % (r, _reply_text(c, m)),
                           [(r, _reply_text(c, m)) for r, c, m in refused])
        if refused and not self.cfg.forward_to_some:
            r, c, m = refused[0]
            return Outcome(False, c, "recipient <%s> rejected: %s" % (r, _reply_text(c, m)),
                           [(r, _reply_text(c, m)) for r, c, m in refused])
        if not bdat:
            code, msg = replies[-1]
            if code != 354:
                return Outcome(False, code, _reply_text(code, msg))
        return None

    def _rset(self):
        code, msg = self.smtp.docmd("RSET")
        if code != 250:
            raise ConnectionFailure("%s refused RSET: %s" % (self.target, _reply_text(code, msg)))

    def _send_data(self, path, tail=b""):
        """Streams the content as DATA, then `tail` in the same write; returns the reply."""
        sock = self.smtp.sock
        pending = []
        pending_size = 0
        with open(path, "rb") as f:
            for block in data_blocks(f):
                pending.append(block)
                pending_size += len(block)
                if pending_size >= BLOCK_SIZE:
                    sock.sendall(b"".join(pending))
                    pending, pending_size = [], 0
        pending.append(tail)
        sock.sendall(b"".join(pending))
        return self.smtp.getreply()

    def _send_bdat(self, path):
        """Sends the exact bytes in BDAT chunks, the last one marked LAST."""
        sock = self.smtp.sock
        with open(path, "rb") as f:
            block = f.read(BLOCK_SIZE)
            while True:
                following = f.read(BLOCK_SIZE) if block else b""
                last = not following
                sock.sendall(b"BDAT %d%s\r\n" % (len(block), b" LAST" if last else b"") + block)
                code, msg = self.smtp.getreply()
                if last or code != 250:
                    return code, msg
                block = following


class _NeedsExtension(Exception):
    pass


def _describe(e):
    if isinstance(e, socket.timeout):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text
