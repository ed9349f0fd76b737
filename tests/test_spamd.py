"""`spam:` and `spam-edit:` filters against a real SpamAssassin spamd."""

import os
import signal
import smtplib
import subprocess

import pytest

from emailrelay.policy import spamc
from helpers import Relay, free_port, wait_port

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM = b"Subject: lunch\r\nFrom: a@x.test\r\nTo: b@y.test\r\n\r\nShall we meet at noon?\r\n"
SPAM = b"Subject: offer\r\nFrom: a@x.test\r\nTo: b@y.test\r\n\r\n" + GTUBE + b"\r\n"


class Spamd:
    """spamd on a free port, in a process group of its own."""

    def __init__(self, directory):
        self.port = free_port()
        self.log = open(os.path.join(directory, "spamd.log"), "wb")
        self.proc = subprocess.Popen(
            ["spamd", "--listen=127.0.0.1:%d" % self.port, "--allowed-ips=127.0.0.1",
             "-u", "nobody", "--max-children=2"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        wait_port(self.port, timeout=60)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    d = Spamd(str(tmp_path_factory.mktemp("spamd")))
    yield d
    d.stop()


def send(smtp, message):
    smtp.mail("a@x.test")
    smtp.rcpt("b@y.test")
    code, text = smtp.data(message)
    return code, text.decode()


def stored(relay):
    """The stored contents, in order."""
    out = []
    for name in relay.files(".envelope"):
        with open(os.path.join(relay.spool, name.replace(".envelope", ".content")), "rb") as f:
            out.append(f.read())
    return out


def test_spam_rejects_spam_and_leaves_ham_unchanged(tmp_path, spamd):
    with Relay(tmp_path, ["--filter", "spam:127.0.0.1:%d" % spamd.port]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
            s.ehlo("client.test")
            code, text = send(s, SPAM)
            assert code == 452 and "rejected" in text
            code, text = send(s, HAM)
            assert code == 250, text
        relay.wait_log(r"filter spam:127.0.0.1:\d+: rejected: spam: True ; [0-9.]+ / 5\.0")
        [content] = stored(relay)
    assert b"X-Spam" not in content and content.endswith(HAM)


def test_spam_edit_marks_up_spam_and_never_rejects(tmp_path, spamd):
    with Relay(tmp_path, ["--filter", "spam-edit:127.0.0.1:%d" % spamd.port]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
            s.ehlo("client.test")
            assert send(s, SPAM)[0] == 250
            assert send(s, HAM)[0] == 250
        spam, ham = stored(relay)
        assert not [n for n in os.listdir(relay.spool) if n.endswith(".spamd")]
    assert b"X-Spam-Flag: YES\r\n" in spam and GTUBE in spam
    assert b"X-Spam-Status: No" in ham and b"Shall we meet at noon?" in ham
    for content in (spam, ham):
        assert content.count(b"\n") == content.count(b"\r\n")


def test_client_side_spam_filter_fails_spam(tmp_path, spamd):
    from helpers import run_emailrelay, smtp_sink, stop_process
    with Relay(tmp_path) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
            s.ehlo("client.test")
            assert send(s, SPAM)[0] == 250
    port = free_port()
    sink = smtp_sink(port)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--user", "root", "--spool-dir", relay.spool,
                            "--client-filter", "spam:127.0.0.1:%d" % spamd.port])
    finally:
        stop_process(sink)
    assert r.returncode == 1
    [bad] = relay.files(".envelope.bad")
    with open(os.path.join(relay.spool, bad), "rb") as f:
        assert b"X-MailRelay-Reason: spam: True ; " in f.read()


def test_too_big_for_spamd_passes_unscanned(tmp_path, spamd):
    big = SPAM + (b"x" * 998 + b"\r\n") * (spamc.MAX_SIZE // 1000 + 10)
    with Relay(tmp_path, ["--filter", "spam:127.0.0.1:%d" % spamd.port]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
            s.ehlo("client.test")
            code, text = send(s, big)
        assert code == 250, text
        relay.wait_log(r"passed without a spam check")
        assert len(stored(relay)) == 1


def test_spamd_stopped_mid_session_is_a_temporary_failure(tmp_path):
    own = Spamd(str(tmp_path))
    try:
        with Relay(tmp_path, ["--filter", "spam-edit:127.0.0.1:%d" % own.port,
                              "--filter-timeout", "5"]) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
                s.ehlo("client.test")
                assert send(s, HAM)[0] == 250
                own.stop()
                code, text = send(s, HAM)
                assert code // 100 == 4, text
            relay.wait_log(r"warning: filter spam-edit:\S+: spamd interaction failed: "
                           r"cannot connect .*refused")
            assert len(stored(relay)) == 1
            assert not [n for n in os.listdir(relay.spool) if n.endswith((".spamd", ".new"))]
    finally:
        own.stop()


def test_slow_spamd_is_a_temporary_failure(tmp_path):
    import socket
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with Relay(tmp_path, ["--filter", "spam:127.0.0.1:%d" % port,
                              "--filter-timeout", "1"]) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
                s.ehlo("client.test")
                code, text = send(s, HAM)
            assert code // 100 == 4, text
            relay.wait_log(r"spamd interaction failed: .*timeout")
            assert stored(relay) == []


def test_answer_cut_short_leaves_the_old_content(tmp_path):
    import socket
    import threading
    content = tmp_path / "m.content"
    content.write_bytes(HAM)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            while conn.recv(65536):
                pass
            conn.sendall(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.1 / 5.0\r\n"
                         b"Content-length: 5000\r\n\r\nX-Spam-Status: No\r\n")
    t = threading.Thread(target=serve)
    t.start()
    from emailrelay.policy import requestclient
    location = requestclient.Location.parse("127.0.0.1:%d" % listener.getsockname()[1])
    with pytest.raises(spamc.SpamError, match="closed the connection early"):
        spamc.check(location, str(content), 10, edit=True)
    t.join()
    listener.close()
    assert content.read_bytes() == HAM
    assert os.listdir(str(tmp_path)) == ["m.content"]


# -- seed 000's privilege model: a root-only spool, the default --user daemon ----------------

@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege model needs root")
def test_spam_filters_work_with_a_root_only_spool(tmp_path, spamd):
    from helpers import run_emailrelay, smtp_sink, stop_process
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chmod(str(spool), 0o700)
    spam = "spam:127.0.0.1:%d" % spamd.port
    edit = "spam-edit:127.0.0.1:%d" % spamd.port
    with Relay(tmp_path, ["--filter", spam, "--filter", edit], spool=str(spool),
               user=None) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
            s.ehlo("client.test")
            code, text = send(s, SPAM)
            assert code == 452 and "rejected" in text
            code, text = send(s, HAM)
            assert code == 250, text
        [ham] = stored(relay)
        assert b"X-Spam-Status: No" in ham
        [name] = relay.files(".content")
        st = os.stat(os.path.join(str(spool), name))
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o660")
        assert "error" not in relay.log().replace("452 error", "")
    # The client side: spam-edit: rewrites the claimed message's content.
    with Relay(tmp_path, spool=str(spool), user=None, name="spam-sender") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as s:
            s.ehlo("client.test")
            assert send(s, SPAM)[0] == 250
    port = free_port()
    sink = smtp_sink(port)
    try:
        r = run_emailrelay(["--as-client", "127.0.0.1:%d" % port, "--spool-dir", str(spool),
                            "--client-filter", edit])
    finally:
        stop_process(sink)
    assert r.returncode == 0, r.stderr
    assert not os.listdir(str(spool))


def test_the_user_guides_spamassassin_program_filter(tmp_path):
    # Seed 001: emailrelay --as-server --filter="/usr/bin/spamassassin -e"
    with Relay(tmp_path, ["--filter=/usr/bin/spamassassin -e"]) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=120) as s:
            s.ehlo("client.test")
            code, text = send(s, HAM)
            assert code == 250, text
            code, text = send(s, SPAM)
            assert code == 452, text
        [content] = stored(relay)
    assert content.endswith(HAM)
