"""The admin interface (--admin), talked to over a socket as telnet would."""

import os
import re
import socket

import helpers
from test_client import put_message

PROMPT = b"E-MailRelay> "


class Admin:
    """A line client for the admin port: `cmd(text)` returns the answer text."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def read_to_prompt(self):
        while not self.buf.endswith(PROMPT):
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        out, self.buf = self.buf[:-len(PROMPT)], b""
        return out.decode()

    def read_until(self, text):
        while text.encode() not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        return self.buf.decode()

    def cmd(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.read_to_prompt()

    def close(self):
        self.sock.close()


def test_commands_without_forwarding(tmp_path):
    with helpers.Relay(tmp_path, admin=True) as r:
        a = Admin(r.admin_port)
        try:
            help_text = a.cmd("help")
            for word in ("flush", "forward", "list", "failures", "unfail-all", "status", "notify",
                         "pid", "quit", "terminate"):
                assert word in help_text
            assert a.cmd("pid").strip() == str(r.proc.pid)
            assert a.cmd("list").strip() == "<none>"
            mid = put_message(r.spool, b"x\r\n")
            assert a.cmd("list").strip() == "%s ready size=3 from=<a@x.test> to=<b@y.test>" % mid
            assert a.cmd("flush").startswith("error: no --forward-to")
            status = a.cmd("status")
            assert "listening: smtp 127.0.0.1:%d" % r.port in status
            assert "listening: admin 127.0.0.1:%d" % r.admin_port in status
            assert a.cmd("bogus").startswith("error: unrecognised command 'bogus'")
            assert a.cmd("") == ""  # the prompt alone
            assert a.cmd("  PID ").strip() == str(r.proc.pid)
            assert "terminate is disabled" in a.cmd("terminate")
            assert r.proc.poll() is None
            a.sock.sendall(b"quit\r\n")
            assert a.sock.recv(100) == b""
        finally:
            a.close()


def test_failures_and_unfail_all(tmp_path):
    port = helpers.free_port()
    with helpers.Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % port], admin=True) as r:
        mid = put_message(r.spool, b"x\r\n")
        os.rename(os.path.join(r.spool, mid + ".envelope"), os.path.join(r.spool, mid + ".envelope.bad"))
        with open(os.path.join(r.spool, mid + ".envelope.bad"), "ab") as f:
            f.write(b"X-MailRelay-Reason: 550 no such user\r\nX-MailRelay-ReasonCode: 550\r\n")
        a = Admin(r.admin_port)
        try:
            assert a.cmd("failures").strip() == "%s: 550 no such user" % mid
            assert "1 message" in a.cmd("unfail-all")
            assert a.cmd("list").startswith(mid + " ready ")
            # The next hop is down: flush reports the error, the message stays.
            answer = a.cmd("flush")
            assert answer.startswith("error:") and "cannot connect" in answer
            assert r.files(".envelope") == [mid + ".envelope"]
        finally:
            a.close()


def test_flush_forward_and_notify(tmp_path):
    with helpers.Relay(tmp_path, name="b") as b, \
            helpers.Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % b.port], admin=True, name="a") as r:
        a = Admin(r.admin_port)
        watcher = Admin(r.admin_port)
        try:
            assert watcher.cmd("notify").strip() == "OK"
            put_message(r.spool, b"Subject: one\r\n\r\n")
            assert a.cmd("flush").strip() == "OK"
            assert len(b.files(".envelope")) == 1
            assert "event: forwarded emailrelay." in watcher.read_until("forwarded emailrelay.")
            put_message(r.spool, b"Subject: two\r\n\r\n")
            assert a.cmd("forward").strip() == "OK"
            helpers.wait_for(lambda: len(b.files(".envelope")) == 2, what="second message at B")
            status = a.cmd("status")
            assert "messages-forwarded: 2" in status
        finally:
            a.close()
            watcher.close()


def test_terminate_with_admin_terminate(tmp_path):
    r = helpers.Relay(tmp_path, ["--admin-terminate"], admin=True)
    try:
        a = Admin(r.admin_port)
        a.sock.sendall(b"terminate\r\n")
        assert a.sock.recv(100).startswith(b"OK")
        a.close()
        assert r.proc.wait(15) == 0
    finally:
        r.stop()


def test_no_prompt_on_connect_and_flush_answers_as_emailrelay(tmp_path):
    with helpers.Relay(tmp_path, ["--forward-to", "nosuch.invalid:25"], admin=True) as r:
        a = Admin(r.admin_port)
        try:
            # Nothing is sent before the first command: its answer comes first.
            assert a.cmd("pid") == "%d\r\n" % r.proc.pid
            assert a.cmd("flush").strip() == "error: no messages to send"
            put_message(r.spool, b"x\r\n")
            answer = a.cmd("flush").strip()
            assert answer.startswith('error: dns error: no such host: "nosuch.invalid" (')
            assert len(r.files(".envelope")) == 1
        finally:
            a.close()


def test_flush_the_log_status_and_list_agree(tmp_path):
    """One message goes, one fails, one waits for a retry: every view says so."""
    import re
    from test_client import ScriptedServer
    server = ScriptedServer(reject={"busy@y.test": b"452 4.2.1 mailbox busy",
                                    "gone@y.test": b"550 5.1.1 no such user"})
    try:
        with helpers.Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % server.port],
                           admin=True) as r:
            busy = put_message(r.spool, b"1\r\n", to=["busy@y.test"])
            put_message(r.spool, b"22\r\n", to=["ok@y.test"])
            gone = put_message(r.spool, b"333\r\n", to=["gone@y.test"])
            a = Admin(r.admin_port)
            try:
                summary = "1 message(s) sent, 1 failed, 1 to be retried"
                assert a.cmd("flush").strip() == "error: " + summary
                assert "info: forwarding: %s\n" % summary in r.log()
                status = a.cmd("status")
                for counter in ("messages-forwarded: 1", "messages-failed: 1",
                                "messages-deferred: 1"):
                    assert counter in status.splitlines()
                listed = a.cmd("list").strip().splitlines()
            finally:
                a.close()
    finally:
        server.close()
    assert len(listed) == 2
    assert re.fullmatch(r"%s deferred size=3 from=<a@x\.test> to=<busy@y\.test> attempts=1 "
                        r"next=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} reason=\(.*452 4\.2\.1 mailbox busy\)"
                        % re.escape(busy), listed[0]), listed[0]
    assert re.fullmatch(r"%s bad size=5 from=<a@x\.test> to=<gone@y\.test> reason=\(.*550 5\.1\.1 no such user\)"
                        % re.escape(gone), listed[1]), listed[1]


def test_status_counts_messages_stored_through_filter_copy(tmp_path):
    import smtplib
    spool = tmp_path / "spool"
    (spool / "bob").mkdir(parents=True)
    filter_copy = os.path.join(helpers.BIN, "emailrelay-filter-copy")
    with helpers.Relay(tmp_path, ["--filter", filter_copy], spool=str(spool), admin=True) as r:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as c:
            c.sendmail("a@x.test", ["bob@y.test"], b"Subject: copied\r\n\r\nhi\r\n")
        a = Admin(r.admin_port)
        try:
            assert "messages-stored: 1" in a.cmd("status").splitlines()
        finally:
            a.close()
        assert re.search(r"info: smtp: stored emailrelay\.\S+: from=<a@x.test> nrcpt=1 ", r.log())
