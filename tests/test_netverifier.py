"""`net:` address verifiers against a verifier daemon written here, over
TCP and a unix socket, through the real relay."""

import os
import smtplib

import pytest

from daemons import HANG, LineDaemon
from helpers import Relay, free_port

ANSWERS = {
    "POSTMASTER": b"0|postmaster|Local Postmaster <postmaster@localhost>\n",
    "REMOTE": b"1|rewritten@remote.test\n",
    "NOBODY": b"2|no such user here\n",
    "LATER": b"3|mailbox busy, try later\n",
    "ABORT": b"100\n",
    "GARBAGE": b"what?\n",
    "SLOW": HANG,
    "HALF": b"0|post",
}


def answer(line):
    fields = line.split("|")
    return ANSWERS.get(fields[1], b"1|%s\n" % fields[0].encode())


@pytest.fixture(params=["tcp", "unix"])
def daemon(request, tmp_path):
    path = str(tmp_path / "verifier.sock") if request.param == "unix" else None
    with LineDaemon(answer, path=path) as d:
        yield d


def rcpts(port, *addresses):
    """RCPT replies (code, text) for each address, in one transaction."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("alice@x.test")
        replies = []
        for a in addresses:
            code, text = s.rcpt(a)
            replies.append((code, text.decode()))
        return replies


def test_request_line_and_answers(tmp_path, daemon):
    with Relay(tmp_path, ["--address-verifier", "net:" + daemon.address]) as relay:
        replies = rcpts(relay.port, "postmaster@relay.test", "remote@y.test", "nobody@y.test",
                        "later@y.test", "bob@y.test")
        assert daemon.requests[0] == \
            "postmaster@relay.test|POSTMASTER|RELAY.TEST|RELAY.TEST|alice@x.test|127.0.0.1|none|"
        assert daemon.connections == 1
        assert replies[0][0] == 250 and "postmaster" in replies[0][1]
        assert replies[1][0] == 250
        assert replies[2][0] == 550 and "no such user here" in replies[2][1]
        assert replies[3][0] == 450 and "mailbox busy, try later" in replies[3][1]
        assert replies[4][0] == 250


def test_a_remote_answer_rewrites_the_envelope_recipient(tmp_path, daemon):
    with Relay(tmp_path, ["--address-verifier", "net:" + daemon.address]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
            s.sendmail("alice@x.test", ["remote@y.test", "bob@y.test"], b"Subject: hi\r\n\r\nhi\r\n")
        [name] = relay.files(".envelope")
        with open(os.path.join(relay.spool, name), "rb") as f:
            text = f.read()
    assert b"X-MailRelay-To-Remote: rewritten@remote.test\r\n" in text
    assert b"X-MailRelay-To-Remote: bob@y.test\r\n" in text
    assert b"remote@y.test" not in text


def test_vrfy_asks_with_an_empty_sender(tmp_path, daemon):
    with Relay(tmp_path, ["--address-verifier", "net:" + daemon.address]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
            s.ehlo("client.test")
            code, text = s.verify("postmaster@relay.test")
        assert code == 250 and b"Local Postmaster" in text
        assert daemon.requests[0].split("|")[4] == ""


def test_abort_drops_the_connection(tmp_path, daemon):
    with Relay(tmp_path, ["--address-verifier", "net:" + daemon.address]) as relay:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            rcpts(relay.port, "abort@y.test")
        relay.wait_log(r"address verifier aborted the connection")


@pytest.mark.parametrize("local,why", [("garbage", "invalid response: what\\?"),
                                       ("slow", "timeout"), ("half", "incomplete response")])
def test_bad_answers_are_temporary(tmp_path, daemon, local, why):
    with Relay(tmp_path, ["--address-verifier", "net:" + daemon.address,
                          "--filter-timeout", "1"]) as relay:
        (code, text), = rcpts(relay.port, "%s@y.test" % local)
        assert code == 450, text
        relay.wait_log(r"warning: address verifier net:\S+: .*%s" % why)
        (code, text), = rcpts(relay.port, "bob@y.test")
        assert code == 250, text


def test_daemon_down_is_temporary(tmp_path):
    port = free_port()
    with Relay(tmp_path, ["--address-verifier", "net:127.0.0.1:%d" % port]) as relay:
        (code, text), = rcpts(relay.port, "bob@y.test")
        assert code == 450, text
        relay.wait_log(r"warning: address verifier net:127.0.0.1:%d: cannot connect" % port)
