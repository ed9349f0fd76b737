"""The shipped ip-up hook (etc/ip-up.emailrelay), installed by make install."""

import os
import subprocess
import sys

import pytest

import syslogd
from helpers import BIN, ROOT, Relay, env, free_port, spool_files, wait_for

# pppd runs ip-up.d hooks with: interface, tty, speed, local IP, remote IP, ipparam.
PPPD_ARGS = ["ppp0", "/dev/ttyS0", "38400", "10.0.0.1", "10.0.0.2", ""]


def make(*args):
    result = subprocess.run(["make", "-s"] + list(args), cwd=ROOT, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr


def queue_one(spool):
    spool.mkdir()
    submitted = subprocess.run([os.path.join(BIN, "emailrelay-submit"), "--spool-dir", str(spool),
                                "b@y.test"], input=b"Subject: queued\n\nwhile offline\n", env=env(),
                               timeout=30)
    assert submitted.returncode == 0


def test_ip_up_hook_forwards_the_spool_to_the_smarthost(tmp_path):
    prefix = tmp_path / "prefix"
    make("install", "PREFIX=%s" % prefix, "PYTHONSITE=", "SPOOLDIR=%s" % (tmp_path / "unused"),
         "LOGDIR=%s" % (tmp_path / "log"), "PPPDIR=%s" % (tmp_path / "ppp"),
         "LOGROTATEDIR=%s" % (tmp_path / "logrotate.d"), "PYTHON=%s" % sys.executable)
    hook = tmp_path / "ppp/ip-up.d/emailrelay"
    spool = tmp_path / "spool"
    queue_one(spool)
    with Relay(tmp_path, name="smarthost") as smarthost:
        hook_env = dict(os.environ, SMARTHOST="127.0.0.1:%d" % smarthost.port,
                        EMAILRELAY_SPOOL=str(spool),
                        EMAILRELAY_OPTS="--user root --no-syslog --log-file %s" % (tmp_path / "hook.log"))
        ran = subprocess.run([str(hook)] + PPPD_ARGS, env=hook_env, timeout=30)
        assert ran.returncode == 0
        wait_for(lambda: smarthost.files(".envelope"), 30, what="the message at the smarthost")
        wait_for(lambda: not spool_files(str(spool), ".envelope")
                 and not spool_files(str(spool), ".busy"), 30, what="the spool to empty")


@pytest.mark.skipif(not syslogd.usable(), reason="needs root and mount namespaces")
def test_installed_ip_up_hook_logs_a_failed_forward_to_syslog(tmp_path):
    """What make install DESTDIR=... stages, run as pppd runs it, with the next hop down."""
    dest = tmp_path / "dest"
    make("install", "DESTDIR=%s" % dest, "PREFIX=/usr", "PYTHON=%s" % sys.executable)
    hook = dest / "etc/ppp/ip-up.d/emailrelay"
    spool = tmp_path / "spool"
    queue_one(spool)
    dead = free_port()
    hook_env = dict(os.environ, SMARTHOST="127.0.0.1:%d" % dead, EMAILRELAY_SPOOL=str(spool),
                    EMAILRELAY_OPTS="--user root")
    hook_env.pop("PYTHONPATH", None)
    with syslogd.SyslogReceiver(tmp_path / "syslog") as syslog:
        # The hook runs /usr/sbin/emailrelay, which reads /usr/lib/emailrelay:
        # both show the staged files.
        command = syslog.command([str(hook)] + PPPD_ARGS, dest, ["/usr/sbin", "/usr/lib"])
        ran = subprocess.run(command, env=hook_env, timeout=30)
        assert ran.returncode == 0
        # Facility mail (2), priority error (3): <19>.
        syslog.wait_for(r"^<19>.*emailrelay\[\d+\]: error: forwarding: cannot connect to "
                        r"127\.0\.0\.1:%d: Connection refused" % dead)
        syslog.wait_for(r"^<22>.*emailrelay\[\d+\]: info: forwarding: not every message was "
                        r"forwarded: exit status 1")
    wait_for(lambda: not spool_files(str(spool), ".busy"), 30, what="the claim to be released")
    assert len(spool_files(str(spool), ".envelope")) == 1, "the message waits for the next try"
