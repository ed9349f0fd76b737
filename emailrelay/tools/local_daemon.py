"""What the sendmail interface knows of the relay on this host, and how it reaches it.

A user who is not root cannot write the spool (mode 0770, owned by the
daemon's user), and a Python script cannot be set-group-id as
E-MailRelay's submit tool is. So, as Postfix's postdrop hands mail to
its daemon, emailrelay-sendmail hands it to the running emailrelay over
SMTP on the loopback address the daemon listens on: no privilege is
needed, and the daemon's own policy (filters, verifiers, trusted
addresses) applies as to any local client.

`Site.load(path)` reads the daemon's configuration file (emailrelay.conf,
`find_config()` says which) for the spool directory, the domain, and the
SMTP and admin addresses. `Site.begin(...)` starts one message over SMTP
(a `Transaction` the content streams through); `Site.relay_session(...)` connects standard input and
output to the daemon's SMTP port (sendmail -bs); `Site.admin(command)`
asks the admin port (mailq and -q for a user who cannot read the spool).
"""

import ipaddress
import os
import selectors
import smtplib
import socket

from ..config import options
from ..net import listen_sockets

# Where `make install` puts the configuration file: /etc for PREFIX=/usr,
# else $(PREFIX)/etc, by default /usr/local/etc. The first that exists.
CONFIG_FILES = ("/etc/emailrelay.conf", "/usr/local/etc/emailrelay.conf")
TIMEOUT = 60
ADMIN_PROMPT = b"E-MailRelay> "


class SiteError(Exception):
    """The configuration cannot be used, or the daemon cannot be reached."""


class Refused(Exception):
    """The daemon refused the message: `code` and `text` of its reply."""

    def __init__(self, code, text):
        super().__init__("%d %s" % (code, text))
        self.code = code


def find_config(explicit=None):
    """The configuration file to read: `explicit` (-C), $EMAILRELAY_CONF, or
    the first of CONFIG_FILES that exists; None when there is none."""
    if explicit:
        return explicit
    if os.environ.get("EMAILRELAY_CONF"):
        return os.environ["EMAILRELAY_CONF"]
    for path in CONFIG_FILES:
        if os.path.exists(path):
            return path
    return None


class Site:
    """The relay's settings that a local submitter needs (see the module docstring).

    `spool_dir`, `domain` (--domain, else the default the daemon computes
    the same way), `smtp` ((host, port) or None with --no-smtp) and
    `admin` ((host, port) or None).
    """

    def __init__(self, cfg):
        self.spool_dir = cfg.spool_dir
        self.domain = cfg.domain
        self.forward_to = cfg.forward_to
        wanted = listen_sockets.parse_interfaces(cfg.interface) if cfg.interface else {}
        self.smtp = None if cfg.no_smtp else (_loopback(wanted, "smtp"), cfg.port)
        self.admin = (_loopback(wanted, "admin"), cfg.admin) if cfg.admin else None

    @classmethod
    def load(cls, path):
        """The site of configuration file `path` (None: the defaults); raises SiteError."""
        try:
            return cls(options.parse([path] if path else []))
        except PermissionError:
            # A configuration only root may read: the defaults are the best guess.
            return cls(options.parse([]))
        except (OSError, options.UsageError, ValueError) as e:
            raise SiteError("%s: %s" % (path, e)) from None

    def _connect_smtp(self):
        if self.smtp is None:
            raise SiteError("the relay has no SMTP server (no-smtp in its configuration)")
        try:
            client = smtplib.SMTP(self.smtp[0], self.smtp[1], local_hostname=self.domain,
                                  timeout=TIMEOUT)
        except (OSError, smtplib.SMTPException) as e:
            raise SiteError("cannot reach the emailrelay daemon at %s: %s"
                            % (_where(self.smtp), getattr(e, "strerror", None) or e)) from None
        return client

    def begin(self, sender, recipients):
        """Starts a message to the daemon: MAIL, RCPT, DATA; returns its Transaction.

        Raises Refused for a reply that is not a success, SiteError when
        the daemon cannot be reached.
        """
        client = self._connect_smtp()
        try:
            client.ehlo_or_helo_if_needed()
            _expect(client.mail(sender), 250)
            for rcpt in recipients:
                _expect(client.rcpt(rcpt), 250, 251)
            client.putcmd("data")
            _expect(client.getreply(), 354)
        except (OSError, smtplib.SMTPException) as e:
            client.close()
            raise SiteError("lost the emailrelay daemon at %s: %s" % (_where(self.smtp), e)) from None
        except Refused:
            client.close()
            raise
        return Transaction(client, _where(self.smtp))

    def etrn(self):
        """Asks the daemon for a forwarding pass (ETRN); returns its reply text."""
        client = self._connect_smtp()
        try:
            client.ehlo_or_helo_if_needed()
            code, text = client.docmd("ETRN", self.domain)
            _expect((code, text), 250)
            client.quit()
            return "%d %s" % (code, text.decode("utf-8", "replace"))
        except (OSError, smtplib.SMTPException) as e:
            raise SiteError("lost the emailrelay daemon at %s: %s" % (_where(self.smtp), e)) from None
        finally:
            client.close()

    def relay_session(self, stdin_fd, stdout_fd):
        """Copies bytes between stdin/stdout and the daemon's SMTP port until either ends."""
        if self.smtp is None:
            raise SiteError("the relay has no SMTP server (no-smtp in its configuration)")
        try:
            sock = socket.create_connection(self.smtp, timeout=TIMEOUT)
        except OSError as e:
            raise SiteError("cannot reach the emailrelay daemon at %s: %s"
                            % (_where(self.smtp), e.strerror or e)) from None
        with sock, selectors.DefaultSelector() as sel:
            sock.settimeout(None)
            sel.register(sock, selectors.EVENT_READ)
            sel.register(stdin_fd, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is sock:
                        data = sock.recv(65536)
                        if not data:
                            return
                        _write_all(stdout_fd, data)
                    else:
                        data = os.read(stdin_fd, 65536)
                        if not data:
                            # The client is done: let the daemon finish its replies.
                            sel.unregister(stdin_fd)
                            sock.shutdown(socket.SHUT_WR)
                        else:
                            sock.sendall(data)

    def admin_command(self, command):
        """Runs one admin command; returns its answer text. Raises SiteError."""
        if self.admin is None:
            raise SiteError("the relay has no admin port (admin in its configuration)")
        try:
            with socket.create_connection(self.admin, timeout=TIMEOUT) as sock:
                sock.sendall(command.encode("ascii") + b"\r\n")
                answer = b""
                while not answer.endswith(ADMIN_PROMPT):
                    data = sock.recv(65536)
                    if not data:
                        break
                    answer += data
                sock.sendall(b"quit\r\n")
        except OSError as e:
            raise SiteError("cannot reach the emailrelay admin port at %s: %s"
                            % (_where(self.admin), e.strerror or e)) from None
        if answer.endswith(ADMIN_PROMPT):
            answer = answer[:-len(ADMIN_PROMPT)]
        return answer.decode("utf-8", "replace").replace("\r\n", "\n")


class Transaction:
    """A message being sent to the daemon (from `Site.begin()`).

    `write(data)` takes the content as lines ending CRLF (a line may come
    in pieces) and dot-stuffs it; `end()` ends the data and checks the
    daemon's reply (raising Refused or SiteError); `close()` drops the
    connection (after end(), or to abandon the message).
    """

    def __init__(self, client, where):
        self._client = client
        self._where = where
        self._line_start = True

    def write(self, data):
        if not data:
            return
        if self._line_start and data[:1] == b".":
            data = b"." + data
        self._send(data.replace(b"\n.", b"\n.."))
        self._line_start = data.endswith(b"\n")

    def end(self):
        self._send(b".\r\n" if self._line_start else b"\r\n.\r\n")
        try:
            _expect(self._client.getreply(), 250)
            self._client.quit()
        except (OSError, smtplib.SMTPException) as e:
            raise SiteError("lost the emailrelay daemon at %s: %s" % (self._where, e)) from None

    def close(self):
        self._client.close()

    def _send(self, data):
        try:
            self._client.send(data)
        except (OSError, smtplib.SMTPException) as e:
            raise SiteError("lost the emailrelay daemon at %s: %s" % (self._where, e)) from None


def _expect(reply, *good):
    code, text = reply
    if code not in good:
        raise Refused(code, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def _loopback(wanted, kind):
    """The address to reach the daemon's `kind` server on from this host.

    A loopback address it listens on if it has one, else the first other
    address; the wildcard (or no --interface: every address) means
    127.0.0.1.
    """
    found = [a for a in list(wanted.get(kind, [])) + list(wanted.get(None, []))
             if not a.startswith("fd#")]
    for address in found:
        ip = ipaddress.ip_address(address)
        if ip.is_loopback:
            return address
    for address in found:
        ip = ipaddress.ip_address(address)
        if ip.is_unspecified:
            return "::1" if ip.version == 6 else "127.0.0.1"
        return address
    return "127.0.0.1"


def _where(address):
    host, port = address
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]
