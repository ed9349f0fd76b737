"""The admin interface (--admin), talked to over a socket as telnet would."""

import os
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
            assert a.cmd("list").strip() == mid
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
            assert a.cmd("list").strip() == mid
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
            assert answer.endswith(")")
            assert len(r.files(".envelope")) == 1
        finally:
            a.close()
