"""The SMTP server as a drop-in for E-MailRelay 2.6, through the real program.

Exact reply texts (no enhanced status codes by default, and with
`--server-smtp-config +enhancedstatuscodes`), every `--server-smtp-config`
keyword seen from a real client, the protocol-error limit, filter outcomes,
server-side log lines, AUTH offered only after TLS (SMTP and POP), long
DATA lines and 8-bit detection end to end, and a full disk (a tmpfs made by
the test) during DATA.
"""

import base64
import os
import poplib
import smtplib
import socket
import ssl
import subprocess

import pytest

import helpers
from emailrelay.store import envelope
from helpers import Relay, SmtpChat, run_emailrelay, wait_for
from test_client import ScriptedServer, dumping_sink, sink_dumps


def envelopes(relay):
    return [envelope.Envelope.read(os.path.join(relay.spool, n)) for n in relay.files(".envelope")]


def write(tmp_path, name, text, mode=0o700):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


# -- default replies ---------------------------------------------------------------

def test_default_replies_are_emailrelay_26_texts(tmp_path):
    with Relay(tmp_path) as relay:
        d = SmtpChat(relay.port)
        assert d.greeting.startswith("220 relay.test -- E-MailRelay V")
        assert d.cmd("EHLO client.test") == (
            "250-relay.test says hello\r\n250-VRFY\r\n250-PIPELINING\r\n250-DSN\r\n"
            "250 8BITMIME")
        assert d.cmd("NOOP") == "250 noop"
        assert d.cmd("RSET") == "250 state reset"
        assert d.cmd("HELO client.test") == "250 hello"
        assert d.cmd("EHLO") == "501 parameter required"
        assert d.cmd("XYZZY") == "500 command unrecognized"
        assert d.cmd("BDAT 3 LAST") == "500 command unrecognized"
        assert d.cmd("EXPN staff") == "502 command not implemented"
        assert d.cmd("AUTH PLAIN") == "502 command not implemented"
        assert d.cmd("VRFY <b@y.test>") == "252 cannot verify but will accept: b@y.test"
        assert d.cmd("RCPT TO:<b@y.test>") == "503 command out of sequence -- use RSET to resynchronise"
        assert d.cmd("MAIL FROM:<a@x.test>") == "250 sender <a@x.test> OK"
        assert d.cmd("DATA") == "554 no valid recipients"
        assert d.cmd("RCPT TO:<b@y.test>") == "250 recipient <b@y.test> OK"
        assert d.cmd("DATA") == "354 start mail input -- end with <CRLF>.<CRLF>"
        d.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
        assert d.reply() == "250 message processed"
        assert d.cmd("MAIL FROM:a@x.test") == (
            "553 mailbox name not allowed: missing or invalid angle brackets in mailbox name")
        assert d.cmd("QUIT") == "221 OK"
        d.close()
        assert len(relay.files(".envelope")) == 1


def test_enhanced_status_codes_are_an_option(tmp_path):
    with Relay(tmp_path, ["--server-smtp-config", "+enhancedstatuscodes"]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.has_extn("enhancedstatuscodes")
            assert c.docmd("MAIL FROM:<a@x.test>") == (250, b"2.1.0 sender <a@x.test> OK")
            assert c.docmd("RCPT TO:<b@y.test>") == (250, b"2.1.5 recipient <b@y.test> OK")
            assert c.docmd("XYZZY") == (500, b"5.5.1 command unrecognized")
            assert c.docmd("DATA")[0] == 354
            c.send(b"x\r\n.\r\n")
            assert c.getreply() == (250, b"2.0.0 message processed")


def test_size_limit_replies(tmp_path):
    with Relay(tmp_path, ["--size", "100"]) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.cmd("MAIL FROM:<a@x.test> SIZE=1000") == \
            "552 message size exceeds fixed maximum message size"
        assert d.message(b"x" * 200 + b"\r\n")[-1] == \
            "552 message size exceeds fixed maximum message size"
        assert d.cmd("QUIT") == "221 OK"
    assert relay.files(".content") == []


def test_eighth_protocol_error_drops_the_connection_without_a_reply(tmp_path):
    with Relay(tmp_path) as relay:
        d = SmtpChat(relay.port)
        d.send(b"".join(b"BOGUS%d\r\n" % i for i in range(10)))
        replies = [d.reply() for _ in range(9)]
        assert replies == ["500 command unrecognized"] * 8 + ["<EOF>"]
        relay.wait_log(r"too many protocol errors from the client")


def test_max_bad_commands_still_gives_421(tmp_path):
    with Relay(tmp_path, ["--max-bad-commands", "2"]) as relay:
        d = SmtpChat(relay.port)
        replies = [d.cmd("BOGUS") for _ in range(3)]
        assert replies[:2] == ["500 command unrecognized"] * 2
        assert replies[2] == "421 relay.test too many errors, closing connection"


def test_auth_and_encryption_required_replies(tmp_path, certs):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n", 0o600)
    with Relay(tmp_path, ["--server-auth", secrets], name="auth") as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.cmd("MAIL FROM:<a@x.test>") == "530 authentication required"
    args = ["--server-tls", "--server-tls-certificate", certs.server, "--server-tls-required"]
    with Relay(tmp_path, args, name="tls") as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.cmd("MAIL FROM:<a@x.test>") == "530 encryption required: use starttls"
        assert d.cmd("STARTTLS") == "220 ready to start tls"


# -- filters -------------------------------------------------------------------------

@pytest.mark.parametrize("script, reply, logged", [
    ("echo '<<not wanted here>>'; exit 1", "452 not wanted here", "not wanted here"),
    ("exit 1", "452 rejected", "rejected"),
    ('rm -f "$1" "${1%.content}.envelope.new"; exit 100', "250 message processed", None),
    ('rm -f "$1" "${1%.content}.envelope.new"; exit 0', "452 rejected", None),
])
def test_filter_outcome_replies(tmp_path, script, reply, logged):
    flt = write(tmp_path, "filter", "#!/bin/sh\n" + script + "\n")
    with Relay(tmp_path, ["--filter", flt]) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.message()[-1] == reply
        assert d.cmd("NOOP") == "250 noop"
        if logged:
            relay.wait_log(r"rejected by filter: \[%s\]" % logged)
    assert relay.files(".envelope") == []


def test_filter_timeout_is_452_error_with_emailrelay_log_line(tmp_path):
    flt = write(tmp_path, "filter", "#!/bin/sh\nexec sleep 30\n")
    with Relay(tmp_path, ["--filter", flt, "--filter-timeout", "1"]) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.message()[-1] == "452 error"
        relay.wait_log(r"filter \[%s\]: \[emailrelay\.\d+\.\d+\.\d+\]: failed response=\[error\] "
                       r"reason=\[timeout\]" % flt)
    assert relay.files(".envelope") == [] and relay.files(".content") == []


# -- log lines -------------------------------------------------------------------------

def test_server_log_lines(tmp_path):
    secrets = write(tmp_path, "pop-secrets", "server plain u p\n", 0o600)
    with Relay(tmp_path, ["--pop-auth", secrets], pop=True, admin=True) as relay:
        log = relay.log()
        assert "smtp server on 127.0.0.1:%d" % relay.port in log
        assert "pop server on 127.0.0.1:%d" % relay.pop_port in log
        assert "admin server on 127.0.0.1:%d" % relay.admin_port in log
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            local = c.sock.getsockname()
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nx\r\n")
        relay.wait_log(r"smtp connection from 127\.0\.0\.1:%d" % local[1])
        relay.wait_log(r"smtp connection closed")
        [name] = relay.files(".envelope")
        relay.wait_log(r"new envelope file \[%s\.new\]" % name.replace(".", r"\."))
        p = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        p.quit()
        relay.wait_log(r"pop connection from 127\.0\.0\.1:\d+")
        relay.wait_log(r"pop connection closed")


def test_tls_handshake_failure_is_a_tls_error_line(tmp_path, certs):
    args = ["--server-tls-connection", "--server-tls-certificate", certs.server]
    with Relay(tmp_path, args) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"EHLO not-tls\r\n\r\n" * 20)
            try:
                s.recv(100)
            except ConnectionResetError:
                pass
        relay.wait_log(r"warning: tls error: ")


# -- --server-smtp-config keywords -------------------------------------------------------

def test_unknown_server_smtp_config_keyword_is_a_usage_error(tmp_path):
    r = run_emailrelay(["--server-smtp-config", "pipelining,turbo", "--spool-dir", str(tmp_path),
                        "--no-daemon"])
    assert r.returncode != 0
    assert "--server-smtp-config: unknown keyword turbo" in r.stderr
    r = run_emailrelay(["--client-smtp-config", "chunking", "--spool-dir", str(tmp_path)])
    assert r.returncode != 0 and "--client-smtp-config: unknown keyword chunking" in r.stderr


def test_chunking_smtputf8_and_nopipelining_keywords(tmp_path):
    args = ["--server-smtp-config", "chunking,+smtputf8", "--server-smtp-config", "-pipelining"]
    with Relay(tmp_path, args) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.has_extn("chunking") and c.has_extn("binarymime") and c.has_extn("smtputf8")
            assert not c.has_extn("pipelining") and not c.has_extn("enhancedstatuscodes")
            c.docmd("MAIL FROM:<a@x.test> BODY=BINARYMIME")
            c.docmd("RCPT TO:<b@y.test>")
            c.send(b"BDAT 4\r\nab\r\n")
            assert c.getreply() == (250, b"4 bytes received")
            c.send(b"BDAT 2 LAST\r\n\x00\xff")
            assert c.getreply() == (250, b"message processed")
    [env] = envelopes(relay)
    assert env.content == "binarymime"


def test_nostrictparsing_accepts_addresses_without_angle_brackets(tmp_path):
    with Relay(tmp_path, ["--server-smtp-config", "nostrictparsing"]) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.cmd("MAIL FROM:a@x.test") == "250 sender <a@x.test> OK"
        assert d.cmd("RCPT TO:b@y.test") == "250 recipient <b@y.test> OK"
        assert d.cmd("DATA").startswith("354")
        d.send(b"x\r\n.\r\n")
        assert d.reply() == "250 message processed"
    [env] = envelopes(relay)
    assert env.from_ == "a@x.test" and env.to_remote == ["b@y.test"]


@pytest.mark.parametrize("config, from_, to", [
    (None, "j\u00f6@xn--bcher-kva.example", "r@xn--mnchen-3ya.example"),
    ("-alabels", "j\u00f6@b\u00fccher.example", "r@m\u00fcnchen.example"),
])
def test_alabels_keyword(tmp_path, config, from_, to):
    with Relay(tmp_path, ["--server-smtp-config", config] if config else []) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        replies = d.message(from_="j\u00f6@b\u00fccher.example", to="r@m\u00fcnchen.example")
        assert replies[-1] == "250 message processed"
    [env] = envelopes(relay)
    assert env.from_ == from_ and env.to_remote == [to] and env.utf8_mailbox_names


def test_smtputf8strict_keyword(tmp_path):
    with Relay(tmp_path, ["--server-smtp-config", "smtputf8strict"]) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.cmd("MAIL FROM:<j\u00f6@x.test>") == \
            "553 mailbox name not allowed: invalid character in mailbox name"
        assert d.cmd("MAIL FROM:<j\u00f6@x.test> SMTPUTF8").startswith("250 ")
        assert d.cmd("RCPT TO:<r\u00e9@y.test>") == "250 recipient <r\u00e9@y.test> OK"
        assert d.cmd("RSET") == "250 state reset"
        assert d.cmd("MAIL FROM:<a@x.test>").startswith("250 ")
        assert d.cmd("RCPT TO:<r\u00e9@y.test>") == "550 invalid character in mailbox name"


# -- AUTH only after TLS -------------------------------------------------------------------

def plain(user, password):
    return base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()


def client_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_plain_and_login_are_offered_only_after_starttls(tmp_path, certs):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n", 0o600)
    args = ["--server-tls", "--server-tls-certificate", certs.server, "--server-auth", secrets]
    with Relay(tmp_path, args) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.esmtp_features["auth"].split() == ["CRAM-SHA256", "CRAM-SHA1", "CRAM-MD5"]
            assert c.docmd("AUTH PLAIN " + plain("alice", "pw-alice")) == \
                (504, b"unsupported authentication mechanism: use starttls")
            c.starttls(context=client_context())
            c.ehlo("client.test")
            assert "PLAIN" in c.esmtp_features["auth"].split()
            c.login("alice", "pw-alice")
    # The site's own list wins.
    args += ["--server-auth-config", "m:plain,login"]
    with Relay(tmp_path, args, name="configured") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            c.login("alice", "pw-alice")


def test_tls_required_hides_auth_and_refuses_it_before_tls(tmp_path, certs):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n", 0o600)
    args = ["--server-tls", "--server-tls-certificate", certs.server, "--server-tls-required",
            "--server-auth", secrets]
    with Relay(tmp_path, args) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert not c.has_extn("auth") and c.has_extn("starttls")
            assert c.docmd("AUTH PLAIN " + plain("alice", "pw-alice")) == \
                (530, b"encryption required: use starttls")
            assert c.docmd("MAIL FROM:<a@x.test>") == \
                (530, b"authentication required: use starttls")
        assert plain("alice", "pw-alice") not in relay.log()


def test_pop_user_and_auth_plain_wait_for_stls(tmp_path, certs):
    secrets = write(tmp_path, "pop-secrets", "server plain u pw\n", 0o600)
    args = ["--server-tls", "--server-tls-certificate", certs.server, "--pop-auth", secrets]
    with Relay(tmp_path, args, pop=True) as relay:
        p = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
        caps = p.capa()
        assert "USER" not in caps and "STLS" in caps and "PLAIN" not in caps.get("SASL", [])
        with pytest.raises(poplib.error_proto, match="use STLS first"):
            p.user("u")
        with pytest.raises(poplib.error_proto):
            p._shortcmd("AUTH PLAIN " + plain("u", "pw"))
        p.stls(context=client_context())
        assert "USER" in p.capa()
        p.user("u")
        p.pass_("pw")
        p.quit()


# -- message text -----------------------------------------------------------------------

def test_5000_character_line_is_stored_and_forwarded_intact(tmp_path):
    line = ("0123456789" * 500).encode()
    body = b"Subject: long\r\n\r\n" + line + b"\r\n.leading dot\r\nend\r\n"
    with Relay(tmp_path) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.sendmail("a@x.test", ["b@y.test"], body)
        [name] = relay.files(".content")
        with open(os.path.join(relay.spool, name), "rb") as f:
            assert f.read().split(b"\r\n", 1)[1] == body
    sink_port = helpers.free_port()
    dump = tmp_path / "dump"
    dump.mkdir()
    sink = dumping_sink(sink_port, dump)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % sink_port, "--spool-dir", relay.spool])
        assert r.returncode == 0, r.stderr
        wait_for(lambda: sink_dumps(dump), what="the sink's dump")
    finally:
        helpers.stop_process(sink)
    [dumped] = sink_dumps(dump)
    assert b"\n" + line + b"\n" in dumped.replace(b"\r\n", b"\n")


def test_8bit_text_without_body_param_is_recorded_8bit_and_forwarded_with_8bitmime(tmp_path):
    with Relay(tmp_path) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.message(b"Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n")[-1] == "250 message processed"
        assert d.message(b"Subject: plain\r\n\r\nascii\r\n")[-1] == "250 message processed"
    assert sorted(e.content for e in envelopes(relay)) == ["7bit", "8bit"]
    server = ScriptedServer(extensions=["8BITMIME"])
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % server.port, "--spool-dir", relay.spool])
        assert r.returncode == 0, r.stderr
    finally:
        server.close()
    mails = sorted(c for c in server.sessions[0]["commands"] if c.startswith("MAIL"))
    assert mails == ["MAIL FROM:<a@x.test>", "MAIL FROM:<a@x.test> BODY=8BITMIME"]


# -- a full disk ----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (we run as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, "cannot mount a tmpfs: %s" % r.stderr
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_during_data_is_452_and_the_session_goes_on(tmp_path, small_disk):
    big = (b"x" * 998 + b"\r\n") * 3000   # 3 MB: more than the disk holds
    with Relay(tmp_path, ["--min-free-space", "0"], spool=small_disk) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.message(big) == ["250 sender <a@x.test> OK", "250 recipient <b@y.test> OK",
                                  "354 start mail input -- end with <CRLF>.<CRLF>",
                                  "452 insufficient system storage"]
        assert d.message()[-1] == "250 message processed"
        assert d.cmd("QUIT") == "221 OK"
        relay.wait_log(r"cannot store message: .*No space left on device")
    assert len(relay.files(".content")) == 1 and len(relay.files(".envelope")) == 1


def test_min_free_space_is_checked_before_each_commit(tmp_path, small_disk):
    # 2 MiB disk, 1 MiB must stay free: the first 700 kB message leaves
    # about 1.3 MiB and is taken; the second passes the check at MAIL but
    # would leave less than 1 MiB, so it is refused at once, not a second later.
    text = (b"y" * 998 + b"\r\n") * 700
    with Relay(tmp_path, ["--min-free-space", "1024"], spool=small_disk) as relay:
        d = SmtpChat(relay.port)
        d.cmd("EHLO client.test")
        assert d.message(text)[-1] == "250 message processed"
        assert d.message(text) == ["250 sender <a@x.test> OK", "250 recipient <b@y.test> OK",
                                   "354 start mail input -- end with <CRLF>.<CRLF>",
                                   "452 insufficient system storage"]
        assert d.cmd("NOOP") == "250 noop"
    assert len(relay.files(".envelope")) == 1
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize // 1024 >= 1024
