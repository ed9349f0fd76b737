"""Message intake for the SMTP server: from the text's first octet to the reply.

E-MailRelay keeps this apart from the protocol as `ProtocolMessage`; here
it is `MessageIntake`. The session (`smtp_server.SmtpSession`) speaks
SMTP and gathers the transaction from MAIL and RCPT; the intake creates
the spool files and writes the Received trace line (`start`), then, given
the transaction (`Transaction`), builds the envelope, stores the message
durably, runs the --filter programs and --immediate forwarding, logs and
counts it, and returns the reply (`commit`). Whatever `commit` returns, no
message is in progress afterwards: it is in the spool, owned by a filter
(exit 100), or gone.
"""

import errno
import os
from typing import NamedTuple

from ..net import requests
from ..runtime import log
from ..store import envelope, spool
from ..util.smtp_syntax import rfc5322_date

NO_STORAGE = "452 4.3.1 insufficient system storage"


class Transaction(NamedTuple):
    """What one SMTP transaction gathered, as the session hands it over to be stored.

    `mail_from`, `to_local` and `to_remote` (the recipients as the
    verifier left them); `body` is MAIL's BODY= ("7bit", "8bit" or
    "binarymime") and `eightbit` whether the text had 8-bit octets;
    `authentication` the AUTH user ('': none) and `mail_from_auth` MAIL's
    AUTH= (xtext); `smtputf8` for the envelope's Utf8MailboxNames;
    `client_certificate` the client's verified TLS certificate (PEM, or
    ''); `dsn` is (RET, ENVID, {recipient: (NOTIFY, ORCPT)}) from RFC
    3461's parameters.
    """

    mail_from: str
    to_local: list
    to_remote: list
    body: str
    eightbit: bool
    authentication: str
    mail_from_auth: str
    smtputf8: bool
    client_certificate: str
    dsn: tuple


class MessageIntake:
    """Takes one SMTP session's messages into the spool, one at a time.

    One per session rather than one per message: the --immediate handle is
    one next-hop connection kept for the whole session (as E-MailRelay
    keeps its ProtocolMessage for the session), and the spool, filters and
    counters do not change between messages. `message` is the message in
    progress (a `spool_message.NewMessage`), or None. `services` is the
    session's `smtp_server.SmtpServices`; `peer` and `peer_ip` are the
    client as log lines and envelopes name it. `close()` when the session
    ends, however it ends.
    """

    def __init__(self, services, peer, peer_ip):
        self.services = services
        self.settings = services.settings
        self.peer = peer
        self.peer_ip = peer_ip
        self.message = None
        # --immediate: this session's handle on the forwarding thread.
        self._immediate = None
        # A --filter exited 103: rescan once the message is committed.
        self._rescan = False

    def enough_space(self):
        """False while the spool has less than --min-free-space left."""
        need = self.settings.min_free_space
        if not need:
            return True
        free = self.services.spool.free_kbytes()
        return free is None or free >= need

    def start(self, conn, helo, esmtp, auth_user):
        """Creates the spool files and writes the Received line; returns the text's writer.

        `conn` is the session's connection as it is now (TLS or not),
        `helo` the EHLO/HELO name, `esmtp` True after EHLO and `auth_user`
        the authenticated user or None. Raises OSError when the spool
        cannot take the message (nothing is left of it then).
        """
        try:
            self.message = self.services.spool.new_message()
            if "content" not in self.settings.anonymous:
                self.message.write(self._received(self.message.id, conn, helo, esmtp, auth_user))
        except OSError:
            self.discard()
            raise
        return self.message.write

    def discard(self):
        """Abandons the message in progress, if any (its files go)."""
        msg = self.message
        if msg is not None:
            self.message = None
            try:
                msg.abandon()
            except OSError as e:
                log.error("smtp: cannot remove message files: %s" % e, peer=self.peer)

    def close(self):
        """Abandons the message in progress and lets go of the --immediate handle."""
        self.discard()
        if self._immediate is not None:
            self._immediate.close()

    def _received(self, msg_id, conn, helo, esmtp, auth_user):
        """The RFC 5321 4.4 trace header for the message being received."""
        helo = "".join(c for c in (helo or "") if 32 < ord(c) < 127 and c not in "()")
        ip = self.peer_ip
        literal = "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip
        if ip == "unknown":
            literal = "unknown"     # --inetd on a pipe: there is no address
        tls = conn.tls_cipher if conn.tls else None
        # The protocol and cipher as Postfix writes them.
        tls_note = " (using %s with cipher %s (%d/%d bits))" % (tls[1], tls[0], tls[2], tls[2]) \
            if tls else ""
        protocol = "SMTP"
        if esmtp:
            protocol = "ESMTP" + ("S" if conn.tls else "") + ("A" if auth_user is not None else "")
        line = "Received: from %s (%s)%s by %s with %s id %s; %s\r\n" % (
            helo or "unknown", literal, tls_note, self.settings.domain, protocol, msg_id,
            rfc5322_date())
        return line.encode("utf-8")

    def _envelope(self, tx):
        # 8-bit text sent without BODY=8BITMIME is recorded as 8bit, so
        # that the forwarder asks the next hop for 8BITMIME.
        body = "8bit" if tx.body == "7bit" and tx.eightbit else tx.body
        env = envelope.Envelope(
            content=body, from_=tx.mail_from, to_local=tx.to_local,
            to_remote=tx.to_remote, authentication=tx.authentication,
            client=self.peer_ip, client_certificate=tx.client_certificate,
            mail_from_auth_in=tx.mail_from_auth, utf8_mailbox_names=tx.smtputf8)
        ret, envid, recipients = tx.dsn
        if ret or envid or recipients:
            env.set_dsn(envelope.Dsn(ret, envid, recipients))
        return env

    def _write_envelope(self, tx, synced):
        """Writes the `.envelope.new` file of transaction `tx`; returns the envelope.

        `synced`: the content and the envelope are synced now, for the
        filters to read; otherwise `finish` syncs them.
        """
        msg = self.message
        env = self._envelope(tx)
        if synced:
            msg.commit_content()
            msg.write_envelope(env)
        else:
            msg.prepare(env)
        log.verbose("new envelope file [%s]" % os.path.basename(msg.new_envelope_path),
                    peer=self.peer)
        return env

    def commit(self, tx):
        """Makes the message of transaction `tx` durable; returns the reply (a generator).

        The caller has checked the free space and sent the replies owed.
        Storing is a request of its own, since it waits for the disk and
        for filter programs.
        """
        if self.services.filters or self.settings.immediate:
            # Filter programs and --immediate wait on others.
            return (yield requests.call(self._store, tx))
        # With no filter the files are written here; only their syncs and
        # renames are a call (`finish`, marked device-bound), which the
        # session loop's own thread makes too while the syncs wait little
        # (see session_loop).
        msg = self.message
        try:
            env = self._write_envelope(tx, synced=False)
            msg_id = yield requests.call(msg.finish, env)
        except (OSError, envelope.EnvelopeError) as e:
            return self._not_stored(e)
        return self._stored(msg_id, tx)

    def _store(self, tx):
        """The blocking part of `commit` with filters or --immediate: returns the reply."""
        msg = self.message
        try:
            self._rescan = False
            env = self._write_envelope(tx, synced=True)
            refusal = self._run_filters(msg)
            if refusal == "cancelled":
                # Exit 100: the filter owns the files now. If it kept the
                # content (emailrelay-filter-copy), the message is stored.
                if msg.disown():
                    self._note_stored(msg.id, msg.size, tx)
                self.message = None
                return "250 2.0.0 message processed"
            if refusal is not None:
                self._count("messages-rejected")
                return refusal
            msg_id = msg.finish(env)
        except spool.SpoolError as e:
            # A filter removed the files without exiting 100.
            log.info("rejected by filter: [%s]" % e, peer=self.peer)
            self.discard()
            return "452 4.3.0 rejected"
        except (OSError, envelope.EnvelopeError) as e:
            return self._not_stored(e)
        return self._stored(msg_id, tx)

    def _not_stored(self, e):
        """The reply, once the spool failed to take the message."""
        log.error("smtp: cannot store message: %s" % e, peer=self.peer)
        self.discard()
        return storage_reply(e)

    def _stored(self, msg_id, tx):
        """The reply, once message `msg_id` is committed (--immediate forwards it first)."""
        size, self.message = self.message.size, None
        self._note_stored(msg_id, size, tx)
        if self._rescan and self.services.rescan is not None:
            # Exit 103: now that the message is committed, the pass sees it.
            self.services.rescan()
        refusal = self._forward_now(msg_id)
        return refusal or "250 2.0.0 message processed"

    def _note_stored(self, msg_id, size, tx):
        """Logs and counts a message now in the spool.

        One line per message with what log tools want, in Postfix's shape
        (the client whatever --log-address says: it is in the envelope too).
        """
        log.info("smtp: stored %s: from=<%s> nrcpt=%d size=%d client=%s" % (
            msg_id, log.sanitise(tx.mail_from), len(tx.to_local) + len(tx.to_remote),
            size, log.sanitise(self.peer)), peer=self.peer)
        self._count("messages-stored")

    def _run_filters(self, msg):
        """Runs --filter programs in order; returns None, 'cancelled' or a refusal reply.

        As E-MailRelay: a rejection (exit 1-99) is `452 <reason>`; a filter
        that times out, crashes or cannot run is `452 error`, a filter
        daemon that cannot answer `452 failed`.
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
                    log.warning("filter [%s]: [%s]: failed response=[%s] reason=[%s]"
                                % (log.sanitise(f.spec), msg.id, result.response, why),
                                peer=self.peer)
                    return "452 4.3.0 %s" % result.response
                log.info("rejected by filter: [%s]" % reason, peer=self.peer)
                return "452 4.7.1 %s" % (reason or "rejected")
            if result.special == "stop":
                break
        return None

    def _forward_now(self, msg_id):
        """--immediate: forwards the message now; a refusal reply or None."""
        immediate = self.services.immediate
        if immediate is None:
            return None
        if self._immediate is None:
            self._immediate = immediate()
        refusal = self._immediate.forward(msg_id)
        if refusal is None:
            return None
        # The message is .bad: the next hop's own refusal goes back to the
        # submitter.
        text = log.sanitise(refusal)
        return text if text[:3].isdigit() and text[0] in "45" else "554 5.0.0 %s" % text

    def _count(self, name):
        stats = self.services.stats
        if stats is not None:
            stats.increment(name)


def storage_reply(e):
    """The reply when the spool cannot take a message (`e` an OSError or similar)."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return NO_STORAGE
    return "452 4.3.0 cannot store the message"
