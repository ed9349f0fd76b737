"""The SMTP client that forwards spooled messages to the next hop.

`Client(cfg, client_auth, tls_context)` keeps one connection for a batch:
`connect()` opens it (through SOCKS 4a when --forward-to names a proxy,
implicit TLS with --client-tls-connection, STARTTLS with --client-tls, AUTH
with --client-auth); `send(claim)` sends one claimed message and returns a
`replies.Outcome`; `quit()` ends the session. Connection-level problems raise
`ConnectionFailure`: unreachable, refused, timeouts, a 421 are temporary
(the message stays queued for a retry); a next hop whose certificate fails
verification or that refuses ours, or AUTH refused or impossible, is
`permanent` (the message in hand fails). A refusal of the message itself
is an `Outcome` with `ok` False and the server's reply; so is a message
that cannot be sent as it is (an address that is not valid UTF-8 or holds
CR, LF, NUL or angle brackets, or content needing an extension the next
hop lacks).

The protocol is written here rather than on smtplib: MAIL, RCPT and DATA go
out together when the server offers PIPELINING, and the next message's
commands with the end of this one's content (smtplib does neither); the
connection may come from the SOCKS shim or skip a late greeting
(--prompt-timeout), which smtplib has no public way to accept; and the
dialogue is logged at --verbose in E-MailRelay 2.6's form (`tx>>: "EHLO name"`,
`rx<<: "250 ..."`, AUTH secrets and content not shown). The content is
streamed from the content file by `dotstuff` (CRLF line endings, dot
stuffing, NUL dropped); BINARYMIME goes by BDAT with its exact bytes.
The commands that open each mail transaction come from `mail_commands`;
what the replies to them mean for the message, from `replies`.
"""

import socket
import ssl

from ..auth import sasl
from ..net import connection, socks, tls
from ..runtime import descriptors, log
from ..store.spool import ContentError
from ..util import addresses, dotstuff
from . import mail_commands
from .replies import Outcome, judge, reply_text

BLOCK_SIZE = dotstuff.BLOCK_SIZE
# Bounds on a reply from the next hop (RFC 5321 4.5.3.1.5 says 512 octets
# a line; servers send longer ones, never this long).
REPLY_LINE_LIMIT = 4096
REPLY_LINES_LIMIT = 200
QUIT_TIMEOUT = 2
# Seconds to wait after a TLS 1.3 STARTTLS handshake for the server's
# session tickets or its refusal of our certificate (see _await_verdict).
TLS13_VERDICT_WAIT = 2
# TLS alerts by which a server refuses the client certificate (OpenSSL's
# reason names).
CERTIFICATE_ALERTS = frozenset([
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_UNKNOWN_CA"])


class ConnectionFailure(Exception):
    """The session with the next hop failed (see the module docstring).

    `permanent`: retrying cannot help until the configuration or the next
    hop changes, so the message in hand fails; otherwise it stays queued.
    """

    def __init__(self, text, permanent=False):
        super().__init__(text)
        self.permanent = permanent


def _certificate_refused(target, e):
    """The failure for a next hop that refused our client certificate (an
    ssl.SSLError with a CERTIFICATE_ALERTS reason): permanent, since
    retrying cannot help until the certificate changes."""
    return ConnectionFailure("tls error: %s rejected our client certificate: %s"
                             % (target, e.reason.lower().replace("_", " ")), permanent=True)


def dns_error(host, e):
    """E-MailRelay's text for a name that does not resolve."""
    return 'dns error: no such host: "%s" (%s)' % (host, getattr(e, "strerror", None) or e)


class Client:
    """An SMTP client session with the --forward-to server for a batch.

    `client_auth` is a `sasl.ClientAuth` or None; `tls_context` a client
    `ssl.SSLContext` (from `tls.client_context`) or None. `send()` connects
    first if needed, so a batch may start with it. Not thread-safe: one
    thread uses one Client. `has_extn()`, `esmtp_features` and `docmd()`
    are what `sasl.ClientAuth.authenticate()` uses; `has_extn()`, `cfg`,
    `features` (--client-smtp-config), `target` and `authenticated_as`
    what `mail_commands` reads.
    """

    def __init__(self, cfg, client_auth=None, tls_context=None):
        self.cfg = cfg
        self.client_auth = client_auth
        self.tls_context = tls_context
        self.host, self.port, self.socks_host, self.socks_port = cfg.forward_address
        self.target = addresses.format_address(self.host, self.port)
        self.domain = cfg.domain or socket.getfqdn()
        self.sock = None
        self._rfile = None
        self.esmtp_features = {}
        self.ehlo_name = None
        self.tls = False
        self.authenticated_as = None
        self._skip_greeting = False
        # Inside an AUTH exchange: what we send is not logged.
        self._in_auth = False
        self._last_code = 0
        # (claim, commands) sent ahead with the previous message's content.
        self._present = None
        # The socket being connected or in use, for abort() from another thread.
        self._live = None
        self._aborted = False
        self.features = cfg.client_features

    # -- the wire ------------------------------------------------------

    def has_extn(self, name):
        """True when the server's EHLO reply has the keyword `name`."""
        return name.lower() in self.esmtp_features

    def docmd(self, cmd, args=""):
        """Sends one command line and returns its reply as (code, bytes)."""
        line = "%s %s" % (cmd, args) if args else cmd
        if cmd.upper() == "AUTH":
            mechanism, _, initial = args.partition(" ")
            shown = "AUTH %s%s" % (mechanism, " [not logged]" if initial else "")
            self._in_auth = True
        elif self._in_auth:
            shown = None
        else:
            shown = line
        self._send_lines([line], [shown])
        code, msg = self.reply()
        if code != 334:
            self._in_auth = False
        return code, msg

    def _send_lines(self, lines, shown=None):
        """Writes command lines in one packet; logs them (or `shown`) at --verbose."""
        if log.verbose_enabled():
            for i, line in enumerate(lines):
                text = line if shown is None else shown[i]
                log.verbose("smtp client: tx>>: %s" % (
                    "[response not logged]" if text is None else '"%s"' % log.sanitise(text)))
        self.sock.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def reply(self):
        """Reads one (possibly multi-line) reply: (code, text lines joined by LF)."""
        lines = []
        verbose = log.verbose_enabled()
        while True:
            raw = self._rfile.readline(REPLY_LINE_LIMIT + 1)
            if not raw:
                raise ConnectionFailure("connection closed by %s" % self.target)
            if not raw.endswith(b"\n") and len(raw) > REPLY_LINE_LIMIT:
                raise ConnectionFailure("reply line from %s longer than %d octets"
                                        % (self.target, REPLY_LINE_LIMIT))
            line = raw.rstrip(b"\r\n")
            if verbose:
                log.verbose('smtp client: rx<<: "%s"' % log.sanitise(line))
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ConnectionFailure("invalid response from %s: %s"
                                        % (self.target, log.sanitise(line[:80])))
            lines.append(line)
            if line[3:4] != b"-":
                break
            if len(lines) >= REPLY_LINES_LIMIT:
                raise ConnectionFailure("reply from %s longer than %d lines"
                                        % (self.target, REPLY_LINES_LIMIT))
        code = int(lines[-1][:3])
        if code == 220 and self._skip_greeting:
            # The greeting came after --prompt-timeout and we went ahead:
            # this is it, the reply to our command follows.
            self._skip_greeting = False
            return self.reply()
        self._last_code = code
        return code, b"\n".join(line[4:] for line in lines)

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
            self._live = sock
            if self._aborted:
                sock.close()
                raise ConnectionFailure("stopping: no new connection to %s" % self.target)
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
        """The TLS session on `sock`; a certificate that fails verification is permanent."""
        try:
            sslsock = self.tls_context.wrap_socket(sock, server_hostname=self._server_name())
        except ssl.SSLCertVerificationError as e:
            raise ConnectionFailure("tls error: certificate verification failed for %s: %s"
                                    % (self.target, e.verify_message or e), permanent=True) from None
        except ssl.SSLError as e:
            if e.reason in CERTIFICATE_ALERTS:
                raise _certificate_refused(self.target, e) from None
            raise ConnectionFailure("tls error with %s: %s" % (self.target, e.reason or e)) from None
        if self.cfg.client_tls_verify_name:
            try:
                tls.check_name(sslsock, self.cfg.client_tls_verify_name)
            except ValueError as e:
                sslsock.close()
                raise ConnectionFailure("tls error: certificate verification failed for %s: %s"
                                        % (self.target, e), permanent=True) from None
        self.tls = True
        cipher = sslsock.cipher()
        log.verbose("smtp client: tls protocol established with %s protocol %s cipher %s"
                    % (self.target, sslsock.version(), cipher[0] if cipher else "none"))
        return sslsock

    def _attach(self, sock):
        if self._rfile is not None:
            self._rfile.close()
        self.sock = sock
        self._rfile = sock.makefile("rb")

    def connect(self):
        """Connects, reads the greeting, does EHLO, STARTTLS and AUTH.

        Raises ConnectionFailure with a one-line reason.
        """
        self.close()
        if self._aborted:
            raise ConnectionFailure("stopping: no new connection to %s" % self.target)
        try:
            self._connect()
        except ConnectionFailure:
            self.close()
            raise
        except socket.gaierror as e:
            self.close()
            raise ConnectionFailure(dns_error(self.socks_host or self.host, e)) from None
        except ssl.SSLError as e:
            self.close()
            if e.reason in CERTIFICATE_ALERTS:
                # With TLS 1.3 the alert arrives on the first read after
                # the handshake.
                raise _certificate_refused(self.target, e) from None
            raise ConnectionFailure("cannot connect to %s: %s" % (self.target, _describe(e))) from None
        except (OSError, ValueError) as e:
            self.close()
            raise ConnectionFailure("cannot connect to %s: %s" % (self.target, _describe(e))) from None

    def _connect(self):
        cfg = self.cfg
        timeout = cfg.connection_timeout if cfg.connection_timeout is not None else 40
        if self.socks_host:
            sock = self._tcp_connect(self.socks_host, self.socks_port, timeout)
            try:
                socks.handshake(sock, self.socks_host, self.socks_port, self.host, self.port)
            except BaseException:
                sock.close()
                raise
        else:
            sock = self._tcp_connect(self.host, self.port, timeout)
        self.ehlo_name = self._ehlo_name(sock)
        if cfg.client_tls_connection:
            if self.tls_context is None:
                sock.close()
                raise ConnectionFailure("--client-tls-connection without a TLS context")
            try:
                sock = self._wrap(sock)
            except BaseException:
                sock.close()
                raise
        self._attach(sock)
        response_timeout = cfg.response_timeout if cfg.response_timeout is not None else 60
        self._await_greeting(sock, response_timeout)
        sock.settimeout(response_timeout)
        if not self._skip_greeting:
            code, msg = self.reply()
            if code != 220:
                raise ConnectionFailure("%s refused the session: %s" % (self.target, reply_text(code, msg)))
        self._hello()
        if self.tls_context is not None and not self.tls and (cfg.client_tls or cfg.client_tls_required):
            if self.has_extn("starttls"):
                self._starttls()
            elif cfg.client_tls_required:
                raise ConnectionFailure("%s does not offer STARTTLS (--client-tls-required)" % self.target)
        if self.client_auth is not None:
            self._authenticate()
        log.verbose("smtp client: connected to %s%s%s" % (
            self.target, " (tls)" if self.tls else "",
            " as %s" % self.authenticated_as if self.authenticated_as else ""))

    def _ehlo_name(self, sock):
        """--domain as given; a default domain without a dot becomes our address literal.

        RFC 5321 4.1.4 asks for a fully qualified name or, failing one, an
        address literal (`[127.0.0.1]`); E-MailRelay 2.6 sends the bare
        address (`127.0.0.1`) there, which strict next hops refuse.
        """
        if "." in self.domain or self.cfg.given("domain"):
            return self.domain
        ip = sock.getsockname()[0]
        return "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip

    def _await_greeting(self, sock, response_timeout):
        """Waits --prompt-timeout for the greeting; without one, goes ahead."""
        wait = self.cfg.prompt_timeout
        if not wait or wait >= response_timeout:
            return
        if getattr(sock, "pending", None) and sock.pending():
            return
        if not descriptors.readable(sock, wait):
            log.warning("smtp client: no greeting from %s within %ss: going ahead without it"
                        % (self.target, wait))
            self._skip_greeting = True

    def _hello(self):
        code, msg = self.docmd("EHLO", self.ehlo_name)
        if code == 421:
            raise ConnectionFailure("%s: %s" % (self.target, reply_text(code, msg)))
        self.esmtp_features = {}
        if code == 250:
            for line in msg.split(b"\n")[1:]:
                word, _, params = line.decode("utf-8", "replace").strip().partition(" ")
                if word:
                    self.esmtp_features[word.lower()] = params.strip()
            return
        code, msg = self.docmd("HELO", self.ehlo_name)
        if code != 250:
            raise ConnectionFailure("%s refused HELO: %s" % (self.target, reply_text(code, msg)))

    def _starttls(self):
        code, msg = self.docmd("STARTTLS")
        if code != 220:
            raise ConnectionFailure("%s refused STARTTLS: %s" % (self.target, reply_text(code, msg)))
        self._attach(self._wrap(self.sock))
        self._await_verdict()
        self._hello()

    def _await_verdict(self):
        """After a TLS 1.3 handshake, waits briefly for the server's verdict on our certificate.

        A TLS 1.3 server checks the client's certificate after the client
        has finished the handshake, then sends session tickets or an alert.
        An EHLO sent before that alert arrives makes the server's close a
        reset, which discards the alert: the refusal would look like a
        broken connection (temporary) instead of a refused certificate
        (permanent). Reading the tickets or the alert first keeps the
        refusal visible. A server that sends neither costs the wait once
        per connection.
        """
        sock = self.sock
        if sock.version() != "TLSv1.3":
            return
        timeout = sock.gettimeout()
        if not descriptors.readable(sock, min(TLS13_VERDICT_WAIT, timeout or TLS13_VERDICT_WAIT)):
            return
        sock.setblocking(False)
        try:
            data = sock.recv(1)
        except ssl.SSLWantReadError:
            # Only session tickets so far: the certificate was accepted.
            return
        finally:
            sock.settimeout(timeout)
        if data:
            raise ConnectionFailure("%s sent data before EHLO after STARTTLS" % self.target)
        raise ConnectionFailure("connection closed by %s after STARTTLS" % self.target)

    def _authenticate(self):
        if not self.has_extn("auth"):
            raise ConnectionFailure("cannot do authentication: %s does not offer AUTH" % self.target,
                                    permanent=True)
        offered = self.esmtp_features["auth"].upper().split()
        if self.client_auth.choose(offered, self.tls) is None:
            raise ConnectionFailure("cannot do authentication: check for a compatible client secret "
                                    "(%s offers %s)" % (self.target, " ".join(offered) or "nothing"),
                                    permanent=True)
        try:
            mech = self.client_auth.authenticate(self, self.tls)
        except sasl.ClientAuthError as e:
            # A 4xx (454 temporary authentication failure) may pass.
            raise ConnectionFailure("authentication failed: %s" % e,
                                    permanent=not 400 <= self._last_code < 500) from None
        finally:
            self._in_auth = False
        self.authenticated_as = self.client_auth.user
        log.verbose("smtp client: authenticated with %s as %s using %s"
                    % (self.target, self.client_auth.user, mech))

    def abort(self):
        """Ends the session at once, from another thread (shutdown).

        The socket is shut down, which wakes the thread waiting on it
        (connecting, reading a reply, writing content) with an error, so
        send() raises ConnectionFailure; no new connection is made.
        """
        self._aborted = True
        for sock in (self.sock, self._live):
            if sock is not None:
                connection.shut_down_from_another_thread(sock)

    def close(self):
        """Drops the connection without QUIT."""
        if self._rfile is not None:
            try:
                self._rfile.close()
            except OSError:
                pass
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self._live = None
        self._rfile = None
        self.esmtp_features = {}
        self.tls = False
        self.authenticated_as = None
        self._skip_greeting = False
        self._in_auth = False
        self._present = None

    def quit(self):
        """Ends the session politely; never raises.

        If commands were sent ahead for a message that will not be sent
        now, the connection is dropped instead: the server may be waiting
        for its content, and dropping makes it discard the transaction.
        """
        if self._present is not None:
            self.close()
        if self.sock is not None:
            try:
                self.sock.settimeout(QUIT_TIMEOUT)
                self.docmd("QUIT")
            except (OSError, ConnectionFailure):
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
        Raises
        ConnectionFailure when the session breaks (the message is then
        still queued, the caller releases the claim), and what
        `claim.open_content()` raises before anything about the message is
        sent.
        """
        if self._present is not None and self._present[0] is not claim:
            # Commands went ahead for another message: start afresh.
            self.close()
        if self._present is None:
            claim.open_content()
        if self.sock is None:
            self.connect()
        try:
            return self._send(claim, following)
        except ConnectionFailure:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise ConnectionFailure("connection to %s failed: %s" % (self.target, _describe(e))) from None

    def _pipelining(self):
        """True when commands go pipelined: the server offers it and --client-smtp-config allows it."""
        return self.features["pipelining"] and self.has_extn("pipelining")

    def _presend_commands(self, following):
        """The commands to send ahead for `following`, or None when it cannot go ahead."""
        if following is None or not following.envelope.to_remote \
                or mail_commands.uses_bdat(self, following.envelope) or not self._pipelining():
            return None
        try:
            return mail_commands.commands(self, following)
        except (mail_commands.Unsendable, ContentError):
            # (The problem shows when that message's turn comes.)
            return None

    def _send(self, claim, following):
        env = claim.envelope
        bdat = mail_commands.uses_bdat(self, env)
        if self._present is not None and self._present[0] is claim:
            commands = self._present[1]
            self._present = None
            replies = [self.reply() for _ in commands]
        else:
            try:
                commands = mail_commands.commands(self, claim)
            except mail_commands.Unsendable as e:
                return Outcome(False, 0, str(e))
            if self._pipelining():
                self._send_lines(commands)
                replies = [self.reply() for _ in commands]
            else:
                replies = []
                for c in commands:
                    self._send_lines([c])
                    replies.append(self.reply())
                    if replies[-1][0] >= 400 and c.startswith("MAIL"):
                        break
        for code, msg in replies:
            if code == 421:
                raise ConnectionFailure("%s: %s" % (self.target, reply_text(code, msg)))
        outcome = judge(env, replies, bdat, self.cfg.forward_to_some)
        data_started = not bdat and len(replies) == len(commands) and replies[-1][0] == 354
        if outcome is not None:
            if data_started:
                # DATA was accepted but the message must not go: there is no
                # way to cancel it but to drop the connection.
                self.close()
            else:
                self._rset()
            return outcome
        rejected = [(r, reply_text(c, m)) for r, (c, m) in zip(env.to_remote, replies[1:])
                    if c >= 300]
        content = claim.open_content()
        content.seek(0)
        if bdat:
            code, msg = self._send_bdat(content)
        else:
            ahead = self._presend_commands(following)
            code, msg = self._send_data(content, ahead)
            if ahead:
                self._present = (following, ahead)
        if code == 421:
            raise ConnectionFailure("%s: %s" % (self.target, reply_text(code, msg)))
        if code != 250:
            return Outcome(False, code, reply_text(code, msg))
        return Outcome(True, code, reply_text(code, msg), rejected)

    def _rset(self):
        code, msg = self.docmd("RSET")
        if code != 250:
            raise ConnectionFailure("%s refused RSET: %s" % (self.target, reply_text(code, msg)))

    def _send_data(self, f, ahead=None):
        """Streams the content as DATA, then the `ahead` commands in the same write; returns the reply."""
        sock = self.sock
        pending = []
        pending_size = 0
        lines = 0
        verbose = log.verbose_enabled()
        for block in dotstuff.blocks(f):
            if verbose:
                lines += block.count(b"\n")
            pending.append(block)
            pending_size += len(block)
            if pending_size >= BLOCK_SIZE:
                sock.sendall(b"".join(pending))
                pending, pending_size = [], 0
        if verbose:
            log.verbose("smtp client: tx>>: [%d line(s) of content]" % (lines - 1))
            log.verbose('smtp client: tx>>: "."')
        if ahead:
            if verbose:
                for c in ahead:
                    log.verbose('smtp client: tx>>: "%s"' % log.sanitise(c))
            pending.append("".join(c + "\r\n" for c in ahead).encode("utf-8"))
        sock.sendall(b"".join(pending))
        return self.reply()

    def _send_bdat(self, f):
        """Sends the exact bytes in BDAT chunks, the last one marked LAST."""
        sock = self.sock
        block = f.read(BLOCK_SIZE)
        while True:
            following = f.read(BLOCK_SIZE) if block else b""
            last = not following
            command = "BDAT %d%s" % (len(block), " LAST" if last else "")
            if log.verbose_enabled():
                log.verbose('smtp client: tx>>: "%s" [%d byte(s)]' % (command, len(block)))
            sock.sendall(command.encode("ascii") + b"\r\n" + block)
            code, msg = self.reply()
            if last or code != 250:
                return code, msg
            block = following


def _describe(e):
    if isinstance(e, socket.timeout):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text
