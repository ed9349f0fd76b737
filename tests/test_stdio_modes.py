"""ZMailer smtpserver's operating modes, through the real program.

--bsmtp with batch files from the shell (accepted, refused and malformed
transactions, the exit status), --test-address changing the open-relay
decision, the trusted lines and the verifier's client-ip, --inetd spawned
by socat (EXEC:, SYSTEM: over pipes, nofork on the TCP socket) and by
systemd-socket-activate (--inetd --accept), and systemd socket activation
(LISTEN_FDS, Accept=no) of the daemon.
"""

import os
import re
import shlex
import smtplib
import socket
import subprocess

from helpers import PYTHON, ROOT, env, free_port, spool_files, stop_process, wait_for

from emailrelay.store import envelope

BASE = ["--no-syslog", "--domain", "relay.test", "--user", "root"]


def write(path, text, mode=0o644):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def crlf(*lines):
    return "".join(x + "\r\n" for x in lines)


def bsmtp(tmp_path, batch, *args):
    """Runs `emailrelay --bsmtp ... < batch` from the shell; returns (status, replies, stderr)."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    path = tmp_path / "batch"
    path.write_bytes(batch.encode())
    command = " ".join(shlex.quote(x) for x in [PYTHON, "-m", "emailrelay", "--bsmtp",
                                                "--spool-dir", str(spool)] + BASE + list(args))
    ran = subprocess.run(["sh", "-c", command + " < " + shlex.quote(str(path))], cwd=ROOT,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    replies = [x for x in ran.stdout.decode().split("\r\n") if x]
    return ran.returncode, replies, ran.stderr.decode()


def stored(spool):
    """[(envelope, content)] for every committed message in `spool`."""
    result = []
    for name in spool_files(str(spool), ".envelope"):
        with open(os.path.join(str(spool), name), "rb") as f:
            env_ = envelope.Envelope.parse(f.read())
        with open(os.path.join(str(spool), name[:-len(".envelope")] + ".content"), "rb") as f:
            result.append((env_, f.read()))
    return result


MESSAGE = ("MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>", "DATA", "Subject: batch", "", "hello", ".")


def test_bsmtp_clean_batch_stores_every_message_and_exits_0(tmp_path):
    status, replies, _ = bsmtp(tmp_path, crlf("EHLO batch.test", *MESSAGE, *MESSAGE, "QUIT"))
    assert status == 0
    assert replies[0] == "220 relay.test -- E-MailRelay V%s -- Service ready" % __import__(
        "emailrelay").__version__
    assert replies.count("250 message processed") == 2
    assert replies[-1] == "221 OK"
    messages = stored(tmp_path / "spool")
    assert len(messages) == 2
    env_, content = messages[0]
    assert env_.from_ == "a@x.test" and env_.to_remote == ["b@y.test"]
    assert env_.client == "127.0.0.1"
    assert content.startswith(b"Received: from batch.test ([127.0.0.1]) by relay.test with ESMTP id ")
    assert b"Subject: batch\r\n\r\nhello\r\n" in content


def test_bsmtp_accepted_refused_and_malformed_transactions(tmp_path):
    verifier = write(tmp_path / "verifier",
                     '#!/bin/sh\ncase "$1" in bad@*) echo "no such user"; exit 2;; esac\n'
                     'echo ""; echo "$1"; exit 1\n', 0o755)
    batch = crlf("EHLO batch.test",
                 *MESSAGE,                                        # accepted
                 "MAIL FROM:<a@x.test", "RSET",                   # malformed
                 "MAIL FROM:<a@x.test>", "RCPT TO:<bad@y.test>",  # refused
                 "RSET", "QUIT")
    status, replies, err = bsmtp(tmp_path, batch, "--address-verifier", verifier)
    assert status == 1
    assert "553 mailbox name not allowed: missing or invalid angle brackets in mailbox name" in replies
    assert "550 no such user" in replies
    assert "not every transaction was accepted: 1 message stored, 2 commands refused" in err
    assert len(stored(tmp_path / "spool")) == 1


def test_bsmtp_batch_ending_inside_data_stores_nothing_and_fails(tmp_path):
    status, replies, err = bsmtp(tmp_path, crlf("HELO batch.test", *MESSAGE[:-1]))
    assert status == 1
    assert replies[-1].startswith("354")
    assert "input ended inside a transaction" in err
    assert os.listdir(str(tmp_path / "spool")) == []


def test_test_address_changes_the_open_relay_decision(tmp_path):
    batch = crlf("EHLO batch.test", *MESSAGE, "QUIT")
    status, replies, err = bsmtp(tmp_path, batch, "--test-address", "[192.0.2.1]")
    assert (status, replies) == (1, ["554 no SMTP service for your address"])
    assert "connection refused from non-local address 192.0.2.1 (see --remote-clients)" in err
    status, replies, _ = bsmtp(tmp_path, batch, "--test-address", "[IPv6:2001:db8::1]")
    assert (status, replies) == (1, ["554 no SMTP service for your address"])
    assert stored(tmp_path / "spool") == []

    status, _, _ = bsmtp(tmp_path, batch, "--test-address", "[10.1.2.3]")   # a private address
    assert status == 0
    status, _, _ = bsmtp(tmp_path, batch, "--test-address", "[IPv6:2001:db8::1]",
                         "--remote-clients")
    assert status == 0
    clients = sorted((e.client, c.split(b" by ")[0]) for e, c in stored(tmp_path / "spool"))
    assert clients == [("10.1.2.3", b"Received: from batch.test ([10.1.2.3])"),
                       ("2001:db8::1", b"Received: from batch.test ([IPv6:2001:db8::1])")]


def test_test_address_reaches_trusted_lines_and_the_verifier(tmp_path):
    seen = tmp_path / "seen"
    verifier = write(tmp_path / "verifier", '#!/bin/sh\nprintf "[%%s]" "$@" >> %s\necho >> %s\n'
                     'echo ""; echo "$1"; exit 1\n' % (seen, seen), 0o755)
    secrets = write(tmp_path / "secrets", "server plain alice pw-alice\n"
                    "server none 192.0.2.0/24 friends\n")
    args = ["--remote-clients", "--server-auth", secrets, "--address-verifier", verifier]
    batch = crlf("EHLO batch.test", *MESSAGE, "QUIT")
    status, replies, _ = bsmtp(tmp_path, batch, "--test-address", "[192.0.2.7]", *args)
    assert status == 0, replies
    status, replies, _ = bsmtp(tmp_path, batch, "--test-address", "[198.51.100.1]", *args)
    assert status == 1
    assert "530 authentication required" in replies
    assert seen.read_text().splitlines() == [
        "[b@y.test][relay.test][a@x.test][192.0.2.7][none][friends]"]


def test_test_address_syntax_is_checked(tmp_path):
    for bad in ("1.2.3.4", "[1.2.3.4", "[IPv6:1.2.3.4]", "[::1]", "[999.1.1.1]"):
        status, _, err = bsmtp(tmp_path, "", "--test-address", bad)
        assert status == 2 and "--test-address:" in err, bad
    status, _, err = bsmtp(tmp_path, "", "--test-address", "[1.2.3.4]", "--inetd")
    assert status == 2 and "--inetd and --bsmtp cannot be used together" in err


# -- --inetd ------------------------------------------------------------------------------

def emailrelay_command(spool, log, *args):
    return " ".join(shlex.quote(x) for x in [PYTHON, "-m", "emailrelay", "--inetd", "--log",
                                             "--verbose", "--log-file", str(log), "--spool-dir",
                                             str(spool)] + BASE + list(args))


class Spawner:
    """A socat or systemd-socket-activate process that runs the program per connection."""

    def __init__(self, argv, port, extra_env=None):
        e = env()
        e.update(extra_env or {})
        self.port = port
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_for(self._listening, what="spawner to listen on %d" % port)

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError("spawner exited: %s" % self.proc.stderr.read().decode())
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        return any(r[1].endswith(":%04X" % self.port) and r[3] == "0A" for r in rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stop_process(self.proc)


def send_one(port, subject="inetd"):
    """One message through smtplib; returns the greeting and the DATA reply."""
    with smtplib.SMTP(timeout=30) as c:
        _, greeting = c.connect("127.0.0.1", port)
        code, text = c.ehlo("client.test")
        assert code == 250
        c.mail("a@x.test")
        c.rcpt("b@y.test")
        reply = c.data(("Subject: %s\r\n\r\nhi\r\n" % subject).encode())
        return greeting, reply


def wait_stored(spool, n=1):
    return wait_for(lambda: len(stored(spool)) >= n and stored(spool), what="stored message")


def test_inetd_under_socat_exec_counts_a_socketpair_as_unknown(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "log"
    port = free_port()
    command = emailrelay_command(spool, log)
    with Spawner(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                  "EXEC:%s" % command.replace(":", "\\:")], port):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            assert s.makefile("rb").readline() == b"554 no SMTP service for your address\r\n"
    assert "inetd: connection refused from non-local address unknown" in log.read_text()

    command = emailrelay_command(spool, log, "--test-address", "[127.0.0.1]")
    with Spawner(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                  "EXEC:%s" % command.replace(":", "\\:")], port):
        _, reply = send_one(port)
        assert reply[0] == 250
    [(env_, content)] = wait_stored(spool)
    assert env_.client == "127.0.0.1"
    assert content.startswith(b"Received: from client.test ([127.0.0.1]) by relay.test")


def test_inetd_under_socat_system_over_pipes_with_remote_clients(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "log"
    port = free_port()
    command = emailrelay_command(spool, log, "--remote-clients")
    with Spawner(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                  "SYSTEM:%s,pipes" % command.replace(":", "\\:").replace(",", "\\,")], port):
        greeting, reply = send_one(port)
        assert reply[0] == 250
    [(env_, content)] = wait_stored(spool)
    assert env_.client == "unknown"
    assert content.startswith(b"Received: from client.test (unknown) by relay.test")
    assert "inetd: session with client address unknown" in log.read_text()


def test_inetd_on_a_tcp_socket_takes_the_peer_address(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "log"
    port = free_port()
    command = emailrelay_command(spool, log)
    with Spawner(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                  "EXEC:%s,nofork" % command.replace(":", "\\:")], port):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            probe.connect(("127.0.0.1", port))
            f = probe.makefile("rwb")
            assert f.readline().startswith(b"220 relay.test")
            for line in (b"EHLO client.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>",
                         b"DATA", b"Subject: tcp\r\n\r\nhi\r\n.", b"QUIT"):
                f.write(line + b"\r\n")
                f.flush()
            rest = f.read()
    assert b"250 message processed" in rest
    [(env_, _)] = wait_stored(spool)
    assert env_.client == "127.0.0.1"


def test_inetd_under_systemd_socket_activate_accept(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "log"
    port = free_port()
    argv = shlex.split(emailrelay_command(spool, log))
    with Spawner(["systemd-socket-activate", "--inetd", "--accept", "-l", "127.0.0.1:%d" % port,
                  "-E", "PYTHONPATH=" + ROOT] + argv, port):
        for n in (1, 2):
            greeting, reply = send_one(port, subject="activated %d" % n)
            assert reply[0] == 250
        messages = wait_stored(spool, 2)
    assert greeting.startswith(b"relay.test -- E-MailRelay")
    assert all(e.client == "127.0.0.1" for e, _ in messages)
    assert all(c.startswith(b"Received: from client.test ([127.0.0.1])") for _, c in messages)


# -- socket activation (Accept=no) --------------------------------------------------------

def test_daemon_serves_sockets_from_systemd_socket_activation(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "log"
    smtp_port, pop_port = free_port(), free_port()
    pop_secrets = write(tmp_path / "pop.auth", "server plain pat pw-pat\n")
    argv = [PYTHON, "-m", "emailrelay", "--no-daemon", "--log", "--log-file", str(log),
            "--spool-dir", str(spool), "--pop", "--pop-auth", pop_secrets,
            "--port", str(free_port())] + BASE
    with Spawner(["systemd-socket-activate", "-l", "127.0.0.1:%d" % smtp_port,
                  "-l", "127.0.0.1:%d" % pop_port, "--fdname=smtp:pop",
                  "-E", "PYTHONPATH=" + ROOT] + argv, smtp_port) as spawner:
        # The first connection starts the program, which accepts it.
        _, reply = send_one(smtp_port)
        assert reply[0] == 250
        text = log.read_text()
        assert "smtp server on 127.0.0.1:%d" % smtp_port in text
        assert "pop server on 127.0.0.1:%d" % pop_port in text
        assert len(re.findall(r"\b(smtp|pop|admin) server on ", text)) == 2
        import poplib
        p = poplib.POP3("127.0.0.1", pop_port, timeout=30)
        p.user("pat")
        p.pass_("pw-pat")
        assert p.stat()[0] == 1
        p.quit()
        spawner.proc.terminate()
        assert spawner.proc.wait(15) == 0


def test_inetd_with_implicit_tls(tmp_path, certs):
    import ssl
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "log"
    port = free_port()
    command = emailrelay_command(spool, log, "--server-tls-connection",
                                 "--server-tls-certificate", certs.server)
    context = ssl.create_default_context(cafile=certs.ca)
    with Spawner(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                  "EXEC:%s,nofork" % command.replace(":", "\\:")], port):
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=context) as c:
            c.sendmail("a@x.test", ["b@y.test"], b"Subject: smtps\r\n\r\nhi\r\n")
    [(_, content)] = wait_stored(spool)
    assert re.match(rb"Received: from \S+ \(\[127\.0\.0\.1\]\) \(using TLSv1\.[23] with cipher "
                    rb"\S+ \(\d+/\d+ bits\)\) by relay\.test with ESMTPS id ", content)
