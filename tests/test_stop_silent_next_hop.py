"""SIGTERM while the forwarder waits on a next hop that never answers."""

import os
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from helpers import PYTHON, ROOT, Relay, env, spool_files, wait_for

from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool

# The forwarder's grace for the message in hand is 5 s; before it had one
# the program took 30 s (daemon) or the next hop's timeouts (--as-client).
PROMPT = 20


@pytest.fixture
def silent_next_hop():
    """A port that completes TCP connections and never says anything."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("trigger", [["--poll", "1"], ["--forward-on-disconnect"]])
def test_daemon_stops_promptly_and_releases_the_claim(tmp_path, silent_next_hop, trigger):
    relay = Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % silent_next_hop] + trigger)
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for n in range(2):
                client.sendmail("a@example.com", ["b@example.com"],
                                b"Subject: stuck %d\r\n\r\nx\r\n" % n)
        # The message in hand, and the next one, claimed to go right after it.
        busy = wait_for(lambda: len(relay.files(".envelope.busy")) == 2 and
                        relay.files(".envelope.busy"), what="the messages to be claimed")
        started = time.monotonic()
        status = relay.stop(timeout=60)
        took = time.monotonic() - started
    finally:
        relay.stop()
    assert status == 0
    assert took < PROMPT, took
    stems = [name[:-len(".envelope.busy")] for name in busy]
    assert relay.files(".envelope.busy") == []
    assert relay.files(".envelope") == [stem + ".envelope" for stem in stems]
    log = relay.log()
    assert any("forwarding: %s: abandoned at shutdown" % stem in log for stem in stems), log
    # Not counted as an attempt: no retry state was written.
    for stem in stems:
        with open(os.path.join(relay.spool, stem + ".envelope"), "rb") as f:
            assert b"X-MailRelay-Retry" not in f.read()


def test_as_client_stops_promptly_and_releases_the_claim(tmp_path, silent_next_hop):
    spool = tmp_path / "spool"
    spool.mkdir()
    message = Spool(str(spool)).new_message()
    message.write(b"Subject: stuck\r\n\r\nx\r\n")
    message_id = message.finish(Envelope(from_="a@x.test", to_remote=["b@y.test"]))
    log_file = tmp_path / "log"
    client = subprocess.Popen([PYTHON, "-m", "emailrelay", "--as-client",
                               "127.0.0.1:%d" % silent_next_hop, "--spool-dir", str(spool),
                               "--user", "root", "--no-syslog", "--log", "--log-file",
                               str(log_file)],
                              cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: spool_files(str(spool), ".busy"), 20, what="the message to be claimed")
        started = time.monotonic()
        client.send_signal(signal.SIGTERM)
        client.wait(120)
        took = time.monotonic() - started
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        client.stderr.close()
    assert took < PROMPT, took
    assert client.returncode == 1, "not every message went"
    assert spool_files(str(spool), ".busy") == []
    assert spool_files(str(spool), ".envelope") == [message_id + ".envelope"]
    assert "forwarding: %s: abandoned at shutdown" % message_id in log_file.read_text()


def test_immediate_session_is_released_at_sigterm(tmp_path, silent_next_hop):
    relay = Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % silent_next_hop, "--immediate"])
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=60)
    try:
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        assert client.docmd("DATA")[0] == 354
        # The reply waits for the next hop, which never answers.
        client.send(b"Subject: stuck\r\n\r\nx\r\n.\r\n")
        busy = wait_for(lambda: relay.files(".envelope.busy"), what="the message to be claimed")
        started = time.monotonic()
        status = relay.stop(timeout=60)
        took = time.monotonic() - started
    finally:
        client.close()
        relay.stop()
    assert status == 0
    # The sessions' 5 s at shutdown, then the forwarder's grace.
    assert took < 3 * 10, took
    stem = busy[0][:-len(".envelope.busy")]
    assert relay.files(".envelope.busy") == []
    assert relay.files(".envelope") == [stem + ".envelope"]
    assert "forwarding: %s: abandoned at shutdown" % stem in relay.log()
