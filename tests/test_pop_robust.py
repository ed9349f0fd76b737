"""POP under hostile content and clients: line endings, NUL, symlinks, password guessing."""

import os
import poplib
import re
import smtplib
import socket
import time

import pytest

from helpers import Relay
from test_client import put_message


def auth_file(tmp_path):
    path = tmp_path / "pop.auth"
    path.write_text("server plain alice secret\nserver plain bob s3cret\n")
    path.chmod(0o600)
    return str(path)


class RawPop:
    """A byte-exact POP client (poplib hides line endings)."""

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.socket()
        self.sock.settimeout(10)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        assert self.line().startswith(b"+OK")

    def line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def cmd(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def multi(self, text):
        """The whole multi-line answer to `text`, status line to final dot, as sent."""
        self.sock.sendall(text.encode() + b"\r\n")
        while b"\r\n.\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        out, _, self.buf = self.buf.partition(b"\r\n.\r\n")
        return out + b"\r\n.\r\n"

    def close(self):
        self.sock.close()


HOSTILE = (b"Subject: hostile\r\n\r\nline1\r.\rline2\nx\x00y\r\n\x00.\r\n"
           b"a\rb\r\n.starts with a dot\r\nend")
EXPECTED_BODY = (b"Subject: hostile\r\n\r\nline1\r\n..\r\nline2\r\nxy\r\n..\r\n"
                 b"a\r\nb\r\n..starts with a dot\r\nend\r\n")


def test_retr_and_top_normalise_bare_cr_and_drop_nul(tmp_path):
    relay = Relay(tmp_path, ["--pop-auth", auth_file(tmp_path)], pop=True, start=False)
    put_message(relay.spool, HOSTILE)
    relay.start()
    with relay:
        p = RawPop(relay.pop_port)
        try:
            assert p.cmd("USER alice").startswith(b"+OK")
            assert p.cmd("PASS secret").startswith(b"+OK")
            retr = p.multi("RETR 1")
            status, _, body = retr.partition(b"\r\n")
            assert status.startswith(b"+OK")
            assert body == EXPECTED_BODY + b".\r\n"
            assert b"\x00" not in retr
            assert re.search(b"\r(?!\n)|(?<!\r)\n", retr) is None
            top = p.multi("TOP 1 2")
            assert top.partition(b"\r\n")[2] == b"Subject: hostile\r\n\r\nline1\r\n..\r\n.\r\n"
            p.cmd("QUIT")
        finally:
            p.close()


def test_by_name_content_symlinked_out_of_the_spool_is_not_served(tmp_path):
    relay = Relay(tmp_path, ["--pop-auth", auth_file(tmp_path), "--pop-by-name"], pop=True,
                  start=False)
    secret = tmp_path / "outside-secret"
    secret.write_bytes(b"Subject: private\r\n\r\nnot for POP\r\n")
    bob = os.path.join(relay.spool, "bob")
    os.mkdir(bob)
    good = put_message(bob, b"Subject: fine\r\n\r\nok\r\n")
    bad = put_message(bob, b"Subject: replaced\r\n\r\nx\r\n")
    os.unlink(os.path.join(bob, bad + ".content"))
    os.symlink(str(secret), os.path.join(bob, bad + ".content"))
    # A FIFO in place of the content must not hang the session either.
    fifo = put_message(bob, b"Subject: fifo\r\n\r\nx\r\n")
    os.unlink(os.path.join(bob, fifo + ".content"))
    os.mkfifo(os.path.join(bob, fifo + ".content"))
    relay.start()
    with relay:
        p = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        p.user("bob")
        p.pass_("s3cret")
        count, _ = p.stat()
        assert count == 1
        assert p.uidl(1).split()[-1].decode() == good
        text = b"\n".join(p.retr(1)[1])
        assert b"not for POP" not in text and b"Subject: fine" in text
        p.quit()
        relay.wait_log(r"is not a regular file: not served")


def _pop_fail(port, source, times):
    """`times` wrong passwords from `source` (reconnecting as needed); seconds for each."""
    out = []
    p = None
    for _ in range(times):
        if p is None:
            p = RawPop(port, source)
        assert p.cmd("USER alice").startswith(b"+OK")
        start = time.monotonic()
        reply = p.cmd("PASS wrong")
        out.append(time.monotonic() - start)
        assert reply.startswith(b"-ERR [AUTH]")
        if b"closing" in reply:
            p.close()
            p = None
    if p is not None:
        p.close()
    return out


def test_pop_failures_logged_with_address_and_budgeted_across_connections(tmp_path):
    with Relay(tmp_path, ["--pop-auth", auth_file(tmp_path)], pop=True) as relay:
        times = _pop_fail(relay.pop_port, "127.0.0.2", 7)
        # Five within the budget, then the reply waits (1 s, then 2 s).
        assert times[5] >= 0.9 and times[6] >= 1.9, times
        assert len(re.findall(r"reply delayed", relay.log())) == 2
        assert re.search(r"warning: pop: authentication failed \(USER/PASS\) for alice "
                         r"from 127\.0\.0\.2\n", relay.log())
        assert re.search(r"warning: too many authentication failures from 127\.0\.0\.2 "
                         r"\(pop\): 6 in 600s: reply delayed 1s", relay.log())
        # Another address is not delayed, and the right password still works.
        _pop_fail(relay.pop_port, "127.0.0.3", 2)
        assert "from 127.0.0.3 (pop)" not in relay.log()
        p = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        p.user("alice")
        assert p.pass_("secret").startswith(b"+OK")
        p.quit()


def test_smtp_and_pop_share_the_budget(tmp_path):
    secrets = tmp_path / "smtp.auth"
    secrets.write_text("server plain alice secret\n")
    secrets.chmod(0o600)
    with Relay(tmp_path, ["--pop-auth", auth_file(tmp_path), "--server-auth", str(secrets)],
               pop=True) as relay:
        _pop_fail(relay.pop_port, "127.0.0.4", 5)
        with smtplib.SMTP() as client:
            client.source_address = ("127.0.0.4", 0)
            client.connect("127.0.0.1", relay.port)
            client.ehlo()
            start = time.monotonic()
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("alice", "wrong")
            assert time.monotonic() - start >= 0.9
        relay.wait_log(r'warning: smtp authentication failed for user "alice" from 127\.0\.0\.4')
        relay.wait_log(r"warning: too many authentication failures from 127\.0\.0\.4 \(smtp\)")
