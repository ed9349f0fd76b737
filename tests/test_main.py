"""Start-up wiring: the --user switch, start-up failures before daemonising."""

import os
import pwd
import shutil
import smtplib
import subprocess

import pytest

from helpers import PYTHON, ROOT, Relay, env, free_port, spool_files, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root (CI runs as root)")


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


# -- what the binary reports ---------------------------------------------------------

def test_version_verbose_has_e_mailrelay_26s_layout():
    import ssl
    import sys
    proc = subprocess.run([PYTHON, "-m", "emailrelay", "--version", "--verbose"], cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert proc.returncode == 0
    lines = proc.stdout.split("\n")
    assert lines[0].startswith("emailrelay ") and lines[1] == "" and lines[2].startswith("Copyright (C) ")
    assert lines[3] == ""
    assert lines[4:12] == ["Multi-threading: enabled", "Unix domain sockets: enabled",
                           "POP server: enabled", "Admin server: enabled",
                           "TLS library: %s" % ssl.OPENSSL_VERSION, "PAM: enabled", "DNSBL: enabled",
                           "Python: %s" % sys.version.split()[0]]
    assert lines[12] == "" and "without warranty" in lines[13]


@pytest.mark.parametrize("command", [
    [PYTHON, "-m", "emailrelay", "--help", "--verbose"],
    [PYTHON, os.path.join(ROOT, "emailrelay.py"), "--version", "--verbose"],
    [os.path.join(ROOT, "bin", "emailrelay-submit"), "--help"],
    [os.path.join(ROOT, "bin", "emailrelay-sendmail"), "-bp"],
])
def test_a_closed_pipe_ends_quietly(command):
    # "| grep -q": the reader goes away after the first line.
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(30)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    with_grep = subprocess.run("%s | grep -q ." % " ".join(command), shell=True, cwd=ROOT, env=env(),
                               stderr=subprocess.PIPE, timeout=30)
    assert b"Traceback" not in with_grep.stderr and b"Exception ignored" not in with_grep.stderr


def run_program(args, **kwargs):
    return subprocess.run([PYTHON, "-m", "emailrelay"] + list(args), cwd=kwargs.pop("cwd", ROOT),
                          env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, **kwargs)


def test_startup_errors_reach_stderr_without_a_timestamp_even_with_a_log_file(tmp_path):
    log_file = tmp_path / "log"
    r = run_program(["--no-daemon", "--log", "--log-time", "--log-file", str(log_file), "--no-syslog",
                     "--port", str(free_port()), "--spool-dir", str(tmp_path / "missing")])
    assert r.returncode == 1
    assert r.stderr == "emailrelay: error: spool directory does not exist: %s\n" % (tmp_path / "missing")
    assert "error: spool directory does not exist" in log_file.read_text()


def _syslog_socket():
    import stat
    for path in ("/dev/log", "/var/run/syslog", "/var/run/log"):
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return True
        except OSError:
            pass
    return False


@pytest.mark.skipif(_syslog_socket(), reason="this host has a syslog socket")
def test_a_missing_syslog_socket_is_said_once_on_stderr(tmp_path):
    # Start-up stops at the missing spool, after logging was set up.
    args = ["--no-daemon", "--log", "--user", "root", "--port", str(free_port()),
            "--spool-dir", str(tmp_path / "missing")]
    r = run_program(args)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if "syslog socket" in x]
    assert lines == ["emailrelay: warning: no syslog socket (/dev/log): syslog lines are lost; "
                     "use --log-file, or --no-syslog to stop this warning"]
    # As the warning says: the log file keeps the lines, nothing is lost.
    r = run_program(args + ["--log-file", str(tmp_path / "log")])
    assert r.returncode == 1 and "syslog socket" not in r.stderr
    assert "spool directory" in (tmp_path / "log").read_text()
    r = run_program(args + ["--no-syslog"])
    assert r.returncode == 1 and "syslog socket" not in r.stderr


# -- start-up checks: configuration that cannot work ----------------------------------

def _server_args(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return ["--as-server", "--no-syslog", "--user", "root", "--port", str(free_port()),
            "--interface", "127.0.0.1", "--spool-dir", str(spool), "--pid-file", str(tmp_path / "pid")]


@pytest.mark.parametrize("extra, message", [
    (["--filter", "/nonexistent"], "--filter /nonexistent: no such program"),
    (["--filter", "/etc/passwd"], "--filter /etc/passwd: not executable"),
    (["--client-filter", "no-such-program-here", "--forward-to", "127.0.0.1:25"],
     "--client-filter no-such-program-here: no such program"),
    (["--address-verifier", "./missing-verifier"], "--address-verifier ./missing-verifier: no such program"),
    (["--forward-to", "::::"], "--forward-to ::::: invalid address"),
    (["--forward-to", "bad host!:25"], "--forward-to bad host!:25: invalid host name"),
    (["--log-file", "/nonexistent/emailrelay.log"],
     "cannot open log file /nonexistent/emailrelay.log: No such file or directory"),
])
def test_configuration_that_cannot_work_is_one_clear_line(tmp_path, extra, message):
    r = run_program(_server_args(tmp_path) + extra)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["emailrelay: error: " + message]
    assert not (tmp_path / "pid").exists()


@needs_root
def test_port_25_without_the_capability_says_what_it_needs(tmp_path):
    # Root without CAP_NET_BIND_SERVICE, as an ordinary user would be.
    args = _server_args(tmp_path)
    args[args.index("--port") + 1] = "25"
    r = subprocess.run(["setpriv", "--bounding-set", "-net_bind_service", "--inh-caps",
                        "-net_bind_service", PYTHON, "-m", "emailrelay"] + args, cwd=ROOT, env=env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "emailrelay: error: cannot listen on 127.0.0.1:25: Permission denied (ports below 1024 "
        "need root or CAP_NET_BIND_SERVICE)"]


def test_an_empty_server_auth_file_is_refused(tmp_path):
    empty = tmp_path / "empty.auth"
    empty.write_text("# nothing yet\n")
    r = run_program(_server_args(tmp_path) + ["--server-auth", str(empty)])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "emailrelay: error: --server-auth %s: no server accounts and no trusted addresses "
        "(server lines): every client would be refused" % empty]


def test_tls_file_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for path, reason in ((tmp_path / "missing.pem", "No such file or directory"),
                         (garbage, "not a usable PEM key and certificate")):
        r = run_program(_server_args(tmp_path) + ["--server-tls", "--server-tls-certificate", str(path)])
        assert r.returncode == 1
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "emailrelay: error: tls: --server-tls-certificate %s: %s" % (path, reason)), lines


def test_relative_filter_and_verifier_paths_work_after_daemonising(tmp_path):
    """The daemon changes directory to /; relative programs were resolved before."""
    work = tmp_path / "work"
    (work / "scripts").mkdir(parents=True)
    seen = tmp_path / "seen"
    for name, code in (("filter", 0), ("verifier", 1)):
        script = work / "scripts" / name
        script.write_text("#!/bin/sh\necho %s >> %s\nexit %d\n" % (name, seen, code))
        script.chmod(0o755)
    spool = tmp_path / "spool"
    spool.mkdir()
    port = free_port()
    pid_file = tmp_path / "pid"
    r = run_program(["--as-server", "--no-syslog", "--user", "root", "--port", str(port),
                     "--interface", "127.0.0.1", "--spool-dir", str(spool), "--pid-file", str(pid_file),
                     "--filter", "scripts/filter", "--address-verifier", "./scripts/verifier",
                     "--log-file", str(tmp_path / "log")], cwd=str(work))
    assert r.returncode == 0, r.stderr
    pid = int(pid_file.read_text())
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("a@x.test", ["b@y.test"], b"Subject: rel\r\n\r\nbody\r\n")
        assert len(spool_files(str(spool), ".envelope")) == 1
        assert seen.read_text().split() == ["verifier", "filter"]
    finally:
        os.kill(pid, 15)
        wait_for(lambda: not pid_file.exists(), what="the daemon to stop")


def test_as_client_stops_cleanly_on_sigterm(tmp_path):
    """SIGTERM in the middle of a pass: the message in hand finishes, no .busy is left."""
    import signal
    spool = tmp_path / "spool"
    spool.mkdir()
    for n in range(3):
        submitted = subprocess.run([os.path.join(ROOT, "bin", "emailrelay-submit"), "--spool-dir",
                                    str(spool), "b@y.test"], input=b"Subject: %d\n\nx\n" % n,
                                   env=env(), timeout=30)
        assert submitted.returncode == 0
    sink_port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-w", "2", "127.0.0.1:%d" % sink_port, "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = tmp_path / "log"
    try:
        wait_for(lambda: _listening(sink_port), what="smtp-sink")
        client = subprocess.Popen([PYTHON, "-m", "emailrelay", "--as-client", "127.0.0.1:%d" % sink_port,
                                   "--spool-dir", str(spool), "--user", "root", "--no-syslog",
                                   "--log", "--debug", "--log-file", str(log_file)],
                                  cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: spool_files(str(spool), ".busy"), 20, what="a claimed message")
        client.send_signal(signal.SIGTERM)
        client.wait(30)
        err = client.stderr.read().decode()
    finally:
        sink.terminate()
        sink.wait()
    assert "Traceback" not in err
    assert spool_files(str(spool), ".busy") == []
    assert 1 <= len(spool_files(str(spool), ".envelope")) <= 2, "the rest stay queued"
    assert "info: stopping" in log_file.read_text()


def _listening(port):
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# -- the default --domain ---------------------------------------------------------------

def _greeting_without_domain(tmp_path, prefix=()):
    spool = tmp_path / "spool"
    spool.mkdir()
    log_file = tmp_path / "log"
    port = free_port()
    proc = subprocess.Popen(list(prefix) + [PYTHON, "-m", "emailrelay", "--no-daemon", "--log",
                                            "--no-syslog", "--user", "root", "--port", str(port),
                                            "--interface", "127.0.0.1", "--spool-dir", str(spool),
                                            "--log-file", str(log_file)],
                            cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or (log_file.exists() and "smtp server on "
                                                     in log_file.read_text()), 20, what="listening")
        assert proc.poll() is None, proc.stderr.read()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            ehlo = s.ehlo("client.test")[1].decode()
    finally:
        proc.terminate()
        proc.wait(20)
    return ehlo.split()[0], log_file.read_text() + proc.stderr.read().decode()


def test_default_domain_is_this_hosts_name_not_localhost(tmp_path):
    import socket
    fqdn, host = socket.getfqdn(), socket.gethostname()
    if fqdn.startswith("localhost") and host.startswith("localhost"):
        pytest.skip("this host has no name but localhost")
    name, log_text = _greeting_without_domain(tmp_path)
    assert name == (fqdn if not fqdn.startswith("localhost") else host)
    assert "only called localhost" not in log_text
    help_text = subprocess.run([PYTHON, "-m", "emailrelay", "--help", "--verbose"], cwd=ROOT, env=env(),
                               stdout=subprocess.PIPE, universal_newlines=True).stdout
    section = help_text[help_text.index("--domain"):]
    section = section[:section.index("\n  -")]
    assert section.count("efault") == 1, section


@needs_root
def test_a_host_called_localhost_uses_its_address_literal_and_warns(tmp_path):
    import socket
    if shutil.which("unshare") is None:
        pytest.skip("unshare is missing")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 25))
        except OSError:
            pytest.skip("no route for outgoing mail")
        address = s.getsockname()[0]
    name, log_text = _greeting_without_domain(
        tmp_path, ["unshare", "--uts", "sh", "-c", 'hostname localhost && exec "$@"', "sh"])
    assert name == "[%s]" % address
    assert "warning: this host is only called localhost: using [%s] as --domain" % address in log_text


@pytest.mark.parametrize("trigger, warned", [
    ([], True),
    (["forward-on-disconnect"], False),
    (["poll 60"], False),
])
def test_forward_to_alone_in_the_config_file_is_warned_about(tmp_path, trigger, warned):
    conf = tmp_path / "emailrelay.conf"
    conf.write_text("\n".join(["forward-to 127.0.0.1:%d" % free_port()] + trigger) + "\n")
    relay = Relay(tmp_path, [str(conf)])
    relay.stop()
    line = ("emailrelay: warning: --forward-to is given but nothing starts forwarding: messages "
            "wait in the spool; add --forward-on-disconnect, --poll, --immediate or --forward "
            "(or run --as-client from cron or an ip-up hook)")
    assert (line in relay.log()) == warned
