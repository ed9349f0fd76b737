"""Start-up wiring: the --user switch, start-up failures before daemonising."""

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile

import pytest

from helpers import PYTHON, ROOT, Relay, env, free_port, spool_files, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root (CI runs as root)")


@pytest.fixture
def daemon_spool():
    """A spool directory the `daemon` user can write, outside root's private tmp."""
    d = tempfile.mkdtemp(prefix="emailrelay-daemon-")
    os.chmod(d, 0o755)
    spool = os.path.join(d, "spool")
    os.mkdir(spool)
    daemon = pwd.getpwnam("daemon")
    os.chown(spool, daemon.pw_uid, daemon.pw_gid)
    yield spool
    shutil.rmtree(d)


def _uid_of(pid):
    """The effective user id of a process."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])
    raise AssertionError("no Uid line")


@needs_root
def test_root_switches_to_daemon_and_still_stores_and_forwards(tmp_path, daemon_spool):
    with Relay(tmp_path, name="b") as b, \
            Relay(tmp_path, ["--forward-to", "127.0.0.1:%d" % b.port, "--forward-on-disconnect",
                             "--filter", "exit:0"], spool=daemon_spool, name="a", user=None) as a:
        daemon_uid = pwd.getpwnam("daemon").pw_uid
        assert _uid_of(a.proc.pid) == daemon_uid
        with smtplib.SMTP("127.0.0.1", a.port, timeout=10) as s:
            s.sendmail("a@x.test", ["b@y.test"], b"Subject: hi\r\n\r\nbody\r\n")
        wait_for(lambda: spool_files(b.spool, ".envelope"), what="message at relay B")
        wait_for(lambda: not spool_files(a.spool, ".envelope") and not spool_files(a.spool, ".busy"),
                 what="relay A to empty its spool")
        assert "error" not in a.log()


def test_missing_spool_directory_is_a_startup_error(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "emailrelay", "--as-server", "--no-daemon", "--port", str(free_port()),
                           "--spool-dir", str(tmp_path / "nonexistent")],
                          cwd=ROOT, env=env(), stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert proc.returncode == 1
    assert "spool directory does not exist" in proc.stderr


def test_port_in_use_is_a_startup_error(tmp_path):
    with Relay(tmp_path, name="first") as first:
        proc = subprocess.run([PYTHON, "-m", "emailrelay", "--no-daemon", "--port", str(first.port),
                               "--interface", "127.0.0.1", "--spool-dir", first.spool],
                              cwd=ROOT, env=env(), stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
        assert proc.returncode == 1
        assert "cannot listen on 127.0.0.1:%d" % first.port in proc.stderr
