"""The privilege model (seed 000, "Security issues") seen from outside.

Started as root with --user (default daemon), the program runs with the
user's effective ids and reclaims root briefly: spool files are owned by
root with the user's group (mode 0660) and a root-only spool works, POP
included; the pid file is root's with the user's group and is removed even
from a root-only directory; SIGHUP re-reads a root-only secrets file and
reopens the log with its owner and mode; filters run as the user, real and
effective ids. Every test needs root.
"""

import os
import poplib
import pwd
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile

import pytest

from helpers import PYTHON, ROOT, Relay, env, free_port, spool_files, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the privilege model needs root")

DAEMON = pwd.getpwnam("daemon")


def ids_of(pid):
    """{'Uid': [real, effective, saved, fs], 'Gid': [...], 'Groups': [...]} of a process."""
    with open("/proc/%d/status" % pid) as f:
        return {line.split(":")[0]: line.split()[1:] for line in f}


def send(port, rcpt="b@y.test", text="Subject: hi\r\n\r\nbody\r\n"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@x.test", [rcpt], text.encode())


@pytest.fixture
def private_dir(tmp_path):
    """A root-owned 0700 directory (tmp_path's parents are root-only too)."""
    d = tmp_path / "private"
    d.mkdir()
    os.chmod(str(d), 0o700)
    return d


def test_root_only_spool_stores_serves_pop_and_forwards(tmp_path, private_dir):
    spool = private_dir / "spool"
    spool.mkdir()
    os.chmod(str(spool), 0o700)
    secrets = private_dir / "pop.auth"
    secrets.write_text("server plain alice secret\n")
    os.chmod(str(secrets), 0o600)
    with Relay(tmp_path, name="b") as b, \
            Relay(tmp_path, ["--pop-auth", str(secrets), "--pop-no-delete"], spool=str(spool),
                  pop=True, name="a", user=None) as a:
        ids = ids_of(a.proc.pid)
        assert ids["Uid"] == ["0", str(DAEMON.pw_uid), "0", str(DAEMON.pw_uid)]
        assert ids["Gid"] == ["0", str(DAEMON.pw_gid), "0", str(DAEMON.pw_gid)]
        assert ids["Groups"] == [str(DAEMON.pw_gid)]
        send(a.port)
        envelopes = a.files(".envelope")
        assert len(envelopes) == 1
        for name in envelopes + a.files(".content"):
            st = os.stat(os.path.join(a.spool, name))
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, DAEMON.pw_gid, 0o660), name
        pop = poplib.POP3("127.0.0.1", a.pop_port, timeout=10)
        try:
            pop.user("alice")
            pop.pass_("secret")
            assert pop.stat()[0] == 1
            assert b"body" in b"\n".join(pop.retr(1)[1])
        finally:
            pop.quit()
        proc = subprocess.run([PYTHON, "-m", "emailrelay", "--as-client", "127.0.0.1:%d" % b.port,
                               "--spool-dir", str(spool), "--no-syslog"],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=60)
        assert proc.returncode == 0, proc.stdout
        assert len(b.files(".envelope")) == 1
        assert not spool_files(str(spool), ".envelope") and not spool_files(str(spool), ".busy")
        assert "error" not in a.log()


def test_pid_file_is_roots_with_the_user_group_and_removed_from_a_root_only_directory(
        tmp_path, private_dir):
    pid_file = private_dir / "run" / "sub" / "emailrelay.pid"
    relay = Relay(tmp_path, ["--pid-file", str(pid_file)], user=None)
    try:
        st = os.stat(str(pid_file))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, DAEMON.pw_gid, 0o644)
        for d in (private_dir / "run", private_dir / "run" / "sub"):
            assert stat.S_IMODE(os.stat(str(d)).st_mode) == 0o755
        assert int(pid_file.read_text()) == relay.proc.pid
    finally:
        assert relay.stop() == 0, relay.log() + relay.stderr()
    assert not pid_file.exists()
    assert "warning" not in relay.log()


def test_sighup_adds_an_account_from_a_root_only_secrets_file(tmp_path, private_dir):
    secrets = private_dir / "auth"
    secrets.write_text("server plain alice a-pw\n")
    os.chmod(str(secrets), 0o600)

    def login(user, password):
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("client.test")
            try:
                c.login(user, password)
                return True
            except smtplib.SMTPAuthenticationError:
                return False

    with Relay(tmp_path, ["--server-auth", str(secrets)], user=None) as relay:
        assert login("alice", "a-pw") and not login("bob", "b-pw")
        secrets.write_text("server plain alice a-pw\nserver plain bob b-pw\n")
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_log(r"info: re-read secrets file " + str(secrets))
        assert login("bob", "b-pw")
        assert "keeping the old one" not in relay.log()


def test_sighup_reopens_a_rotated_log_with_its_owner_and_mode(tmp_path, private_dir):
    log_path = private_dir / "emailrelay.log"
    relay = Relay(tmp_path, user=None, start=False)
    relay.log_path = str(log_path)
    relay.args[relay.args.index("--log-file") + 1] = str(log_path)
    relay.start()
    try:
        before = os.stat(str(log_path))
        assert (before.st_uid, stat.S_IMODE(before.st_mode)) == (0, 0o644)
        os.rename(str(log_path), str(private_dir / "emailrelay.log.1"))
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(log_path.exists, what="the new log file")
        send(relay.port)
        relay.wait_log("a@x.test")
        after = os.stat(str(log_path))
        assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == \
            (before.st_uid, before.st_gid, 0o644)
    finally:
        assert relay.stop() == 0
    assert "stopping" in log_path.read_text()


def test_a_log_file_that_cannot_be_reopened_is_reported_on_stderr(tmp_path):
    relay = Relay(tmp_path)
    try:
        os.unlink(relay.log_path)
        os.mkdir(relay.log_path)
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "cannot write log file %s" % relay.log_path in relay.stderr(),
                 what="the reopen failure on stderr")
    finally:
        relay.stop()


def test_filters_and_verifiers_run_with_the_user_ids(tmp_path):
    out = tempfile.mkdtemp(prefix="emailrelay-ids-")
    try:
        os.chmod(out, 0o777)
        script = os.path.join(out, "ids")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho \"$(id -ru) $(id -u) $(id -rg) $(id -g)\" >> %s/seen\n"
                    "exit 0\n" % out)
        os.chmod(script, 0o755)
        verifier = os.path.join(out, "verify")
        with open(verifier, "w") as f:
            f.write("#!/bin/sh\necho \"$(id -ru) $(id -u) $(id -rg) $(id -g)\" >> %s/seen\n"
                    "exit 1\n" % out)
        os.chmod(verifier, 0o755)
        with Relay(tmp_path, ["--filter", script, "--address-verifier", verifier], user=None) as r:
            send(r.port)
            assert len(r.files(".envelope")) == 1
        with open(os.path.join(out, "seen")) as f:
            seen = f.read().split("\n")
        expected = "%d %d %d %d" % (DAEMON.pw_uid, DAEMON.pw_uid, DAEMON.pw_gid, DAEMON.pw_gid)
        assert seen[:2] == [expected, expected]
    finally:
        shutil.rmtree(out)


def test_interpreter_and_package_under_a_root_only_directory(tmp_path, private_dir):
    """The pyenv-under-/root case: nothing may be imported after the switch.

    The package is copied into a 0700 directory and run with the suite's
    own interpreter (here itself under root's 0700 home when pyenv is used).
    """
    tree = private_dir / "tree"
    shutil.copytree(os.path.join(ROOT, "emailrelay"), str(tree / "emailrelay"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    spool = private_dir / "spool"
    spool.mkdir()
    log_path = tmp_path / "log"
    port, next_hop = free_port(), free_port()
    environ = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen([sys.executable, "-m", "emailrelay", "--no-daemon", "--log", "--verbose",
                             "--port", str(port), "--interface", "127.0.0.1",
                             "--spool-dir", str(spool), "--log-file", str(log_path),
                             "--forward-to", "127.0.0.1:%d" % next_hop, "--filter", "exit:0",
                             "--server-auth", str(_trusted(private_dir))],
                            cwd=str(private_dir), env=environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    try:
        wait_for(lambda: proc.poll() is not None or (log_path.exists() and "server on " in
                                                     log_path.read_text()),
                 20, what="the relay to listen")
        assert proc.poll() is None, proc.stdout.read()
        send(port)
        assert len(spool_files(str(spool), ".envelope")) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    text = log_path.read_text()
    assert proc.returncode == 0, output + text
    assert text.count("switched to user daemon") == 1
    assert "not writable" not in text + output and "Traceback" not in text + output


def _readable_by_daemon(path):
    """Whether user daemon could read `path` (every parent searchable by others)."""
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True


def test_utf8_domains_after_the_switch_with_an_unreadable_library(tmp_path):
    """A codec first used in a session (idna asks for punycode) was loaded as root."""
    library = os.path.dirname(os.__file__)
    if _readable_by_daemon(library):
        pytest.skip("the interpreter's library %s is readable by daemon" % library)
    with Relay(tmp_path, ["--server-smtp-config", "+smtputf8"], user="daemon") as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.command_encoding = "utf-8"
            s.ehlo()
            assert s.docmd("MAIL FROM:<alice@b\u00fccher.example.com>") == (
                250, b"sender <alice@xn--bcher-kva.example.com> OK")
            assert s.docmd("RSET")[0] == 250
            assert s.docmd("MAIL FROM:<alice@b\u00fccher.example.com> SMTPUTF8")[0] == 250
            assert s.docmd("RCPT TO:<bob@st\u00e4dte.example.com>")[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
            assert s.getreply()[0] == 250
        envelope = relay.files(".envelope")
        assert len(envelope) == 1
        with open(os.path.join(relay.spool, envelope[0]), "rb") as f:
            assert b"X-MailRelay-From: alice@xn--bcher-kva.example.com\r\n" in f.read()
    assert "internal error" not in relay.log()


def _trusted(directory):
    """A secrets file trusting 127.0.0.1, root-only like a real one."""
    path = directory / "trusted.auth"
    path.write_text("server none 127.0.0.1 localclient\n")
    os.chmod(str(path), 0o600)
    return path


def test_an_unrunnable_filter_for_the_user_is_a_clear_startup_error(tmp_path, private_dir):
    script = private_dir / "filter"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(str(script), 0o700)
    proc = subprocess.run([PYTHON, "-m", "emailrelay", "--as-server", "--port", str(free_port()),
                           "--interface", "127.0.0.1", "--spool-dir", str(tmp_path),
                           "--filter", str(script), "--no-syslog"],
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "emailrelay: error: %s: not executable by user daemon (see --user)" % script]


def _unit_capabilities():
    with open(os.path.join(ROOT, "etc", "emailrelay.service.in")) as f:
        for line in f:
            if line.startswith("CapabilityBoundingSet="):
                return [c.lower().replace("cap_", "") for c in line.split("=", 1)[1].split()]
    raise AssertionError("no CapabilityBoundingSet in the unit")


def test_runs_with_the_systemd_units_capabilities_and_no_new_privileges(tmp_path, private_dir):
    """The unit's hardening, applied with setpriv: spool, pid file, SIGHUP all work."""
    caps = _unit_capabilities()
    assert set(caps) == {"net_bind_service", "setuid", "setgid"}
    spool = private_dir / "spool"
    spool.mkdir()
    os.chown(str(spool), DAEMON.pw_uid, DAEMON.pw_gid)
    os.chmod(str(spool), 0o770)
    secrets = private_dir / "auth"
    secrets.write_text("server none 127.0.0.1 local\n")
    os.chmod(str(secrets), 0o600)
    pid_file = private_dir / "run" / "emailrelay.pid"
    relay = Relay(tmp_path, ["--server-auth", str(secrets), "--pid-file", str(pid_file)],
                  spool=str(spool), user=None, start=False)
    out = open(os.path.join(relay.dir, "stderr"), "ab")
    relay._stderr = out
    relay.proc = subprocess.Popen(
        ["setpriv", "--no-new-privs", "--inh-caps=-all",
         "--bounding-set=-all," + ",".join("+" + c for c in caps),
         PYTHON, "-m", "emailrelay"] + relay.args,
        cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        relay.wait_ready()
        with open("/proc/%d/status" % relay.proc.pid) as f:
            status = f.read()
        assert "NoNewPrivs:\t1" in status
        send(relay.port, text="Subject: hardened\r\n\r\nbody\r\n")
        assert len(relay.files(".envelope")) == 1
        name = relay.files(".content")[0]
        st = os.stat(os.path.join(str(spool), name))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, DAEMON.pw_gid, 0o660)
        secrets.write_text("server none 127.0.0.1 local\nserver plain bob b-pw\n")
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_log(r"info: re-read secrets file " + str(secrets))
        st = os.stat(str(pid_file))
        assert (st.st_uid, st.st_gid) == (0, DAEMON.pw_gid)
    finally:
        assert relay.stop() == 0, relay.log() + relay.stderr()
    assert not pid_file.exists()
    assert "error" not in relay.log() and "warning" not in relay.log()


WINDOW_SCRIPT = r"""
import os, sys, threading
sys.path.insert(0, sys.argv[1])
from emailrelay.runtime import process
process.drop_privileges("daemon")
inside = threading.Event()
seen = {}

def other():
    inside.wait(10)
    seen["other"] = os.geteuid()

t = threading.Thread(target=other)
t.start()
with process.privileged(group=False):
    seen["window"] = os.geteuid()
    inside.set()
    t.join(10)
seen["after"] = os.geteuid()
print(seen["window"], seen["other"], seen["after"], process._THREAD_CALLS is not None)
"""


def test_a_root_window_gives_root_to_its_own_thread_only(tmp_path):
    daemon = pwd.getpwnam("daemon").pw_uid
    r = subprocess.run([PYTHON, "-c", WINDOW_SCRIPT, ROOT], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert r.returncode == 0, r.stderr
    window, other, after, per_thread = r.stdout.split()
    assert (int(window), int(after)) == (0, daemon)
    if per_thread == "True":
        # Linux on this machine: the window is the calling thread's alone.
        assert int(other) == daemon
    else:
        assert int(other) == 0
