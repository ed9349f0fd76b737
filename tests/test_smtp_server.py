"""The SMTP server end to end: the real program, real clients, raw sockets.

Clients: smtplib, swaks (with --pipeline), curl smtp://, smtp-source. Also
the smuggling sequences over a raw socket, filters and verifiers as real
programs, and a SIGKILL crash test.
"""

import os
import random
import smtplib
import socket
import stat
import subprocess
import threading

import pytest

from helpers import Relay, spool_files, wait_for
from emailrelay.store import envelope


def committed(spool):
    """{id: (content bytes, Envelope)} for every committed message."""
    out = {}
    for name in spool_files(spool, ".envelope"):
        mid = name[:-len(".envelope")]
        env = envelope.Envelope.read(os.path.join(spool, name))
        with open(os.path.join(spool, mid + ".content"), "rb") as f:
            out[mid] = (f.read(), env)
    return out


def raw_session(port, data, timeout=10):
    """Sends `data` in one write after the greeting; returns everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        greeting = f.readline()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return greeting + f.read()


def test_smtplib_message_and_log_line(tmp_path):
    with Relay(tmp_path) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            code, text = c.ehlo("client.test")
            assert code == 250 and b"PIPELINING" in text and b"CHUNKING" not in text
            c.sendmail("a@x.test", ["b@y.test", "c@y.test"], b"Subject: t\r\n\r\nhello\r\n")
        [(content, env)] = committed(relay.spool).values()
        relay.wait_log(r"info: smtp: stored emailrelay\.\S+: from=<a@x.test> nrcpt=2 size=%d "
                       r"client=127\.0\.0\.1:\d+\n" % len(content))
    assert content.startswith(b"Received: from client.test ([127.0.0.1]) by relay.test with ESMTP id ")
    assert content.endswith(b"Subject: t\r\n\r\nhello\r\n")
    assert env.to_remote == ["b@y.test", "c@y.test"] and env.client == "127.0.0.1"


def test_swaks_pipeline_and_curl(tmp_path):
    msg = tmp_path / "msg.txt"
    msg.write_bytes(b"Subject: curl\r\n\r\n.dot line\r\nbody\r\n")
    with Relay(tmp_path) as relay:
        out = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % relay.port, "--pipeline",
                              "--from", "a@x.test", "--to", "b@y.test", "--body", "swaks body"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
                             universal_newlines=True)
        assert out.returncode == 0, out.stdout
        assert "<-  250 message processed" in out.stdout
        out = subprocess.run(["curl", "-s", "smtp://127.0.0.1:%d" % relay.port, "--mail-from", "c@x.test",
                              "--mail-rcpt", "d@y.test", "-T", str(msg)], timeout=30)
        assert out.returncode == 0
        messages = committed(relay.spool).values()
    by_from = {env.from_: content for content, env in messages}
    assert b"swaks body" in by_from["a@x.test"]
    assert by_from["c@x.test"].endswith(b"Subject: curl\r\n\r\n.dot line\r\nbody\r\n")


def test_smtp_source_1000_messages_over_20_sessions(tmp_path):
    with Relay(tmp_path, ["--max-connections-per-address", "100"]) as relay:
        subprocess.run(["smtp-source", "-s", "20", "-m", "1000", "-l", "4096", "-f", "a@x.test",
                        "-t", "b@y.test", "127.0.0.1:%d" % relay.port], check=True, timeout=120)
        messages = committed(relay.spool)
    assert len(messages) == 1000
    # smtp-source's headers vary (Date, Message-Id); its body text does not.
    bodies = {content.split(b"\r\n\r\n", 1)[1] for content, _ in messages.values()}
    assert len(bodies) == 1
    body = bodies.pop()
    assert len(body) > 4000 and body.startswith(b"1XXXX") and body.endswith(b"X\r\n")
    assert not relay.files(".new") and not relay.files(".bad")


@pytest.mark.parametrize("seq", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n.\r", b"\r\n.\n",
                                 b"\r\n\x00.\r\n"])
def test_smuggling_over_a_socket(tmp_path, seq):
    with Relay(tmp_path) as relay:
        data = (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
                b"one" + seq + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nevil\r\n"
                b".\r\nQUIT\r\n")
        reply = raw_session(relay.port, data)
        messages = committed(relay.spool)
    assert reply.count(b"250 message processed\r\n") == 1
    [(content, env)] = messages.values()
    assert env.from_ == "a@x.test"
    assert b"MAIL FROM:<evil@x.test>" in content and content.endswith(b"evil\r\n")


def test_line_limits_over_a_socket(tmp_path):
    with Relay(tmp_path) as relay:
        data = (b"NOOP " + b"x" * 600 + b"\r\nEHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                b"DATA\r\n" + b"y" * 5000 + b"\r\n.\r\nQUIT\r\n")
        reply = raw_session(relay.port, data)
        [(content, _)] = committed(relay.spool).values()
    # Only commands are limited (512 octets); a 5,000-character text line is stored.
    assert reply.count(b"500 line too long") == 1
    assert content.endswith(b"\r\n" + b"y" * 5000 + b"\r\n")
    assert reply.endswith(b"250 message processed\r\n221 OK\r\n")


def test_limit_options(tmp_path):
    args = ["--size", "100", "--max-recipients", "100", "--max-bounce-recipients", "1",
            "--max-bad-commands", "2"]
    with Relay(tmp_path, args) as relay:
        rcpts = b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(101))
        reply = raw_session(relay.port, b"EHLO c\r\nMAIL FROM:<a@x.test> SIZE=101\r\nMAIL FROM:<a@x.test>\r\n"
                            + rcpts + b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\n"
                            b"RSET\r\nBAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
        assert b"250-SIZE 100\r\n" in reply
        assert reply.count(b"552 message size exceeds fixed maximum message size") == 1
        assert reply.count(b"452 too many recipients\r\n") == 1
        assert reply.count(b"452 too many recipients for a bounce message") == 1
        assert reply.endswith(b"421 relay.test too many errors, closing connection\r\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("c")
            c.mail("a@x.test")  # no SIZE=: the limit is found during DATA
            c.rcpt("b@y.test")
            assert c.data(b"x" * 200)[0] == 552
        assert not relay.files(".content")
    with Relay(tmp_path, ["--min-free-space", str(10 ** 12)], name="full") as relay:
        reply = raw_session(relay.port, b"HELO c\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n")
        assert b"452 insufficient system storage" in reply


def test_idle_timeout(tmp_path):
    with Relay(tmp_path, ["--idle-timeout", "1"]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            assert f.readline() == b"421 relay.test idle timeout\r\n"
            assert f.readline() == b""


def write_script(path, text):
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("spec,code,text,kept", [
    ("exit:0", 250, None, 1),
    ("exit:1", 452, None, 0),
    ("exit:100", 250, None, None),
    ("exit:103", 250, None, 1),
])
def test_filter_exit_codes(tmp_path, spec, code, text, kept):
    with Relay(tmp_path, ["--filter", spec]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("c")
            c.mail("a@x.test")
            c.rcpt("b@y.test")
            got = c.data(b"hi\r\n")
        assert got[0] == code
        if kept is not None:
            assert len(relay.files(".envelope")) == kept
            assert not relay.files(".new")


def test_filter_program_reason_and_arguments(tmp_path):
    args_file = tmp_path / "args"
    flt = write_script(tmp_path / "filter", 'printf "%s\\n" "$@" > ' + str(args_file)
                       + '\necho "<<spam; rm -rf / \\$(x)>>"\nexit 7\n')
    with Relay(tmp_path, ["--filter", flt]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("c")
            c.mail("a$(touch /tmp/pwned)@x.test")
            c.rcpt("b;ls@y.test")
            code, text = c.data(b"hi\r\n")
        assert (code, text) == (452, b"spam; rm -rf / $(x)")
        assert not relay.files(".content")
    args = args_file.read_text().splitlines()
    assert args[-2].endswith(".content") and args[-1].endswith(".envelope.new")


def test_seed_filter_reads_the_client_address_from_the_envelope(tmp_path):
    """Seed 000's example filter: awk prints X-MailRelay-Client's value and
    compares it with an IP address. (The envelope's lines end in CRLF, in
    E-MailRelay too, so the CR is removed before the comparison.)"""
    f = write_script(tmp_path / "filter", r"""
content="${1}"
envelope="`echo \"${content}\" | sed 's/content/envelope.new/'`"
ip="`awk '/MailRelay-Client:/ {print $2;exit}' \"${envelope}\" | tr -d '\r'`"
if test "${ip}" = "127.0.0.1"
then
    exit 0
fi
echo "<<not from 127.0.0.1: ${ip}>>"
exit 1
""")
    with Relay(tmp_path, ["--filter", f]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.sendmail("a@x.test", ["b@y.test"], b"Subject: hi\r\n\r\nbody\r\n")
        [(_, env)] = committed(relay.spool).values()
    assert env.client == "127.0.0.1"


def test_verifier_program_exit_codes_and_plain_arguments(tmp_path):
    seen = tmp_path / "seen"
    v = write_script(tmp_path / "verifier", """
if test "$1" = --emailrelay-version ; then echo 2.0 ; exit 0 ; fi
printf '[%s]' "$@" >> """ + str(seen) + """ ; echo >> """ + str(seen) + """
case "$1" in
local*) echo "Local User" ; echo postmaster ; exit 0 ;;
bad*) echo "no such user $1" ; exit 2 ;;
tmp*) echo "try later" ; exit 3 ;;
kill*) exit 100 ;;
*) echo "" ; echo "$1" ; exit 1 ;;
esac
""")
    with Relay(tmp_path, ["--address-verifier", v]) as relay:
        reply = raw_session(relay.port, b"EHLO c\r\nMAIL FROM:<a`id`@x.test>\r\n"
                            b"RCPT TO:<local@y.test>\r\nRCPT TO:<bad@y.test>\r\nRCPT TO:<tmp@y.test>\r\n"
                            b"RCPT TO:<\"$(touch x);|&\"@y.test>\r\nRCPT TO:<a\rb@y.test>\r\n"
                            b"DATA\r\nhi\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<kill@y.test>\r\nNOOP\r\n")
        assert b"550 no such user bad@y.test" in reply
        assert b"450 try later" in reply
        assert b"550 invalid character in mailbox name" in reply
        assert reply.count(b"250 message processed\r\n") == 1
        assert reply.rstrip().endswith(b"250 sender <a@x.test> OK")  # then dropped
        [local] = relay.files(".envelope.local")
        env = envelope.Envelope.read(os.path.join(relay.spool, local))
    assert env.to_local == ["postmaster"] and env.to_remote == ['"$(touch x);|&"@y.test']
    lines = seen.read_text().splitlines()
    assert lines[3] == '["$(touch x);|&"@y.test][relay.test][a`id`@x.test][127.0.0.1][none][]'
    assert not any("a\rb" in x for x in lines)


def test_verifier_rewrites_the_remote_address_and_other_exits_reject(tmp_path):
    """Seed 000: exit 1's second line is the address to use; any other
    non-zero exit rejects with the output as the reason."""
    v = write_script(tmp_path / "verifier", """
if test "$1" = --emailrelay-version ; then echo 2.0 ; exit 0 ; fi
case "$1" in
alias*) echo "" ; echo "alice@here.test" ; exit 1 ;;
list*) echo "no such list: $1" ; exit 5 ;;
*) echo "" ; echo "$1" ; exit 1 ;;
esac
""")
    with Relay(tmp_path, ["--address-verifier", v]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("a@x.test")
            assert s.rcpt("list@y.test") == (550, b"no such list: list@y.test")
            assert s.rcpt("alias@y.test")[0] == 250
            assert s.rcpt("bob@y.test")[0] == 250
            assert s.data(b"Subject: hi\r\n\r\nbody\r\n")[0] == 250
        [(_, env)] = committed(relay.spool).values()
    assert env.to_remote == ["alice@here.test", "bob@y.test"]


def test_crash_kills_lose_no_acknowledged_message(tmp_path):
    relay = Relay(tmp_path, ["--max-connections-per-address", "100"])
    acknowledged = set()
    lock = threading.Lock()
    rng = random.Random(1)
    try:
        for round_ in range(3):
            stop = threading.Event()

            def client(n):
                # The 250 reply has no message id (E-MailRelay's text): each
                # body starts with a token of its own instead.
                seq = 0
                while not stop.is_set():
                    seq += 1
                    token = b"round %d client %d message %d" % (round_, n, seq)
                    body = (token + b"\r\n") * rng.randint(1, 3000)
                    try:
                        with smtplib.SMTP("127.0.0.1", relay.port, timeout=5) as c:
                            c.ehlo("c")
                            c.mail("a@x.test")
                            c.rcpt("b@y.test")
                            code, text = c.data(body)
                    except (OSError, smtplib.SMTPException):
                        continue
                    if code == 250:
                        with lock:
                            acknowledged.add((token, len(body)))
            threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            count = len(acknowledged)
            wait_for(lambda: len(acknowledged) >= count + rng.randint(3, 15), 20, what="messages")
            relay.kill()
            stop.set()
            for t in threads:
                t.join()
            messages = committed(relay.spool)
            by_token = {content.split(b"\r\n")[1]: content for content, _ in messages.values()}
            for token, size in acknowledged:
                assert token in by_token, "acknowledged message %r lost" % token
                assert len(by_token[token].split(b"\r\n", 1)[1]) == size
            for mid, (content, env) in messages.items():
                assert content.startswith(b"Received: ") and content.endswith(b"\r\n")
                assert env.from_ == "a@x.test"
            relay.start()
    finally:
        relay.stop()


@pytest.fixture
def certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=relay.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pem = tmp_path / "server.pem"
    pem.write_bytes(key.read_bytes() + cert.read_bytes())
    return str(pem)


def test_starttls_then_auth_with_swaks_and_esmtpsa(tmp_path, certificate):
    secrets = tmp_path / "secrets"
    secrets.write_text("server plain alice secret\n")
    args = ["--server-tls", "--server-tls-certificate", certificate, "--server-auth", str(secrets),
            "--server-tls-required"]
    with Relay(tmp_path, args) as relay:
        base = ["swaks", "--server", "127.0.0.1:%d" % relay.port, "--from", "a@x.test",
                "--to", "b@y.test", "--auth", "PLAIN", "--auth-user", "alice"]
        out = subprocess.run(base + ["--auth-password", "secret", "--tls"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        assert out.returncode == 0, out.stdout
        assert "<~  235 authentication successful" in out.stdout
        out = subprocess.run(base + ["--auth-password", "secret"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        assert out.returncode != 0 and "*** Host did not advertise authentication" in out.stdout
        assert "AUTH" not in out.stdout.split("Host did not advertise")[1]
        out = subprocess.run(base + ["--auth-password", "wrong", "--tls"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        assert "<~* 535 authentication failed" in out.stdout
        relay.wait_log(r'warning: smtp authentication failed for user "alice" from 127\.0\.0\.1')
        [(content, env)] = committed(relay.spool).values()
    assert b" with ESMTPSA id " in content.split(b"\r\n")[0]
    assert env.authentication == "alice"


def test_starttls_discards_pipelined_commands(tmp_path, certificate):
    import ssl
    with Relay(tmp_path, ["--server-tls", "--server-tls-certificate", certificate]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO c\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\nRSET\r\n")
            assert f.readline() == b"220 ready to start tls\r\n"
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(s) as t:
                t.sendall(b"MAIL FROM:<a@x.test>\r\nEHLO c\r\nQUIT\r\n")
                data = b""
                while True:
                    chunk = t.recv(4096)
                    if not chunk:
                        break
                    data += chunk
    # No reply to the injected RSET; EHLO state was reset, so MAIL is out of sequence.
    assert data.startswith(b"503 command out of sequence -- use RSET to resynchronise\r\n250-")
    assert b"STARTTLS" not in data and data.endswith(b"221 OK\r\n")
