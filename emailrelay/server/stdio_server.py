"""One SMTP session on the standard input and output: --inetd and --bsmtp.

`run(settings, services)` serves the session (`settings` a
`StdioSettings`, `services` an `smtp_server.SmtpServices`) and returns the
exit status.

--inetd (ZMailer -n): inetd, xinetd or a systemd socket unit with
Accept=yes gives the client's socket as descriptors 0 and 1. The client
address is that socket's peer; a pipe or a local (AF_UNIX) socket has
none, so the address is "unknown". Log lines never go to standard error,
which inetd points at the client too.

--bsmtp (ZMailer -i): a batch of SMTP commands is read from standard input
without waiting for the greeting (pipelined), the replies go to standard
output, and accepted messages are stored exactly as a network session
stores them. The exit status is 0 only when no command got a 4xx/5xx reply
and the batch did not end inside a transaction. The client address is
127.0.0.1: the batch comes from this machine.

With --server-tls-connection an --inetd session starts TLS before the
greeting (SMTPS on port 465, ZMailer's -t). Either way --test-address gives
the session another client address, and the open-relay guard
(--remote-clients) looks at the address the session has, as the accept loop
does for network sessions.
"""

import dataclasses
import os
import socket
from typing import Optional

from ..config import usage
from ..net import connection
from ..runtime import log
from ..util import addresses
from . import smtp_server, smtp_settings


@dataclasses.dataclass(frozen=True)
class StdioSettings:
    """How the one session is served, from the configuration once.

    `inetd` (True: --inetd, False: --bsmtp), `test_ip` (--test-address, or
    None), `remote_clients` (--remote-clients: the open-relay guard is
    off) and `tls_connection` (--server-tls-connection).
    """

    inetd: bool
    test_ip: Optional[str]
    remote_clients: bool
    tls_connection: bool

    @classmethod
    def from_config(cls, cfg):
        """The settings from `cfg` (the read-only Config, or anything with its attributes)."""
        return cls(inetd=bool(cfg.inetd), test_ip=cfg.test_ip or None,
                   remote_clients=bool(cfg.remote_clients),
                   tls_connection=bool(cfg.server_tls_connection))


def run(settings, services):
    """Runs the one session to its end; returns 0 or 1 (see the module docstring)."""
    test_ip = settings.test_ip
    if settings.inetd:
        log.close_stderr()
        conn = _inetd_connection(test_ip)
        kind = "inetd"
    else:
        conn = connection.FdConnection(0, 1, peer=(test_ip or "127.0.0.1", 0))
        kind = "bsmtp"
    ip = conn.peer[0]
    log.verbose("%s: session with client address %s" % (kind, ip))
    if addresses.refused_by_guard(ip, settings.remote_clients):
        log.warning("%s: connection refused from non-local address %s (%s)"
                    % (kind, ip, addresses.GUARD_HINT))
        try:
            conn.write(smtp_settings.reply_bytes(services.settings,
                                                 "554 5.7.1 no SMTP service for your address"))
            conn.close()
        except (connection.Closed, connection.Timeout):
            pass
        return usage.EXIT_FAILURE
    if settings.inetd and settings.tls_connection:
        # SMTPS from inetd (ZMailer -t): TLS before the greeting.
        if not isinstance(conn, connection.Connection):
            log.error("inetd: --server-tls-connection needs a socket on the standard input")
            return usage.EXIT_FAILURE
        try:
            conn.accept_tls(services.tls_context)
        except (OSError, ValueError) as e:
            log.warning("inetd: tls handshake failed with %s: %s" % (ip, e))
            conn.close()
            return usage.EXIT_FAILURE
    session = smtp_server.SmtpSession(conn, services)
    session.run()
    if settings.inetd:
        return usage.EXIT_OK
    stored = services.stats.snapshot().get("messages-stored", 0)
    if session.error_replies or session.mail_from is not None:
        log.error("bsmtp: not every transaction was accepted: %d message%s stored, "
                  "%d command%s refused%s"
                  % (stored, "" if stored == 1 else "s", session.error_replies,
                     "" if session.error_replies == 1 else "s",
                     ", input ended inside a transaction" if session.mail_from is not None
                     else ""))
        return usage.EXIT_FAILURE
    log.info("bsmtp: %d message%s stored" % (stored, "" if stored == 1 else "s"))
    return usage.EXIT_OK


def _inetd_connection(test_ip):
    """A connection over descriptors 0 and 1, with the client's address when there is one."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        sock = None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            peer = sock.getpeername()
            local = sock.getsockname()
        except OSError:
            peer = local = None
        if peer is not None:
            return connection.Connection(sock, peer=(test_ip, peer[1]) if test_ip else peer,
                                         local=local)
    if sock is not None and sock.family == socket.AF_UNIX:
        # socat EXEC:/SYSTEM: and ssh give a socketpair: a socket without an address.
        return connection.Connection(sock, peer=(test_ip or "unknown", 0), local=("unknown", 0))
    if sock is not None:
        sock.close()
    return connection.FdConnection(0, 1, peer=(test_ip or "unknown", 0))
