"""Forwarding a spool with bad entries, and the outcomes E-MailRelay 2.6 gives.

One bad message (missing, directory or FIFO content, addresses that cannot
be sent, no remote recipients, a huge envelope line) goes to `.bad` with a
clear reason, and every other message is forwarded; --as-client neither
hangs nor prints a traceback. Also: the dialogue at --verbose, the EHLO name,
the rescan after a filter's exit 103.
"""

import os
import resource
import smtplib
import subprocess

import pytest

import helpers
from emailrelay.config import options
from test_client import ScriptedServer, put_message
from test_forward import relay_b, read


def as_client(port, spool, *args, timeout=60):
    return helpers.run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--spool-dir", str(spool),
                                   "--domain", "a.test"] + list(args), timeout=timeout)


def received(server):
    """Every message the scripted next hop took, in order."""
    return [data for s in list(server.sessions) for data in list(s["messages"])]


def bad_reason(spool, message_id):
    text = read(os.path.join(str(spool), message_id + ".envelope.bad"))
    return [line for line in text.split(b"\r\n") if line.startswith(b"X-MailRelay-Reason:")][-1]


def raw_envelope(spool, message_id, replace):
    """Rewrites a committed envelope with byte replacements (another program's spool)."""
    path = os.path.join(str(spool), message_id + ".envelope")
    data = read(path)
    for old, new in replace:
        assert old in data
        data = data.replace(old, new)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_unreadable_content_fails_that_message_only(tmp_path, kind):
    spool = tmp_path / "spool"
    spool.mkdir()
    first = put_message(spool, b"Subject: first\r\n\r\n")
    broken = put_message(spool, b"Subject: broken\r\n\r\n")
    last = put_message(spool, b"Subject: last\r\n\r\n")
    content = os.path.join(str(spool), broken + ".content")
    os.unlink(content)
    if kind == "directory":
        os.mkdir(content)
    elif kind == "fifo":
        os.mkfifo(content)
    server = ScriptedServer()
    try:
        r = as_client(server.port, spool, timeout=30)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert received(server) == \
            [b"Subject: first\r\n\r\n.\r\n", b"Subject: last\r\n\r\n.\r\n"]
        reason = bad_reason(spool, broken)
        assert b"content file " + broken.encode() + b".content" in reason
        assert b"connect" not in reason
        assert helpers.spool_files(str(spool), ".envelope") == []
        assert first and last
    finally:
        server.close()


@pytest.mark.parametrize("field, value", [
    (b"X-MailRelay-From: a@x.test", b"X-MailRelay-From: \xff\xfe@x.test"),
    (b"X-MailRelay-To-Remote: b@y.test", b"X-MailRelay-To-Remote: b\xc3@y.test"),
    (b"X-MailRelay-To-Remote: b@y.test", b"X-MailRelay-To-Remote: b\r@y.test"),
    (b"X-MailRelay-To-Remote: b@y.test", b"X-MailRelay-To-Remote: b\x00@y.test"),
    (b"X-MailRelay-To-Remote: b@y.test", b"X-MailRelay-To-Remote: b>@y.test"),
])
def test_addresses_that_cannot_be_sent_fail_before_sending(tmp_path, field, value):
    spool = tmp_path / "spool"
    spool.mkdir()
    bad = put_message(spool, b"Subject: bad\r\n\r\n")
    good = put_message(spool, b"Subject: good\r\n\r\n")
    raw_envelope(spool, bad, [(field, value)])
    server = ScriptedServer()
    try:
        r = as_client(server.port, spool, timeout=30)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert b"X-MailRelay-Reason: invalid envelope: address " in bad_reason(spool, bad)
        commands = [c for s in server.sessions for c in s["commands"]]
        assert not any("\ufffd" in c or "bad" in c for c in commands if c.startswith(("MAIL", "RCPT")))
        assert received(server) == [b"Subject: good\r\n\r\n.\r\n"]
        assert good
    finally:
        server.close()


def test_no_remote_recipients_fails_the_message(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    mid = put_message(spool, b"Subject: local\r\n\r\n")
    raw_envelope(spool, mid, [(b"X-MailRelay-To-Remote: b@y.test", b"X-MailRelay-To-Local: b@y.test")])
    server = ScriptedServer()
    try:
        assert as_client(server.port, spool).returncode == 1
        assert bad_reason(spool, mid) == b"X-MailRelay-Reason: no remote recipients"
    finally:
        server.close()


def test_a_huge_envelope_line_is_refused_in_bounded_memory(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    mid = put_message(spool, b"Subject: huge\r\n\r\n")
    good = put_message(spool, b"Subject: good\r\n\r\n")
    path = os.path.join(str(spool), mid + ".envelope")
    with open(path, "r+b") as f:
        head = f.read().split(b"X-MailRelay-From:")[0]
        f.seek(0)
        f.truncate()
        f.write(head + b"X-MailRelay-From: ")
        f.seek(200 * 1024 * 1024, os.SEEK_CUR)   # a sparse 200 MB line
        f.write(b"@x.test\r\nX-MailRelay-End: 1\r\n")
    server = ScriptedServer()
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        r = as_client(server.port, spool)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert b"invalid envelope file: envelope file larger than" in bad_reason(spool, mid)
        assert received(server) == [b"Subject: good\r\n\r\n.\r\n"]
        # Far less than the line itself (ru_maxrss is in KiB on Linux).
        assert max(before, peak_kib) < 100 * 1024, peak_kib
        assert good
    finally:
        server.close()


def test_nul_in_content_is_dropped_on_output(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    put_message(spool, b"Subject: nul\r\n\r\nline\r\n\x00.\r\nafter\r\n")
    server = ScriptedServer()
    try:
        assert as_client(server.port, spool).returncode == 0
        assert server.sessions[0]["data"] == b"Subject: nul\r\n\r\nline\r\n..\r\nafter\r\n.\r\n"
    finally:
        server.close()


# -- the dialogue, EHLO, TLS ----------------------------------------------------

def test_verbose_log_shows_the_dialogue_without_secrets_or_content(tmp_path, certs):
    """At --log --verbose, as E-MailRelay 2.6 (not only at --debug)."""
    secrets = os.path.join(str(tmp_path), "server.auth")
    with open(secrets, "w") as f:
        f.write("server plain carol s3cr3tpw\n")
    client_secrets = os.path.join(str(tmp_path), "client.auth")
    with open(client_secrets, "w") as f:
        f.write("client plain carol s3cr3tpw\n")
    b_args = ["--server-tls", "--server-tls-certificate", certs.server, "--server-auth", secrets,
              "--server-auth-config", "m:plain"]
    with relay_b(tmp_path, *b_args) as b, \
            helpers.Relay(tmp_path, ["--forward-on-disconnect", "--client-tls",
                                     "--client-auth", client_secrets,
                                     "--forward-to", "127.0.0.1:%d" % b.port], name="a") as a:
        with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as s:
            s.sendmail("a@x.test", ["b@y.test"], "Subject: hush\r\n\r\ntopsecretbody\r\n")
        helpers.wait_for(lambda: b.files(".envelope"), what="the message at relay B")
        a.wait_log(r'tx>>: "QUIT"')
        log = a.log()
        assert 'smtp client: tx>>: "EHLO relay.test"' in log
        assert 'smtp client: rx<<: "220 ' in log
        assert 'smtp client: rx<<: "250-' in log and 'rx<<: "250 ' in log
        assert 'smtp client: tx>>: "STARTTLS"' in log
        assert "smtp client: tls protocol established with 127.0.0.1:%d protocol TLSv1" % b.port in log
        assert 'smtp client: tx>>: "AUTH PLAIN [not logged]"' in log
        assert 'tx>>: "MAIL FROM:<a@x.test>' in log and 'tx>>: "RCPT TO:<b@y.test>"' in log
        assert "tx>>: [1 line(s) of content]" in log or "line(s) of content]" in log
        assert "s3cr3tpw" not in log and "Y2Fyb2wA" not in log   # base64 of "carol\0"
        assert "topsecretbody" not in log and "hush" not in log


@pytest.mark.parametrize("given", [True, False])
def test_ehlo_name_is_domain_as_given_or_the_address_literal(tmp_path, given):
    """An explicit --domain goes as it is, dot or not (as E-MailRelay 2.6);
    a default domain without a dot becomes the RFC 5321 address literal."""
    server = ScriptedServer()
    try:
        spool = tmp_path / "spool"
        spool.mkdir()
        put_message(spool, b"x\r\n")
        args = ["--as-client", "127.0.0.1:%d" % server.port, "--spool-dir", str(spool)]
        if given:
            args += ["--domain", "nodot"]
            expected = "nodot"
        else:
            default = options.parse(args).domain
            expected = default if "." in default else "[127.0.0.1]"
        r = helpers.run_emailrelay(args)
        assert r.returncode == 0, r.stderr
        assert server.sessions[0]["commands"][0] == "EHLO " + expected
    finally:
        server.close()


def test_filter_exit_103_rescans_once_after_the_commit(tmp_path):
    with relay_b(tmp_path) as b, \
            helpers.Relay(tmp_path, ["--filter", "exit:103", "--forward-to", "127.0.0.1:%d" % b.port],
                          name="a") as a:
        with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as s:
            s.sendmail("a@x.test", ["b@y.test"], "Subject: rescan\r\n\r\nbody\r\n")
            # The only trigger is the rescan, and it already sees the new message.
            helpers.wait_for(lambda: b.files(".envelope"), what="the message at relay B")
        a.wait_log(r"forwarding: 1 message\(s\) sent")
        assert a.log().count("forwarding: [rescan]") == 1
        assert a.files(".envelope") == []


def test_crash_resends_at_most_the_message_in_flight(tmp_path):
    """Worst case measured over several SIGKILLs during a run: at most one duplicate each."""
    spool = tmp_path / "spool"
    spool.mkdir()
    total = 300
    for i in range(total):
        put_message(spool, b"Subject: n%d\r\n\r\nbody\r\n" % i)
    server = ScriptedServer(extensions=("PIPELINING",))
    received = []
    worst = so_far = 0
    try:
        for kill_at in (20, 60, 110, 170):
            before = len(delivered_subjects(server))
            proc = subprocess.Popen([helpers.PYTHON, "-m", "emailrelay", "--as-client",
                                     "127.0.0.1:%d" % server.port, "--spool-dir", str(spool)],
                                    cwd=helpers.ROOT, env=helpers.env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            helpers.wait_for(lambda: len(delivered_subjects(server)) >= kill_at or proc.poll() is not None,
                             timeout=30, interval=0.001, what="messages at the next hop")
            proc.kill()
            proc.wait()
            recover = helpers.run_emailrelay(["--as-client", "127.0.0.1:1", "--spool-dir", str(spool),
                                              "--connection-timeout", "1", "--retry-interval", "0"])
            assert "Traceback" not in recover.stderr
            got = delivered_subjects(server)
            left = len(helpers.spool_files(str(spool), ".envelope"))
            duplicates = len(got) + left - total
            worst = max(worst, duplicates - so_far)
            so_far = duplicates
            assert len(got) > before
        r = helpers.run_emailrelay(["--as-client", "127.0.0.1:%d" % server.port, "--spool-dir", str(spool)])
        assert r.returncode == 0
        received = delivered_subjects(server)
        assert set(received) == {b"n%d" % i for i in range(total)}
        assert len(received) - total == so_far
    finally:
        server.close()
    print("crash duplicates: worst case %d per crash (%d sent for %d messages)"
          % (worst, len(received), total))
    assert worst <= 1


def delivered_subjects(server):
    return [data.split(b"\r\n")[0][len(b"Subject: "):]
            for s in list(server.sessions) for data in list(s["messages"])]
