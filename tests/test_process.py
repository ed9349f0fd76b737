"""Process control seen from outside: daemon and pid file, signals, log
files, --close-stderr, systemd notification, user switch."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import ROOT, alive, env, free_port, wait_for

from emailrelay.runtime import process


def base_args(tmp_path, port):
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return ["--port", str(port), "--interface", "127.0.0.1", "--spool-dir", str(spool),
            "--no-syslog", "--user", "root"]


class Program:
    """The program as a subprocess, its stdout and stderr going to a file."""

    def __init__(self, tmp_path, args, environ=None):
        self.output = tmp_path / "output"
        with open(str(self.output), "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "emailrelay"] + args, cwd=ROOT,
                                         env=environ or env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out)
        self.pid = self.proc.pid

    def text(self):
        return self.output.read_text()

    def wait_listening(self, log_file=None):
        """Waits for the 'listening' line, logged once signal handlers are in place."""
        def ready():
            assert self.proc.poll() is None, "exited early: " + self.text()
            source = log_file if log_file is not None else self.output
            return source.exists() and "smtp server on " in source.read_text()
        wait_for(ready, 15, what="the program to listen")

    def wait(self, timeout=15):
        return self.proc.wait(timeout)

    def stop(self, sig=signal.SIGTERM):
        """Signals the program and returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def start(tmp_path, args, environ=None):
    return Program(tmp_path, args, environ)


def smtp_greeting(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(1000)


def test_daemon_writes_pid_file_before_parent_exits_and_stops_on_sigterm(tmp_path):
    port = free_port()
    pid_file = tmp_path / "run" / "emailrelay.pid"
    log_file = tmp_path / "log"
    parent = start(tmp_path, ["--as-server", "--pid-file", str(pid_file), "--log-file",
                              str(log_file)] + base_args(tmp_path, port))
    assert parent.wait() == 0, parent.text()
    # The parent has exited: the pid file must be there already.
    assert pid_file.is_file()
    pid = int(pid_file.read_text())
    try:
        assert pid != parent.pid and alive(pid)
        wait_for(lambda: "smtp server on " in log_file.read_text(), 10, what="listening")
        assert smtp_greeting(port).startswith(b"220 ")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), 10, what="the daemon to exit")
        assert not pid_file.exists()
        assert "stopping" in log_file.read_text()
        assert parent.text() == ""
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemon_is_detached(tmp_path):
    port = free_port()
    pid_file = tmp_path / "pid"
    parent = start(tmp_path, ["--log", "--pid-file", str(pid_file), "--log-file",
                              str(tmp_path / "log")] + base_args(tmp_path, port))
    assert parent.wait() == 0, parent.text()
    pid = int(pid_file.read_text())
    try:
        assert os.getsid(pid) not in (pid, os.getsid(0))
        assert os.readlink("/proc/%d/cwd" % pid) == "/"
        assert os.readlink("/proc/%d/fd/0" % pid) == os.devnull
        assert os.readlink("/proc/%d/fd/1" % pid) == os.devnull
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), 10, what="the daemon to exit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stops_cleanly_on_signal(tmp_path, sig):
    port = free_port()
    pid_file = tmp_path / "pid"
    prog = start(tmp_path, ["--no-daemon", "--log", "--pid-file", str(pid_file)]
                 + base_args(tmp_path, port))
    try:
        prog.wait_listening()
        assert int(pid_file.read_text()) == prog.pid
    finally:
        status = prog.stop(sig)
    assert status == 0, prog.text()
    assert not pid_file.exists()
    assert not os.listdir(str(tmp_path / "spool"))
    assert "stopping" in prog.text()


def test_log_file_with_date_and_sighup_reopen(tmp_path):
    port = free_port()
    prog = start(tmp_path, ["--no-daemon", "--log", "--verbose", "--log-file",
                            str(tmp_path / "relay-%d.log")] + base_args(tmp_path, port))
    path = tmp_path / ("relay-%s.log" % time.strftime("%Y%m%d"))
    try:
        prog.wait_listening(path)
        os.rename(str(path), str(tmp_path / "rotated"))
        prog.proc.send_signal(signal.SIGHUP)
        # A connection makes a log line; after SIGHUP it goes to a new file.
        wait_for(lambda: smtp_greeting(port) and path.exists(), 10,
                 what="a new log file after SIGHUP")
    finally:
        assert prog.stop() == 0
    assert "emailrelay: info: stopping" in path.read_text()
    assert "smtp server on " in (tmp_path / "rotated").read_text()
    assert prog.text() == ""


def test_close_stderr_silences_stderr_after_start_up(tmp_path):
    port = free_port()
    prog = start(tmp_path, ["--no-daemon", "--log", "--verbose", "--close-stderr"]
                 + base_args(tmp_path, port))
    try:
        prog.wait_listening()
        smtp_greeting(port)
    finally:
        assert prog.stop() == 0
    err = prog.text()
    assert "smtp server on " in err
    assert "connection" not in err and "stopping" not in err


def test_usage_error_starts_nothing(tmp_path):
    pid_file = tmp_path / "pid"
    prog = start(tmp_path, ["--as-server", "--pid-file", str(pid_file), "--port", "99999"])
    assert prog.wait() == 2
    assert "--port" in prog.text()
    assert not pid_file.exists()


def test_daemon_that_cannot_write_its_pid_file_fails_cleanly(tmp_path):
    (tmp_path / "file").write_text("")
    prog = start(tmp_path, ["--log", "--pid-file", str(tmp_path / "file" / "pid"),
                            "--log-file", str(tmp_path / "log")] + base_args(tmp_path, free_port()))
    assert prog.wait() == 1
    # The daemon may still be writing its last words.
    wait_for(lambda: "pid file" in (tmp_path / "log").read_text() + prog.text(), 10,
             what="the pid file error")
    assert "Traceback" not in (tmp_path / "log").read_text() + prog.text()


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_ready(tmp_path, abstract):
    name = "@emailrelay-test-%d-%d" % (os.getpid(), time.monotonic_ns()) if abstract \
        else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(15)
        port = free_port()
        prog = start(tmp_path, ["--no-daemon", "--log"] + base_args(tmp_path, port),
                     environ=dict(env(), NOTIFY_SOCKET=name))
        try:
            message = sock.recv(1000)
            assert b"READY=1" in message.split(b"\n")
            assert smtp_greeting(port).startswith(b"220 ")
        finally:
            assert prog.stop() == 0, prog.text()


def test_notify_ready_without_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert process.notify_ready() is False


def test_pid_file_helpers(tmp_path):
    path = tmp_path / "a" / "b.pid"
    process.write_pid_file(str(path))
    assert path.read_text() == "%d\n" % os.getpid()
    assert path.stat().st_mode & 0o777 == 0o644
    path.write_text("1\n")
    process.remove_pid_file(str(path))
    assert path.exists(), "a pid file of another process is left alone"
    process.write_pid_file(str(path))
    process.remove_pid_file(str(path))
    assert not path.exists()
    process.remove_pid_file(str(path))


def test_umasks():
    assert process.NORMAL_UMASK == 0o177
    old = process.set_umask(0o177)
    try:
        assert process.set_umask(0o117) == 0o177
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_switch_user_when_root(tmp_path):
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    args = base_args(tmp_path, port)
    args[args.index("--user") + 1] = "nobody"
    # tmp_path's parents are private to root: give nobody a spool it can reach.
    spool = tempfile.mkdtemp(prefix="emailrelay-test-")
    os.chmod(spool, 0o777)
    args[args.index("--spool-dir") + 1] = spool
    prog = start(tmp_path, ["--no-daemon", "--log"] + args)
    try:
        prog.wait_listening()
        with open("/proc/%d/status" % prog.pid) as f:
            status = f.read()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
        # Effective (and file-system) ids are the user's; real and saved stay
        # root's so that root can be reclaimed for a moment.
        assert ids["Uid"] == ["0", str(nobody.pw_uid), "0", str(nobody.pw_uid)]
        assert ids["Gid"] == ["0", str(nobody.pw_gid), "0", str(nobody.pw_gid)]
        assert ids["Groups"] == [str(nobody.pw_gid)]
    finally:
        status = prog.stop()
        shutil.rmtree(spool)
    assert status == 0, prog.text()


def test_unknown_user_is_a_clean_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the user is only looked up when started as root")
    args = base_args(tmp_path, free_port())
    args[args.index("--user") + 1] = "no-such-user-here"
    prog = start(tmp_path, ["--no-daemon", "--log"] + args)
    assert prog.wait() == 1
    err = prog.text()
    assert "no such user" in err and "Traceback" not in err


def test_signals_only_set_flags():
    signals = process.Signals()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(signals.hup.is_set, 5, what="the SIGHUP flag")
        assert not signals.stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(signals.stop.is_set, 5, what="the SIGTERM flag")
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
