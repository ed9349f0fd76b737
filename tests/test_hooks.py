"""The shipped ip-up hook (etc/ip-up.emailrelay), installed by make install."""

import os
import subprocess
import sys

from helpers import BIN, ROOT, Relay, env, spool_files, wait_for


def test_ip_up_hook_forwards_the_spool_to_the_smarthost(tmp_path):
    prefix = tmp_path / "prefix"
    result = subprocess.run(["make", "-s", "install", "PREFIX=%s" % prefix, "PYTHONSITE=",
                             "SPOOLDIR=%s" % (tmp_path / "unused"), "PYTHON=%s" % sys.executable],
                            cwd=ROOT, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    hook = prefix / "etc/ppp/ip-up.d/emailrelay"
    spool = tmp_path / "spool"
    spool.mkdir()
    submitted = subprocess.run([os.path.join(BIN, "emailrelay-submit"), "--spool-dir", str(spool),
                                "b@y.test"], input=b"Subject: queued\n\nwhile offline\n", env=env(),
                               timeout=30)
    assert submitted.returncode == 0
    with Relay(tmp_path, name="smarthost") as smarthost:
        hook_env = dict(os.environ, SMARTHOST="127.0.0.1:%d" % smarthost.port,
                        EMAILRELAY_SPOOL=str(spool),
                        EMAILRELAY_OPTS="--user root --no-syslog --log-file %s" % (tmp_path / "hook.log"))
        # pppd's arguments: interface, tty, speed, local and remote address.
        ran = subprocess.run([str(hook), "ppp0", "/dev/ttyS0", "38400", "10.0.0.1", "10.0.0.2"],
                             env=hook_env, timeout=30)
        assert ran.returncode == 0
        wait_for(lambda: smarthost.files(".envelope"), 30, what="the message at the smarthost")
        wait_for(lambda: not spool_files(str(spool), ".envelope")
                 and not spool_files(str(spool), ".busy"), 30, what="the spool to empty")
