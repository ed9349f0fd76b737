"""Delivery status notification parameters (RFC 3461), received, kept and passed on.

The relay advertises DSN, keeps RET/ENVID per message and NOTIFY/ORCPT
per recipient in the envelope's trailer (after `X-MailRelay-End: 1`,
where E-MailRelay 2.6's reader stops), and passes them to a next hop that
advertises DSN: Postfix's smtp-sink, whose dump files show the MAIL and
RCPT arguments it received. smtp-sink -N (no DSN) gets none of them.
Seed 004's switches: force-rcpt-notify-never and nodsn.
"""

import os
import smtplib

import helpers
from test_client import dumping_sink, sink_dumps
from test_forward import as_client, read

ENVID = "QQ314159+2Bx"


def submit_with_dsn(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        code, features = c.ehlo("client.test")
        assert code == 250
        assert c.mail("a@x.test", ["RET=HDRS", "ENVID=" + ENVID]) == (250, b"sender <a@x.test> OK")
        assert c.rcpt("b@y.test", ["NOTIFY=SUCCESS,failure", "ORCPT=rfc822;b+2Bold@y.test"])[0] == 250
        assert c.rcpt("c@y.test")[0] == 250
        assert c.rcpt("d@y.test", ["NOTIFY=NEVER"])[0] == 250
        c.data(b"Subject: dsn\r\n\r\nbody\r\n")
    return features.decode().split("\n")


def mail_arguments(dump):
    """The MAIL FROM arguments smtp-sink dumped, split at spaces."""
    [line] = [x for x in dump.split(b"\n") if x.startswith(b"X-Mail-Args: ")]
    return line.split(b" ")[1:]


def trailer(relay):
    [name] = relay.files(".envelope")
    data = read(os.path.join(relay.spool, name))
    head, end, tail = data.partition(b"X-MailRelay-End: 1\r\n")
    assert end, data
    return head, tail


def test_dsn_parameters_are_kept_after_the_end_line_and_passed_to_a_dsn_next_hop(tmp_path):
    with helpers.Relay(tmp_path) as relay:
        features = submit_with_dsn(relay.port)
        head, tail = trailer(relay)
    assert "DSN" in features
    assert b"Dsn" not in head
    assert tail.split(b"\r\n") == [
        b"X-MailRelay-Dsn-Ret: HDRS",
        b"X-MailRelay-Dsn-Envid: " + ENVID.encode(),
        b"X-MailRelay-Dsn-Rcpt: b@y.test SUCCESS,FAILURE rfc822;b+2Bold@y.test",
        b"X-MailRelay-Dsn-Rcpt: d@y.test NEVER -",
        b""]
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    port = helpers.free_port()
    sink = dumping_sink(port, sink_dir)
    try:
        ran = as_client(port, relay.spool)
    finally:
        helpers.stop_process(sink)
    assert ran.returncode == 0, ran.stderr
    [dump] = sink_dumps(sink_dir)
    mail_args = mail_arguments(dump)
    assert mail_args[0] == b"<a@x.test>"
    assert {b"RET=HDRS", b"ENVID=" + ENVID.encode()} <= set(mail_args)
    assert (b"X-Rcpt-Args: <b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bold@y.test\n"
            in dump)
    assert b"X-Rcpt-Args: <c@y.test>\n" in dump
    assert b"X-Rcpt-Args: <d@y.test> NOTIFY=NEVER\n" in dump


def test_a_next_hop_without_dsn_gets_no_dsn_parameters(tmp_path):
    with helpers.Relay(tmp_path) as relay:
        submit_with_dsn(relay.port)
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    port = helpers.free_port()
    sink = dumping_sink(port, sink_dir, extra=["-N"])
    try:
        ran = as_client(port, relay.spool)
    finally:
        helpers.stop_process(sink)
    assert ran.returncode == 0, ran.stderr
    [dump] = sink_dumps(sink_dir)
    assert not [a for a in mail_arguments(dump) if a.startswith((b"RET=", b"ENVID="))]
    for rcpt in (b"b", b"c", b"d"):
        assert b"X-Rcpt-Args: <" + rcpt + b"@y.test>\n" in dump


def test_force_rcpt_notify_never(tmp_path):
    with helpers.Relay(tmp_path, ["-Z", "force-rcpt-notify-never"]) as relay:
        submit_with_dsn(relay.port)
        _, tail = trailer(relay)
    assert tail.split(b"\r\n")[2:] == [
        b"X-MailRelay-Dsn-Rcpt: b@y.test NEVER rfc822;b+2Bold@y.test",
        b"X-MailRelay-Dsn-Rcpt: c@y.test NEVER -",
        b"X-MailRelay-Dsn-Rcpt: d@y.test NEVER -",
        b""]


def test_invalid_dsn_parameters_get_501(tmp_path):
    with helpers.Relay(tmp_path) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("a@x.test", ["RET=ALL"])[0] == 501
            assert c.mail("a@x.test", ["ENVID=has=equals"])[0] == 501
            assert c.mail("a@x.test", ["ENVID=" + "x" * 101])[0] == 501
            assert c.mail("a@x.test")[0] == 250
            assert c.rcpt("b@y.test", ["NOTIFY=NEVER,SUCCESS"])[0] == 501
            assert c.rcpt("b@y.test", ["NOTIFY=SOMETIMES"])[0] == 501
            assert c.rcpt("b@y.test", ["ORCPT=b@y.test"])[0] == 501
            assert c.rcpt("b@y.test", ["NOTIFY=DELAY"])[0] == 250


def test_nodsn_takes_dsn_out_of_ehlo_and_ignores_the_parameters(tmp_path):
    with helpers.Relay(tmp_path, ["-Z", "nodsn"]) as relay:
        features = submit_with_dsn(relay.port)
        _, tail = trailer(relay)
    assert "DSN" not in features
    assert tail == b""
