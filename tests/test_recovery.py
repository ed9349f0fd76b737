"""Start-up recovery of what a killed relay (or a killed worker) left in the spool.

The rules: a content file that any envelope refers to stays, whatever the
envelope's state or directory; an `.envelope.new` of a dead process (never
acknowledged) goes with its content; a content file no envelope refers to
goes once its writer is dead and its lock is free.
"""

import os
import signal
import smtplib
import subprocess
import sys

from helpers import Relay, env, free_port, smtp_sink, stop_process, wait_for


def _dead_pid():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _write(path, data=b"x"):
    with open(path, "wb") as f:
        f.write(data)


ENVELOPE = (b"X-MailRelay-Format: #2821.8\r\nX-MailRelay-Content: 7bit\r\n"
            b"X-MailRelay-From: a@x.test\r\nX-MailRelay-ToCount: 1\r\n"
            b"X-MailRelay-To-Remote: b@y.test\r\nX-MailRelay-End: 1\r\n")


def test_content_of_a_killed_data_phase_is_removed(tmp_path):
    relay = Relay(tmp_path)
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    client.ehlo()
    client.mail("a@example.com")
    client.rcpt("b@example.com")
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: cut short\r\n\r\nhalf")
    content = wait_for(lambda: relay.files(".content"), what="content file")[0]
    relay.kill()
    client.close()
    # One of a live process (this test's pid), and one another live process
    # is writing (it holds the lock; its pid may be of another namespace).
    live = os.path.join(relay.spool, "emailrelay.%d.1700000000.1.content" % os.getpid())
    _write(live, b"being received")
    locked = os.path.join(relay.spool, "emailrelay.%d.1700000000.2.content" % _dead_pid())
    _write(locked, b"being received elsewhere")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys\n"
                               "f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); sys.stdin.read()", locked],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        relay.start()
        relay.wait_log(r"info: spool: removed %s: no envelope refers to it"
                       % content.replace(".", r"\."))
        assert not os.path.exists(os.path.join(relay.spool, content))
        assert os.path.exists(live) and os.path.exists(locked)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: next\r\n\r\nok\r\n")
    finally:
        holder.stdin.close()
        holder.wait()
        relay.stop()
    assert len(relay.files(".envelope")) == 1
    assert relay.log().count("no envelope refers to it") == 1


def test_recovery_keeps_what_an_envelope_refers_to_and_removes_the_rest(tmp_path):
    relay = Relay(tmp_path, start=False)
    spool = relay.spool
    pid = _dead_pid()
    stem = "emailrelay.%d.1700000000.%%d" % pid
    # Every envelope state, and a --pop-by-name copy in a user's directory.
    for n, suffix in enumerate([".envelope", ".envelope.busy", ".envelope.bad",
                                ".envelope.local", "alice/.envelope"], 1):
        subdir, _, suffix = suffix.rpartition("/")
        os.makedirs(os.path.join(spool, subdir), exist_ok=True)
        _write(os.path.join(spool, subdir, stem % n + suffix), ENVELOPE)
        _write(os.path.join(spool, stem % n + ".content"))
    # Leftovers: contents of messages already forwarded or deleted, an older
    # version's .content.orphan, an unacknowledged .envelope.new with its
    # content, and one whose content a POP copy still needs.
    _write(os.path.join(spool, stem % 10 + ".content"))
    _write(os.path.join(spool, stem % 11 + ".content"))
    _write(os.path.join(spool, stem % 12 + ".content.orphan"))
    _write(os.path.join(spool, stem % 13 + ".content"))
    _write(os.path.join(spool, stem % 13 + ".envelope.new"), ENVELOPE)
    _write(os.path.join(spool, stem % 14 + ".content"))
    _write(os.path.join(spool, stem % 14 + ".envelope.new"), ENVELOPE)
    _write(os.path.join(spool, "alice", stem % 14 + ".envelope"), ENVELOPE)
    relay.start()
    relay.stop()
    names = sorted(os.listdir(spool))
    assert names == sorted(["alice"] + [stem % n + ".content" for n in range(1, 6)]
                           + [stem % 14 + ".content", stem % 1 + ".envelope",
                              stem % 2 + ".envelope", stem % 3 + ".envelope.bad",
                              stem % 4 + ".envelope.local"]), names
    assert sorted(os.listdir(os.path.join(spool, "alice"))) == \
        sorted([stem % 5 + ".envelope", stem % 14 + ".envelope"])
    log = relay.log()
    for n in (10, 11):
        assert "spool: removed %s.content: no envelope refers to it" % (stem % n) in log
    assert "spool: removed %s.content.orphan: no envelope refers to it" % (stem % 12) in log
    assert ("warning: spool: removed unacknowledged message %s left by a stopped process "
            "(%s.envelope.new and its content)" % (stem % 13, stem % 13)) in log
    assert ("removed unacknowledged message %s left by a stopped process (%s.envelope.new; "
            "its content stays, another envelope refers to it)" % (stem % 14, stem % 14)) in log
    assert "claim of a stopped process released" in log


def test_a_killed_worker_leaves_nothing_behind(tmp_path):
    started = tmp_path / "filter.pid"
    script = tmp_path / "filter"
    script.write_text("#!/bin/sh\necho $$ > %s\nexec sleep 60\n" % started)
    script.chmod(0o755)
    relay = Relay(tmp_path, ["--workers", "2", "--filter", str(script)])
    sleeper = None
    try:
        # One message stops in its filter (.envelope.new), another in DATA.
        waiting = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        waiting.ehlo()
        waiting.mail("a@example.com")
        waiting.rcpt("b@example.com")
        waiting.docmd("DATA")
        waiting.send(b"Subject: filtered\r\n\r\nbody\r\n.\r\n")
        new = wait_for(lambda: relay.files(".envelope.new"), what="the filter to run")[0]
        sleeper = int(wait_for(lambda: started.exists() and started.read_text().strip(),
                               what="the filter's pid"))
        worker = int(new.split(".")[1])
        halfway = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
        halfway.ehlo()
        halfway.mail("a@example.com")
        halfway.rcpt("b@example.com")
        halfway.docmd("DATA")
        halfway.send(b"Subject: cut short\r\n\r\nhalf")
        wait_for(lambda: len(relay.files(".content")) == 2, what="the second content file")
        os.kill(worker, signal.SIGKILL)
        relay.wait_log(r"worker \d \(pid %d\) killed by signal 9" % worker)
        relay.wait_log(r"removed unacknowledged message %s" % new[:-len(".envelope.new")]
                       .replace(".", r"\."))
        wait_for(lambda: not [n for n in os.listdir(relay.spool)
                              if n.startswith("emailrelay.%d." % worker)],
                 what="the worker's files to go")
        waiting.close()
        halfway.close()
    finally:
        if sleeper is not None:
            try:
                os.kill(sleeper, signal.SIGKILL)
            except ProcessLookupError:
                pass
        relay.stop()
    # The other worker's half message (if it had it) went with its session.
    assert relay.files(".envelope") == [] and relay.files(".envelope.new") == []


STORE = """
import sys
from emailrelay.store.envelope import Envelope
from emailrelay.store.spool import Spool
spool = Spool(sys.argv[1])
for n in range(int(sys.argv[2])):
    message = spool.new_message()
    message.write(b"Subject: %d\\r\\n\\r\\n" % n + b"x" * 2000 + b"\\r\\n")
    message.finish(Envelope(from_="a@x.test", to_remote=["b@y.test"]))
"""


def test_kills_while_forwarding_leave_no_content_behind(tmp_path):
    relay = Relay(tmp_path, start=False)
    # Stored by a process that has gone, as the relay's own messages are
    # after a kill.
    subprocess.run([sys.executable, "-c", STORE, relay.spool, "600"], env=env(), check=True,
                   timeout=60)
    port = free_port()
    sink = smtp_sink(port, count=1000)
    relay.args += ["--forward-to", "127.0.0.1:%d" % port, "--forward"]
    try:
        left = 600
        for _ in range(3):
            relay.start()
            wait_for(lambda: len(relay.files(".envelope")) < left - 50, 30,
                     what="some messages to go")
            relay.kill()
            left = len(relay.files(".envelope")) + len(relay.files(".envelope.busy"))
        relay.start()
        wait_for(lambda: not relay.files(".envelope") and not relay.files(".envelope.busy"), 60,
                 what="the rest to go")
        relay.stop()
    finally:
        relay.stop()
        stop_process(sink)
    assert os.listdir(relay.spool) == []
