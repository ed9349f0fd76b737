"""Authentication and TLS end to end: the real program against real peers.

Server side: swaks (--tls, --tlsc, --auth PLAIN/LOGIN/CRAM-MD5), openssl
s_client (-starttls smtp, and implicit TLS), smtplib (starttls, login) and
raw sockets, against `python3 -m emailrelay` with --server-tls...,
--server-auth (plain and md5 secrets, trusted addresses, /pam). Client
side: the program with --as-client forwarding to a second relay (relay B)
with --server-tls... and --server-auth, and to a small scripted responder
offering XOAUTH2. Certificates come from tests/certs.py.
"""

import base64
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import uuid

import pytest

import helpers
from emailrelay.store import envelope
from helpers import Relay, SmtpChat, run_emailrelay, wait_for
from test_client import put_message

PASSWD = os.path.join(helpers.BIN, "emailrelay-passwd")


# -- helpers ----------------------------------------------------------------------

def md5_state(password):
    """The md5 secret for `password`, made by bin/emailrelay-passwd."""
    r = subprocess.run([helpers.PYTHON, PASSWD], input=password + "\n", stdout=subprocess.PIPE,
                       universal_newlines=True, timeout=30, check=True)
    return r.stdout.strip()


def write(tmp_path, name, text, mode=0o600):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def swaks(port, *args):
    """Runs swaks for one message; returns (exit status, the whole dialogue)."""
    r = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@x.test",
                        "--to", "b@y.test", "--helo", "client.test"] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=30)
    return r.returncode, r.stdout


def stored(spool):
    """[(content bytes, Envelope, raw envelope bytes)] for committed messages, oldest first."""
    out = []
    for name in helpers.spool_files(spool, ".envelope"):
        path = os.path.join(spool, name)
        with open(path, "rb") as f:
            raw = f.read()
        with open(path[:-len(".envelope")] + ".content", "rb") as f:
            out.append((f.read(), envelope.Envelope.parse(raw), raw))
    return out


def client_context(cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert)
    return ctx


def same_certificate(pem, crt_path):
    with open(crt_path) as f:
        return ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(f.read())


def plain_response(user, password):
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


def tls_args(certs, mode="--server-tls"):
    return [mode, "--server-tls-certificate", certs.server]


# -- server AUTH with swaks, STARTTLS and implicit TLS ------------------------------

@pytest.mark.parametrize("server_mode, swaks_mode", [("--server-tls", "--tls"),
                                                     ("--server-tls-connection", "--tlsc")])
def test_swaks_mechanisms_with_plain_and_md5_secrets(tmp_path, certs, server_mode, swaks_mode):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\nserver md5 bob %s\n"
                    % md5_state("pw-bob"))
    runs = [("alice", "pw-alice", "PLAIN"), ("alice", "pw-alice", "LOGIN"),
            ("alice", "pw-alice", "CRAM-MD5"), ("bob", "pw-bob", "CRAM-MD5")]
    with Relay(tmp_path, tls_args(certs, server_mode) + ["--server-auth", secrets]) as relay:
        for user, password, mech in runs:
            code, out = swaks(relay.port, swaks_mode, "--auth", mech, "--auth-user", user,
                              "--auth-password", password)
            assert code == 0, out
            assert "235 authentication successful" in out
            relay.wait_log(r"info: smtp: authenticated as %s using %s" % (user, mech))
        code, out = swaks(relay.port, swaks_mode, "--auth", "CRAM-MD5", "--auth-user", "bob",
                          "--auth-password", "pw-alice")
        assert code != 0 and "535 authentication failed" in out
        relay.wait_log(r'warning: smtp authentication failed for user "bob" from 127\.0\.0\.1')
        messages = stored(relay.spool)
        log = relay.log()
    assert [env.authentication for _, env, _ in messages] == ["alice"] * 3 + ["bob"]
    for content, env, _ in messages:
        assert b" with ESMTPSA id " in content.split(b"\r\n")[0]
        assert env.client_certificate == ""
    # Credentials never reach the log.
    assert plain_response("alice", "pw-alice") not in log
    assert base64.b64encode(b"pw-alice").decode() not in log


def test_cancelled_auth_and_injection_keep_the_session(tmp_path):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n")
    fake = "x\r\nemailrelay: error: FAKE LINE\r\n"
    with Relay(tmp_path, ["--server-auth", secrets]) as relay:
        c = SmtpChat(relay.port)
        assert "250-AUTH " in c.cmd("EHLO client.test")
        # Cancelled exchanges (RFC 4954 '*'): 501, not counted as failures.
        for mech in ("LOGIN", "CRAM-MD5", "PLAIN"):
            assert c.cmd("AUTH " + mech).startswith("334 ")
            assert c.cmd("*") == "501 authentication cancelled"
        assert c.cmd("AUTH PLAIN *") == "501 authentication cancelled"
        # A user name with CR LF inside the base64, and a NUL in the command line.
        assert c.cmd("AUTH PLAIN " + plain_response(fake, "pw")) == \
            "535 authentication failed"
        assert c.cmd("AUTH PLAIN \0\0=") == "535 authentication failed"
        assert c.cmd("NOOP") == "250 noop"
        assert c.cmd("MAIL FROM:<a@x.test>") == "530 authentication required"
        assert c.cmd("AUTH PLAIN " + plain_response("alice", "pw-alice")) == \
            "235 authentication successful"
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("250 ")
        assert c.cmd("QUIT").startswith("221 ")
        c.close()
        relay.wait_log(r"authenticated as alice using PLAIN")
        log = relay.log()
    assert "FAKE LINE" in log  # logged, but inside the warning line
    assert not any(line.startswith("emailrelay: error: FAKE") for line in log.splitlines())
    assert "\0" not in log and "\r" not in log


def test_three_failures_end_the_session(tmp_path):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n")
    with Relay(tmp_path, ["--server-auth", secrets]) as relay:
        c = SmtpChat(relay.port)
        c.cmd("EHLO client.test")
        bad = "AUTH PLAIN " + plain_response("alice", "wrong")
        assert c.cmd(bad) == "535 authentication failed"
        assert c.cmd(bad) == "535 authentication failed"
        assert c.cmd(bad) == "421 relay.test too many authentication failures"
        assert c.reply() == "<EOF>"
        c.close()


# -- openssl s_client and smtplib ---------------------------------------------------

@pytest.mark.parametrize("server_mode, s_client_args", [
    ("--server-tls", ["-starttls", "smtp"]),
    ("--server-tls-connection", []),
])
def test_openssl_s_client(tmp_path, certs, server_mode, s_client_args):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n")
    script = ("EHLO client.test\nAUTH PLAIN %s\nMAIL FROM:<a@x.test>\nRCPT TO:<b@y.test>\nDATA\n"
              "Subject: s_client\n\nhello\n.\nQUIT\n" % plain_response("alice", "pw-alice"))
    with Relay(tmp_path, tls_args(certs, server_mode) + ["--server-auth", secrets]) as relay:
        r = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % relay.port,
                            "-quiet", "-crlf", "-nocommands"] + s_client_args,
                           input=script, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=30)
        [(content, env, _)] = stored(relay.spool)
    out = r.stdout
    assert "235 authentication successful" in out
    assert "250 message processed" in out and "221 OK" in out
    if not s_client_args:
        assert out.startswith("220 relay.test")  # the greeting came over TLS
    assert env.authentication == "alice"
    assert b"with ESMTPSA" in content and content.endswith(b"Subject: s_client\r\n\r\nhello\r\n")


def test_smtplib_starttls_login_xtext_user_and_envelope(tmp_path, certs):
    secrets = write(tmp_path, "secrets", "server plain alice+20smith pw+2Bx\n")
    with Relay(tmp_path, tls_args(certs) + ["--server-auth", secrets]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            c.starttls(context=client_context())
            c.ehlo("client.test")
            c.login("alice smith", "pw+x")
            c.mail("a@x.test", ["AUTH=alice+20smith"])
            c.rcpt("b@y.test")
            assert c.data(b"Subject: smtplib\r\n\r\nhi\r\n")[0] == 250
        for mech in ("PLAIN", "LOGIN"):
            code, out = swaks(relay.port, "--tls", "--auth", mech, "--auth-user", "alice smith",
                              "--auth-password", "pw+x")
            assert code == 0, out
        messages = stored(relay.spool)
    content, env, raw = messages[0]
    assert env.authentication == "alice smith"
    assert b"X-MailRelay-Authentication: alice+20smith\r\n" in raw
    assert b"X-MailRelay-MailFromAuthIn: alice+20smith\r\n" in raw
    assert re.match(rb"Received: from client\.test \(\[127\.0\.0\.1\]\) \(using TLSv1\.\d with cipher \S+ "
                    rb"\(\d+/\d+ bits\)\) by relay\.test with ESMTPSA id ", content)
    assert [e.authentication for _, e, _ in messages] == ["alice smith"] * 3


def test_tls_required_and_auth_config(tmp_path, certs):
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n")
    args = tls_args(certs) + ["--server-tls-required", "--server-auth", secrets,
                              "--server-auth-config", "m:;a:plain"]
    with Relay(tmp_path, args) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.has_extn("starttls") and not c.has_extn("auth")
            assert c.docmd("MAIL FROM:<a@x.test>") == (530, b"authentication required: use starttls")
            assert c.docmd("AUTH PLAIN " + plain_response("alice", "pw-alice")) == \
                (530, b"encryption required: use starttls")
            c.starttls(context=client_context())
            c.ehlo("client.test")
            assert c.esmtp_features["auth"].strip() == "PLAIN"
            assert c.docmd("AUTH LOGIN")[0] == 504
            c.login("alice", "pw-alice")
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: required\r\n\r\n")
        [(_, env, _)] = stored(relay.spool)
    assert env.authentication == "alice"


# -- trusted addresses ----------------------------------------------------------------

def test_trusted_address_keyword_reaches_the_verifier(tmp_path):
    seen = tmp_path / "seen"
    verifier = write(tmp_path, "verifier", '#!/bin/sh\nprintf "[%%s]" "$@" >> %s\necho >> %s\n'
                     'echo ""\necho "$1"\nexit 1\n' % (seen, seen), mode=0o755)
    secrets = write(tmp_path, "secrets", "server plain alice pw-alice\n"
                    "Server None 127.0.0.2/32 trusted-kw\n")
    with Relay(tmp_path, ["--server-auth", secrets, "--address-verifier", verifier]) as relay:
        c = SmtpChat(relay.port)  # from 127.0.0.1: not trusted
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@x.test>") == "530 authentication required"
        assert c.cmd("AUTH PLAIN " + plain_response("alice", "pw-alice")).startswith("235")
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
        assert c.cmd("RCPT TO:<one@y.test>").startswith("250")
        c.close()
        c = SmtpChat(relay.port, source=("127.0.0.2", 0))
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<t@x.test>").startswith("250")
        assert c.cmd("RCPT TO:<two@y.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd("Subject: trusted\r\n\r\nhi\r\n.") == "250 message processed"
        c.close()
        [(_, env, _)] = stored(relay.spool)
    assert env.from_ == "t@x.test" and env.authentication == ""
    assert seen.read_text().splitlines() == [
        "[one@y.test][relay.test][a@x.test][127.0.0.1][plain][alice]",
        "[two@y.test][relay.test][t@x.test][127.0.0.2][none][trusted-kw]"]


# -- PAM ------------------------------------------------------------------------------

PAM_FILE = "/etc/pam.d/emailrelay"
PAM_PASSWORD = "Pam pw+=1"


@pytest.fixture
def pam_user():
    """A system user with a known password and /etc/pam.d/emailrelay (pam_unix)."""
    if os.geteuid() != 0:
        pytest.fail("the PAM test needs root (CI runs as root)")
    old = None
    if os.path.exists(PAM_FILE):
        with open(PAM_FILE) as f:
            old = f.read()
    with open(PAM_FILE, "w") as f:
        f.write("auth required pam_unix.so nodelay\naccount required pam_permit.so\n")
    user = "erpam" + uuid.uuid4().hex[:8]
    try:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
        try:
            subprocess.run(["chpasswd"], input="%s:%s\n" % (user, PAM_PASSWORD),
                           universal_newlines=True, check=True)
            yield user
        finally:
            subprocess.run(["userdel", user], check=False)
    finally:
        if old is None:
            os.unlink(PAM_FILE)
        else:
            with open(PAM_FILE, "w") as f:
                f.write(old)


def test_pam_through_the_relay(tmp_path, certs, pam_user):
    with Relay(tmp_path, tls_args(certs) + ["--server-auth", "/pam"]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            assert not c.has_extn("auth")
            assert c.docmd("AUTH PLAIN " + plain_response(pam_user, PAM_PASSWORD))[0] == 504
            c.starttls(context=client_context())
            c.ehlo("client.test")
            assert c.esmtp_features["auth"].strip() == "PLAIN"
            assert c.docmd("AUTH PLAIN " + plain_response(pam_user, "wrong")) == \
                (535, b"authentication failed")
            assert c.docmd("AUTH PLAIN " + plain_response(pam_user, PAM_PASSWORD))[0] == 235
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: pam\r\n\r\n")
        code, out = swaks(relay.port, "--tls", "--auth", "PLAIN", "--auth-user", pam_user,
                          "--auth-password", PAM_PASSWORD)
        assert code == 0, out
        messages = stored(relay.spool)
    assert [env.authentication for _, env, _ in messages] == [pam_user, pam_user]


# -- client certificates at the server ---------------------------------------------------

def starttls_session(port, cert):
    """STARTTLS with an optional client certificate, then one message."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.test")
        c.starttls(context=client_context(cert))
        c.ehlo("client.test")
        c.sendmail("a@x.test", ["b@y.test"], b"Subject: cert\r\n\r\n")


def test_client_certificates_at_a_verifying_server(tmp_path, certs):
    args = tls_args(certs) + ["--server-tls-verify", certs.ca]
    with Relay(tmp_path, args) as relay:
        code, out = swaks(relay.port, "--tls", "--tls-cert", certs.client_crt,
                          "--tls-key", certs.client_key)
        assert code == 0, out
        starttls_session(relay.port, certs.client)
        for cert in (None, certs.bad):
            with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
                starttls_session(relay.port, cert)
        wait_for(lambda: relay.log().count("tls error: ") == 2,
                 what="two handshake failures in the log")
        messages = stored(relay.spool)
    assert len(messages) == 2
    for _, env, _ in messages:
        assert same_certificate(env.client_certificate, certs.client_crt)


def test_client_certificate_not_required_without_verify(tmp_path, certs):
    with Relay(tmp_path, tls_args(certs)) as relay:
        starttls_session(relay.port, None)
        starttls_session(relay.port, certs.bad)
        messages = stored(relay.spool)
    assert [env.client_certificate for _, env, _ in messages] == ["", ""]


# -- --tls-config -------------------------------------------------------------------------

def test_tls_config_minimum_version(tmp_path, certs):
    args = tls_args(certs, "--server-tls-connection") + ["--tls-config", "tlsv1.3"]
    with Relay(tmp_path, args) as relay:
        def s_client(version):
            return subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % relay.port,
                                   "-quiet", "-crlf", "-nocommands", version],
                                  input="QUIT\n", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=30)
        old = s_client("-tls1_2")
        new = s_client("-tls1_3")
        relay.wait_log(r"warning: tls error: ")
    assert old.returncode != 0 and "220 " not in old.stdout
    assert new.stdout.startswith("220 relay.test") and "221 OK" in new.stdout


def test_tls_config_unknown_keyword_is_a_startup_error(tmp_path, certs):
    r = run_emailrelay(["--no-daemon", "--no-syslog", "--log", "--spool-dir", str(tmp_path),
                        "--port", str(helpers.free_port()), "--interface", "127.0.0.1",
                        "--user", "root"] + tls_args(certs) + ["--tls-config", "tlsv1.2,sslv9"])
    assert r.returncode != 0 and "server on " not in r.stderr
    assert re.search(r"--tls-config: unknown keyword '?sslv9", r.stderr), r.stderr


# -- SIGHUP and --version ---------------------------------------------------------------

def test_sighup_rereads_the_secrets_file(tmp_path):
    secrets = write(tmp_path, "secrets", "server plain alice old-pw\n")

    def login(password):
        """The reply code to AUTH PLAIN in a new session (smtplib's login would try three)."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            return c.docmd("AUTH PLAIN " + plain_response("alice", password))[0]

    with Relay(tmp_path, ["--server-auth", secrets]) as relay:
        assert (login("old-pw"), login("new-pw")) == (235, 535)
        write(tmp_path, "secrets", "server plain alice new-pw\n")
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_log(r"info: re-read secrets file " + secrets)
        assert (login("new-pw"), login("old-pw")) == (235, 535)


def test_version_verbose_reports_tls_and_pam():
    r = run_emailrelay(["--version", "--verbose"])
    assert r.returncode == 0
    assert "TLS library: %s" % ssl.OPENSSL_VERSION in r.stdout.splitlines()
    assert "PAM: enabled" in r.stdout.splitlines()


# -- the client side: forwarding to relay B ----------------------------------------------

def spool_with_message(tmp_path, name="spool-a"):
    spool = tmp_path / name
    spool.mkdir()
    put_message(spool, b"Subject: forwarded\r\n\r\nbody\r\n")
    return str(spool)


def as_client(port, spool, *args):
    return run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--spool-dir", spool,
                           "--domain", "a.test"] + list(args), timeout=60)


def still_queued(spool):
    """True when the message is still waiting: an .envelope and no .bad."""
    return len(helpers.spool_files(spool, ".envelope")) == 1 and not helpers.spool_files(spool, ".bad")


def failed_with(spool, reason):
    """True when the one message is .bad with a reason starting `reason`; it is then resubmitted."""
    [name] = helpers.spool_files(spool, ".bad")
    path = os.path.join(spool, name)
    with open(path, "rb") as f:
        text = f.read()
    os.rename(path, path[:-len(".bad")])
    return ("X-MailRelay-Reason: " + reason).encode() in text


def test_client_tls_and_auth_to_relay_b(tmp_path, certs):
    server_secrets = write(tmp_path, "server.auth", "server plain carol secret\n")
    clients = {"plain": write(tmp_path, "plain.auth", "client plain carol secret\n"),
               "md5": write(tmp_path, "md5.auth", "client md5 carol %s\n" % md5_state("secret")),
               "wrong": write(tmp_path, "wrong.auth", "client plain carol wrong\n")}
    with Relay(tmp_path, tls_args(certs) + ["--server-auth", server_secrets], name="b") as b:
        spool = spool_with_message(tmp_path, "wrong")
        r = as_client(b.port, spool, "--client-tls", "--client-auth", clients["wrong"])
        assert r.returncode != 0 and "authentication as carol with CRAM-SHA256 refused: 535" in r.stderr
        assert failed_with(spool, "authentication failed: authentication as carol with CRAM-SHA256 refused: 535")
        for kind, mech in (("plain", "CRAM-SHA256"), ("md5", "CRAM-MD5")):
            spool = spool_with_message(tmp_path, kind)
            r = as_client(b.port, spool, "--client-tls", "--client-tls-verify", certs.ca,
                          "--client-auth", clients[kind])
            assert r.returncode == 0, r.stderr
            assert not helpers.spool_files(spool, ".envelope")
            b.wait_log(r"info: smtp: authenticated as carol using %s" % mech)
        wait_for(lambda: len(b.files(".envelope")) == 2, what="two messages at relay B")
        messages = stored(b.spool)
    for content, env, raw in messages:
        assert env.authentication == "carol" and env.mail_from_auth_in == "carol"
        assert re.match(rb"Received: from a\.test \(\[127\.0\.0\.1\]\) \(using TLSv1\.\d with cipher \S+ "
                        rb"\(\d+/\d+ bits\)\) by relay\.test with ESMTPSA id ", content)


def test_client_without_a_common_mechanism_fails_the_message(tmp_path, certs):
    server_secrets = write(tmp_path, "server.auth", "server plain carol secret\n")
    client_secrets = write(tmp_path, "client.auth", "client md5 carol %s\n" % md5_state("secret"))
    args = ["--server-auth", server_secrets, "--server-auth-config", "m:plain,login"]
    with Relay(tmp_path, args, name="b") as b:
        spool = spool_with_message(tmp_path)
        r = as_client(b.port, spool, "--client-auth", client_secrets)
        assert not b.files(".envelope")
    assert r.returncode != 0 and "cannot do authentication" in r.stderr
    assert failed_with(spool, "cannot do authentication: check for a compatible client secret")


def test_client_tls_required_against_a_plain_next_hop(tmp_path):
    with Relay(tmp_path, name="b") as b:
        spool = spool_with_message(tmp_path)
        r = as_client(b.port, spool, "--client-tls-required")
        assert not b.files(".envelope")
    assert r.returncode != 0 and "does not offer STARTTLS" in r.stderr
    assert still_queued(spool)


def test_implicit_tls_with_server_verification(tmp_path, certs):
    good = Relay(tmp_path, tls_args(certs, "--server-tls-connection"), name="good")
    bad = Relay(tmp_path, ["--server-tls-connection", "--server-tls-certificate", certs.bad], name="bad")
    try:
        for relay, ok_args, failing in (
                (good, ["--client-tls-verify", certs.ca, "--client-tls-verify-name", "localhost"],
                 [["--client-tls-verify", certs.bad_crt],
                  ["--client-tls-verify", certs.ca, "--client-tls-verify-name", "other.test"]]),
                (bad, [], [["--client-tls-verify", certs.ca]])):
            spool = spool_with_message(tmp_path, "spool-" + os.path.basename(relay.dir))
            for args in failing:
                r = as_client(relay.port, spool, "--client-tls-connection", *args)
                assert r.returncode != 0
                assert "certificate verification failed" in r.stderr
                assert failed_with(spool, "tls error: certificate verification failed for ")
            r = as_client(relay.port, spool, "--client-tls-connection", *ok_args)
            assert r.returncode == 0, r.stderr
            assert not helpers.spool_files(spool, ".envelope")
            wait_for(lambda: relay.files(".envelope"), what="the message at the next hop")
            [(content, _, _)] = stored(relay.spool)
            assert b" with ESMTPS id " in content
        assert len(stored(good.spool)) == 1
    finally:
        good.stop()
        bad.stop()


def test_client_certificate_presented_to_a_verifying_next_hop(tmp_path, certs):
    """A next hop that refuses our certificate fails the message (.bad), with
    retries or without, TLS 1.3 (the alert comes after the handshake) or 1.2.
    (Without a certificate TLS 1.2 gets a plain handshake failure, which
    may have other causes: that stays temporary.)"""
    args = tls_args(certs) + ["--server-tls-verify", certs.ca]
    with Relay(tmp_path, args, name="b") as b:
        spool = spool_with_message(tmp_path)
        bad = ["--client-tls-certificate", certs.bad]
        for options in ([], ["--retry-interval", "0"], bad, bad + ["--retry-interval", "0"],
                        bad + ["--tls-config", "-tlsv1.2"]):
            r = as_client(b.port, spool, "--client-tls", *options)
            assert r.returncode != 0
            assert "rejected our client certificate" in r.stderr, r.stderr
            [name] = helpers.spool_files(spool, ".bad")
            with open(os.path.join(spool, name), "rb") as f:
                assert f.read().endswith(b"X-MailRelay-ReasonCode:\r\n")
            assert failed_with(spool, "tls error: 127.0.0.1:%d rejected our client certificate: "
                               % b.port)
        r = as_client(b.port, spool, "--client-tls", "--client-tls-certificate", certs.client_key,
                      "--client-tls-certificate", certs.client_crt)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: b.files(".envelope"), what="the message at relay B")
        [(_, env, _)] = stored(b.spool)
    assert same_certificate(env.client_certificate, certs.client_crt)


# -- XOAUTH2 against a scripted responder ---------------------------------------------------

class XoauthResponder:
    """An SMTP responder offering AUTH XOAUTH2 PLAIN; records every command line."""

    def __init__(self):
        self.commands = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            f = conn.makefile("rb")

            def reply(text):
                conn.sendall(text + b"\r\n")
            reply(b"220 responder ready")
            for line in f:
                cmd = line.rstrip(b"\r\n")
                self.commands.append(cmd)
                verb = cmd.split(b" ")[0].upper()
                if verb == b"EHLO":
                    reply(b"250-responder\r\n250-AUTH PLAIN XOAUTH2\r\n250 8BITMIME")
                elif verb == b"AUTH":
                    reply(b"235 2.7.0 accepted")
                elif verb == b"DATA":
                    reply(b"354 go ahead")
                    for text in f:
                        if text == b".\r\n":
                            break
                    reply(b"250 2.0.0 queued")
                elif verb == b"QUIT":
                    reply(b"221 bye")
                    return
                else:
                    reply(b"250 ok")

    def close(self):
        self.sock.close()


def test_xoauth2_bearer_token(tmp_path):
    secrets = write(tmp_path, "client.auth", "client oauth me@gmail.test ya29.token-123\n")
    responder = XoauthResponder()
    try:
        spool = spool_with_message(tmp_path)
        r = as_client(responder.port, spool, "--client-auth", secrets)
        assert r.returncode == 0, r.stderr
        responder.thread.join(10)
    finally:
        responder.close()
    expected = base64.b64encode(b"user=me@gmail.test\x01auth=Bearer ya29.token-123\x01\x01")
    auth = [c for c in responder.commands if c.upper().startswith(b"AUTH")]
    assert auth == [b"AUTH XOAUTH2 " + expected]
    assert any(c.startswith(b"MAIL FROM:<a@x.test>") for c in responder.commands)
    assert not helpers.spool_files(spool, ".envelope")
